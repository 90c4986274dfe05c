"""ASGI entry point: admission control in front, the lean inference routes, Django for the rest, and the
lifespan that builds, starts and stops the process's long-lived objects (`resource_server/bootstrap.py`)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
from typing import Any, cast

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "gateway.settings")
django_application = get_asgi_application()

# The imports below need Django set up first.
from django.conf import settings  # noqa: E402

from resource_server.api.edge import (  # noqa: E402
    INFERENCE_MATCH,
    INFERENCE_PATH,
    AsgiAnswers,
    ASGIApp,
    Message,
    Receive,
    RequestIds,
    Scope,
    Send,
)
from resource_server.api.fast import InferenceApp  # noqa: E402
from resource_server.bootstrap import Runtime, bootstrap, runtime_install  # noqa: E402
from resource_server.errors import ErrorCode, ServiceUnavailable  # noqa: E402

logger = logging.getLogger("gateway")
# The usage writer's share of a worker's shutdown; deploy/gunicorn.conf.py's budget counts on it.
USAGE_STOP_SECONDS = 5.0
_STOP_WAIT_SECONDS = 1.0  # for cancelled handlers, which only record their usage: milliseconds in practice
_OVERLOADED = ServiceUnavailable(
    "The gateway is at capacity. Please retry shortly.", retry_after=1, code=ErrorCode.GATEWAY_OVERLOADED
)


class AdmissionControl:
    """ASGI wrapper that sheds inference POSTs (503) when the worker already holds too many, whichever door
    (the lean app or Django) serves them. Other requests, the relay route's included, always pass: a relay
    message is part of a stream already admitted, and refusing it would fail that stream instead.

    It counts what the worker holds, not how late its event loop runs: lateness depends on the core's speed
    and its neighbours, and refusing a closed loop of clients (each waits for its answer before asking again)
    only makes it ask again at once. Pending requests are admitted and not yet answered: the work this worker
    owes. A stream stops being pending once its response starts (it then costs a little per chunk over a long
    life), so open streams count only against the in-flight bound, which caps sockets and memory.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._answers = AsgiAnswers()
        self._pending = 0
        self._in_flight = 0
        self._max_pending = settings.GATEWAY.MAX_PENDING_PER_WORKER
        self._max_in_flight = settings.GATEWAY.MAX_IN_FLIGHT_PER_WORKER
        self._ended: asyncio.Event | None = None  # set when the last admitted request ends, once stopping

    @property
    def pending(self) -> int:
        return self._pending

    @property
    def in_flight(self) -> int:
        return self._in_flight

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        match = scope[INFERENCE_MATCH] = INFERENCE_PATH.match(scope["path"])  # the lean door reads it there
        if match is None:
            await self.app(scope, receive, send)
            return
        if self._pending >= self._max_pending or self._in_flight >= self._max_in_flight:
            # Refused before any work, so that refusing stays cheap when the worker is saturated.
            await self._answers.send_error(send, _OVERLOADED, RequestIds.of(_client_request_id(scope)))
            return
        admitted = _Admitted(self, send)
        try:
            await self.app(scope, receive, admitted)
        finally:
            admitted.end()

    async def stop(self) -> None:
        """ASGI lifespan shutdown: let the requests still counted end, for at most _STOP_WAIT_SECONDS.

        uvicorn has finished or cancelled every request by now, but a cancelled handler still has to run
        to record its usage (a cut stream is a 499 row), and the usage writer is stopped right after this.
        """
        if self._in_flight:
            self._ended = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_STOP_WAIT_SECONDS):
                    await self._ended.wait()


class _Admitted:
    """An admitted inference request, and the `send` its door answers through: pending until its answer
    starts, in flight until the door returns.

    It counts the request out of pending before passing the answer's start on, so a client that asks again
    as soon as it has its answer always finds its earlier request already counted out.
    """

    __slots__ = ("_control", "_pending", "_send")

    def __init__(self, control: AdmissionControl, send: Send) -> None:
        self._control = control
        self._send = send
        self._pending = True
        control._pending += 1
        control._in_flight += 1

    def __call__(self, message: Message) -> Any:
        # Not a coroutine itself: it hands back the wrapped send's, so each chunk of a stream costs no extra frame.
        if self._pending and message["type"] == "http.response.start":
            self._answering()
        return self._send(message)

    def _answering(self) -> None:
        self._pending = False
        self._control._pending -= 1

    def end(self) -> None:
        if self._pending:
            self._answering()
        control = self._control
        control._in_flight -= 1
        if not control._in_flight and control._ended is not None:
            control._ended.set()


def _client_request_id(scope: Scope) -> str:
    for name, value in scope["headers"]:
        if name == b"x-request-id":
            return cast(bytes, value).decode("latin1")
    return ""


# The ASGI app itself, which the server imports: the doors and the admission wrapper, whose counters are
# plain numbers (they talk to nothing outside). The objects the doors use come from the runtime.
# django-stubs types ASGIHandler with dict scopes; it is an ordinary ASGI app.
inference_app = InferenceApp(cast(ASGIApp, django_application))
http_application = AdmissionControl(inference_app)


async def _lifespan(receive: Any, send: Any) -> None:
    # Django does not speak ASGI lifespan. Without it, uvicorn ends the worker by re-raising SIGTERM,
    # so atexit never runs: the usage writer is stopped here instead, after open requests finish.
    started: Runtime | None = None
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            started = bootstrap()
            runtime_install(started)
            started.start()
            await worker_settle(started)
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            # uvicorn has stopped accepting and finished or cancelled every request by now (within
            # graceful_timeout minus a reserve, see deploy/gunicorn.conf.py). What the usage writer holds
            # is journaled already; it gets a few seconds to insert it, the next start replays the rest.
            await http_application.stop()
            if started is not None:
                await started.stop(USAGE_STOP_SECONDS)
            await send({"type": "lifespan.shutdown.complete"})
            return


async def worker_settle(started: Runtime) -> None:
    """Load what the worker keeps for its lifetime before the first request, then freeze it.

    The routing table brings in the SDKs its backends need. Frozen objects are left out of the garbage
    collector's full collections, which otherwise walk all of them (~50 ms with the Globus Compute SDK
    loaded) while the event loop waits: a pause every open stream sees as a late token.
    """
    try:
        await started.routing.table()
    except Exception:
        # The database may not be up yet: the first request loads the table instead.
        logger.warning("could not load the routing table at start-up; the first request will", exc_info=True)
    gc.collect()  # garbage left by start-up goes first: frozen, it would stay for good
    gc.freeze()


async def application(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        await _lifespan(receive, send)
    else:
        await http_application(scope, receive, send)
