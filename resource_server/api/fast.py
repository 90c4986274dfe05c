"""The inference POSTs as a lean ASGI app: the hot path, without Django's per-request machinery.

Through Django's ASGI handler a request costs milliseconds of CPU before our view runs: a thread per
request for the sync middleware (two hops for each of them), body spooling, URL resolution. The inference
routes need none of it. This app serves exactly `POST /resource_server/v1/<route>` and the FIRST paths
`POST /resource_server/<cluster>/<framework>/v1/<route>` with the same authenticator chain, validation,
routing, dispatch, usage recording, error envelope, request id and response headers as the ninja views,
and the relay route `POST /resource_server/internal/relay/<task_id>` (a compute function posts each batch
of a stream's events there, so it is as hot as the stream). Everything else (other methods and paths, a
Host Django would refuse) goes to Django unchanged.

It reproduces what the configured middleware does to these responses, so it checks at start-up that
MIDDLEWARE and the security settings are the ones it reproduces, and stays off otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncGenerator, Awaitable, Callable, MutableMapping
from typing import Any

from django.conf import settings
from django.http.request import split_domain_port, validate_host

from resource_server.api.security import bearer_token_of
from resource_server.dispatch.base import Route
from resource_server.errors import GatewayError, InvalidRequest, ServiceUnavailable
from resource_server.middleware import RequestIds
from resource_server.services.authentication import principal_from_token
from resource_server.services.inference import JsonResult, inference_run
from resource_server.services.relay import relay_deliver

logger = logging.getLogger("resource_server.api")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_ROUTES = "|".join(re.escape(route.value) for route in Route)
INFERENCE_PATH = re.compile(rf"^/resource_server/(?:(?P<cluster>[^/]+)/(?P<framework>[^/]+)/)?v1/(?P<route>{_ROUTES})$")
RELAY_PATH = re.compile(r"^/resource_server/internal/relay/(?P<task_id>[^/]+)$")
# The middleware whose effect on an API response this app reproduces (see _common_headers).
REPRODUCED_MIDDLEWARE = [
    "resource_server.middleware.RequestContextMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]
_OVERLOADED = ServiceUnavailable(
    "The gateway is at capacity. Please retry shortly.", retry_after=1, code="gateway_overloaded"
)
_STOP_WAIT_SECONDS = 1.0  # for cancelled handlers, which only record their usage: milliseconds in practice
_WANTED_HEADERS = frozenset((b"host", b"authorization", b"content-length", b"x-request-id"))
_MAX_CACHED_HOSTS = 64


def reproducible() -> bool:
    """Whether Django's middleware would do to an API response exactly what this app does."""
    return (
        list(settings.MIDDLEWARE) == REPRODUCED_MIDDLEWARE
        and not settings.SECURE_SSL_REDIRECT
        and not settings.SECURE_HSTS_SECONDS
        and not settings.USE_X_FORWARDED_HOST
        and not settings.FORCE_SCRIPT_NAME
        and settings.ROOT_URLCONF == "gateway.urls"
    )


def _common_headers() -> list[tuple[bytes, bytes]]:
    """Headers the middleware adds to every API response (XFrameOptions, then Security)."""
    headers = [(b"X-Frame-Options", settings.X_FRAME_OPTIONS.encode())]
    if settings.SECURE_CONTENT_TYPE_NOSNIFF:
        headers.append((b"X-Content-Type-Options", b"nosniff"))
    if settings.SECURE_REFERRER_POLICY:
        policy = settings.SECURE_REFERRER_POLICY
        value = policy if isinstance(policy, str) else ",".join(policy)
        headers.append((b"Referrer-Policy", value.encode()))
    if settings.SECURE_CROSS_ORIGIN_OPENER_POLICY:
        headers.append((b"Cross-Origin-Opener-Policy", settings.SECURE_CROSS_ORIGIN_OPENER_POLICY.encode()))
    return headers


class InferenceApp:
    """ASGI app: the inference POSTs here, everything else to `fallback` (Django)."""

    def __init__(self, fallback: ASGIApp) -> None:
        self.fallback = fallback
        self.enabled = reproducible()
        if not self.enabled:
            logger.warning("MIDDLEWARE or security settings changed: inference requests take the Django path")
        self._after = _common_headers()
        self._hosts: dict[str, bool] = {}
        # Admission control counts what the worker holds, not how late its event loop runs: lateness
        # depends on the core's speed and its neighbours, and refusing a closed loop of clients (each
        # waits for its answer before asking again) only makes it ask again at once. Pending requests
        # are admitted and not yet answered: the work this worker owes. A stream stops being pending
        # once its response starts (it then costs a little per chunk over a long life), so open streams
        # count only against the in-flight bound, which caps sockets and memory.
        self._pending = 0
        self._in_flight = 0
        self._max_pending = settings.GATEWAY.MAX_PENDING_PER_WORKER
        self._max_in_flight = settings.GATEWAY.MAX_IN_FLIGHT_PER_WORKER
        self._ended: asyncio.Event | None = None  # set when the last admitted request ends, once stopping

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

    def _host_allowed(self, host: str) -> bool:
        """Django's Host check (HttpRequest.get_host), remembered for the few hosts a gateway sees."""
        allowed = self._hosts.get(host)
        if allowed is None:
            allowed_hosts = settings.ALLOWED_HOSTS
            if settings.DEBUG and not allowed_hosts:
                allowed_hosts = [".localhost", "127.0.0.1", "[::1]"]
            domain, _ = split_domain_port(host)
            allowed = bool(domain) and validate_host(domain, allowed_hosts)
            if len(self._hosts) < _MAX_CACHED_HOSTS:
                self._hosts[host] = allowed
        return allowed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        match = relay = None
        if self.enabled and scope["type"] == "http" and scope["method"] == "POST" and not scope.get("root_path"):
            match = INFERENCE_PATH.match(scope["path"])
            if match is None:
                relay = RELAY_PATH.match(scope["path"])
        if match is None and relay is None:
            await self.fallback(scope, receive, send)
            return
        headers: dict[bytes, str] = {}
        for name, value in scope["headers"]:
            if name in _WANTED_HEADERS:
                # Django joins repeated headers with a comma; so do we.
                text = value.decode("latin1")
                headers[name] = f"{headers[name]},{text}" if name in headers else text
        host = headers.get(b"host")
        length = headers.get(b"content-length", "0")
        if host is None or not self._host_allowed(host) or not length.isdigit():
            # No Host, a refused one, or a garbled length: Django's own answer, whatever it is.
            await self.fallback(scope, receive, send)
            return
        ids = RequestIds.of(headers.get(b"x-request-id", ""))
        if relay is not None:
            # Part of a stream already admitted: never shed, or the stream would fail instead of a new request.
            relaying = self._relay_message(relay["task_id"], headers, int(length), ids, receive, send)
            await self._guarded(relaying, send, ids)
            return
        assert match is not None
        if self._pending >= self._max_pending or self._in_flight >= self._max_in_flight:
            # Refused before any work, so that refusing stays cheap when the worker is saturated.
            await self._send_error(send, _OVERLOADED, ids)
            return
        admitted = _Admitted(self)
        try:
            await self._guarded(
                self._infer(match, headers, int(length), ids, receive, send, admitted), send, ids, admitted
            )
        finally:
            admitted.end()

    async def _guarded(
        self, handling: Awaitable[None], send: Send, ids: RequestIds, admitted: _Admitted | None = None
    ) -> None:
        """Run a request's handling; answer its errors in the envelope, as the ninja views do."""
        try:
            await handling
            return
        except _ClientGone:
            return  # the client left while sending: nobody to answer, as in Django
        except GatewayError as raised:
            error = raised
        except Exception:
            logger.exception("unhandled error in request %s", ids.gateway)
            message = f"The gateway hit an internal error. Quote request id {ids.gateway} when reporting it."
            error = GatewayError(message)
        if admitted is not None:
            admitted.answering()
        await self._send_error(send, error, ids)

    async def _infer(
        self,
        match: re.Match[str],
        headers: dict[bytes, str],
        length: int,
        ids: RequestIds,
        receive: Receive,
        send: Send,
        admitted: _Admitted,
    ) -> None:
        principal = await principal_from_token(bearer_token_of(headers.get(b"authorization", "")))
        limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
        too_big = InvalidRequest("The request body is too large.", status=413, code="request_too_large")
        if limit is not None and length > limit:
            raise too_big
        body = await _read_body(receive, limit)
        if limit is not None and len(body) > limit:
            raise too_big
        result = await inference_run(
            principal=principal,
            route=Route(match["route"]),
            raw_body=body,
            request_id=ids.gateway,
            client_request_id=ids.client,
            cluster=match["cluster"],
            framework=match["framework"],
        )
        admitted.answering()
        if isinstance(result, JsonResult):
            await self._send_json(send, 200, result.content, (), ids)
            return
        start_headers = [
            (b"Content-Type", b"text/event-stream"),
            (b"Cache-Control", b"no-cache"),
            (b"X-Accel-Buffering", b"no"),  # nginx must pass each event on at once
            *self._after,
            *_id_headers(ids),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": start_headers})
        await _relay_until_disconnect(result.events, receive, send)  # type: ignore[arg-type]

    async def _relay_message(
        self, task_id: str, headers: dict[bytes, str], length: int, ids: RequestIds, receive: Receive, send: Send
    ) -> None:
        await relay_deliver(
            task_id=task_id,
            authorization=headers.get(b"authorization", ""),
            content_length=length if b"content-length" in headers else None,
            read_body=lambda limit: _read_body(receive, limit),
        )
        # Django's HttpResponse(status=204) as the middleware leaves it, Content-Type included.
        await self._send(send, 204, b"", [(b"Content-Type", b"text/html; charset=utf-8")], ids)

    async def _send_json(self, send: Send, status: int, body: bytes, extra: Any, ids: RequestIds) -> None:
        await self._send(send, status, body, [(b"Content-Type", b"application/json"), *extra], ids)

    async def _send(self, send: Send, status: int, body: bytes, first: Any, ids: RequestIds) -> None:
        headers = [
            *first,
            self._after[0],
            (b"Content-Length", str(len(body)).encode()),
            *self._after[1:],
            *_id_headers(ids),
        ]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})

    async def _send_error(self, send: Send, error: GatewayError, ids: RequestIds) -> None:
        extra = [(name.encode("latin1"), value.encode("latin1")) for name, value in error.headers.items()]
        await self._send_json(send, error.status, error.body(), extra, ids)


def _id_headers(ids: RequestIds) -> list[tuple[bytes, bytes]]:
    return [(name.encode(), value.encode()) for name, value in ids.headers()]


class _Admitted:
    """An admitted inference request: pending until its answer starts, in flight until it ends.

    `answering` comes before the answer is sent, so a client that asks again as soon as it has its
    answer always finds its earlier request already counted out.
    """

    __slots__ = ("_app", "_pending")

    def __init__(self, app: InferenceApp) -> None:
        self._app = app
        self._pending = True
        app._pending += 1
        app._in_flight += 1

    def answering(self) -> None:
        if self._pending:
            self._pending = False
            self._app._pending -= 1

    def end(self) -> None:
        self.answering()
        app = self._app
        app._in_flight -= 1
        if not app._in_flight and app._ended is not None:
            app._ended.set()


class _ClientGone(Exception):
    """The client disconnected before its request was read."""


async def _read_body(receive: Receive, limit: int | None) -> bytes:
    """The request body, or its first bytes past `limit` (the caller refuses it: no need to read on)."""
    chunks = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        chunks.append(chunk)
        if not message.get("more_body", False) or (limit is not None and size > limit):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def _relay_until_disconnect(events: AsyncGenerator[bytes], receive: Receive, send: Send) -> None:
    """Send each SSE event as it comes; if the client leaves, cancel the relay so upstream is closed.

    This is what Django's handler does for a streaming response: the relay sees CancelledError, records
    the request as 499 and closes the upstream stream, which stops generation on the model server.
    """
    relay = asyncio.ensure_future(_send_events(events, send))
    watcher = asyncio.ensure_future(_wait_disconnect(receive))
    try:
        await asyncio.wait((relay, watcher), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        relay.cancel()  # a no-op once it has finished
        with contextlib.suppress(asyncio.CancelledError):
            await relay


async def _send_events(events: AsyncGenerator[bytes], send: Send) -> None:
    try:
        async for event in events:
            await send({"type": "http.response.body", "body": event, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
    except Exception:
        # The head is sent: no error response is possible any more, and the relay has recorded the outcome.
        logger.exception("sending a stream failed")
    finally:
        await events.aclose()


async def _wait_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
