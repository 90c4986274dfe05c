"""gunicorn's uvicorn worker with limits on how much and how slowly a client may send a request's head.

uvicorn's httptools protocol buffers a request line and headers without bound and waits for them without
a deadline: four clients sending 250 MB of headers took a worker to 1.1 GB, and a client trickling a byte
at a time holds a connection forever. nginx has limits for both, but the gateway's port may be reached
without it. uvicorn offers a knob only for h11 (`h11_max_incomplete_event_size`), so this worker runs the
httptools protocol (named explicitly: "auto" would fall back to h11 unnoticed) with both limits added at
the protocol's own entry points, and passes the size limit to h11's knob as well.
"""

from __future__ import annotations

import asyncio
import http
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn_worker import UvicornWorker  # type: ignore[import-untyped]  # ships no py.typed marker

from gateway.config import GatewaySettings


class HeadLimitedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, refusing a request head over `max_head_bytes` or slower than `head_timeout`.

    The head is counted from the bytes received, before the parser sees them: httptools keeps a header's
    partial value in its own buffer and calls back only once the value is complete, so counting headers
    in its callbacks would let one endless header through. A body is not counted.
    """

    max_head_bytes = 64 * 1024
    head_timeout = 10.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._reading_head = True  # the next bytes belong to a request's head (or the connection is idle)
        self._head_started = False  # a head has begun and is not complete yet
        self._head_bytes = 0
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        # A connection that never sends anything holds a socket too: its first head is due in time as well.
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._reading_head:
            self._head_bytes += len(data)
        super().data_received(data)
        # Checked after parsing, so that a chunk which ends the head and carries body bytes is not refused;
        # the parser then holds at most the limit plus one read (256 KB). The timer starts only for a head
        # that one read did not complete, so the usual request costs no timer.
        if self._head_started and not self.transport.is_closing():
            if self._head_bytes > self.max_head_bytes:
                self._refuse(http.HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "Request line and headers too large.")
            else:
                self._arm_head_timer()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_started = True

    def on_headers_complete(self) -> None:
        self._reading_head = self._head_started = False
        self._head_bytes = 0
        self._disarm_head_timer()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._reading_head = True  # whatever comes next on this connection is the next request's head

    def _arm_head_timer(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.head_timeout, self._head_timed_out)

    def _disarm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if not self._reading_head or self.transport.is_closing():
            return
        if self._head_bytes:
            self._refuse(http.HTTPStatus.REQUEST_TIMEOUT, "The request's headers did not arrive in time.")
        else:
            self.transport.close()  # nothing was asked: nobody to answer

    def _refuse(self, status: http.HTTPStatus, message: str) -> None:
        self._disarm_head_timer()
        if self.cycle is not None and not self.cycle.response_complete:
            # A pipelined head behind a response still being sent: let that response finish, read no more.
            self.cycle.keep_alive = False
            self.flow.pause_reading()
            return
        self.logger.warning("%s from %s; connection closed", message, self.client[0] if self.client else "?")
        body = message.encode()
        head = [f"HTTP/1.1 {status.value} {status.phrase}\r\n".encode()]
        head += [name + b": " + value + b"\r\n" for name, value in self.server_state.default_headers]
        head += [
            b"content-type: text/plain; charset=utf-8\r\n",
            b"content-length: " + str(len(body)).encode() + b"\r\n",
            b"connection: close\r\n\r\n",
        ]
        self.transport.write(b"".join(head) + body)
        self.transport.close()


def head_limited_protocol(max_head_bytes: int, head_timeout: float) -> type[HeadLimitedProtocol]:
    """The protocol class uvicorn instantiates per connection, with these limits."""
    return type(
        "HeadLimitedProtocol",
        (HeadLimitedProtocol,),
        {"max_head_bytes": max_head_bytes, "head_timeout": head_timeout, "__module__": __name__},
    )


class GatewayWorker(UvicornWorker):  # type: ignore[misc]  # untyped base class (see its import)
    """The uvicorn worker deploy/gunicorn.conf.py runs: uvloop, httptools, and the head limits."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        limits = GatewaySettings()
        # Read by UvicornWorker.__init__ as uvicorn Config arguments.
        self.CONFIG_KWARGS = {
            "loop": "auto",
            "http": head_limited_protocol(limits.MAX_HEADER_BYTES, limits.HEADER_TIMEOUT_SECONDS),
            "h11_max_incomplete_event_size": limits.MAX_HEADER_BYTES,
        }
        super().__init__(*args, **kwargs)
