"""The inference POSTs as a lean ASGI app: the hot path, without Django's per-request machinery.

Through Django's ASGI handler a request costs milliseconds of CPU before our view runs: a thread per
request for the sync middleware (two hops for each of them), body spooling, URL resolution. The inference
routes need none of it. This app serves exactly `POST /resource_server/v1/<route>` and the FIRST paths
`POST /resource_server/<cluster>/<framework>/v1/<route>` (the routes of `routes.py`) through the same
request pipeline as the ninja views (`pipeline/run.py`, authentication included), answering through the
same HTTP edge (`api/edge.py`: request ids, error envelope, response headers). It also serves the relay
route `POST /resource_server/internal/relay/<task_id>` (a compute function posts each batch of a stream's
events there, so it is as hot as the stream). Everything else (other methods and paths, a Host Django
would refuse) goes to Django unchanged. Overload shedding sits in front of this app and of Django
(`gateway/asgi.py`), so that it holds when this app is off.

It reproduces what the configured middleware does to these responses, so it checks at start-up that
MIDDLEWARE and the security settings are the ones it reproduces, and stays off otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncGenerator, AsyncIterator

from django.conf import settings
from django.http.request import split_domain_port, validate_host

from resource_server.api.edge import (
    INFERENCE_MATCH,
    INFERENCE_PATH,
    AsgiAnswers,
    ASGIApp,
    Receive,
    RequestIds,
    Scope,
    Send,
    credential_header,
    internal_error,
)
from resource_server.bootstrap import runtime
from resource_server.errors import GatewayError
from resource_server.pipeline.parse import ClientGone
from resource_server.pipeline.respond import JsonResult
from resource_server.pipeline.run import inference_run
from resource_server.routes import ROUTES, Route
from resource_server.services.relay import relay_deliver

logger = logging.getLogger("resource_server.api")

RELAY_PATH = re.compile(r"^/resource_server/internal/relay/(?P<task_id>[^/]+)$")
# The middleware whose effect on an API response this app reproduces (see edge.common_headers).
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
_WANTED_HEADERS = frozenset(
    (
        b"host",
        b"authorization",
        b"x-api-key",
        b"content-length",
        b"content-type",
        b"x-request-id",
        b"x-gateway-max-wait",
        b"openai-project",
    )
)
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


class InferenceApp:
    """ASGI app: the inference POSTs here, everything else to `fallback` (Django)."""

    def __init__(self, fallback: ASGIApp) -> None:
        self.fallback = fallback
        self.enabled = reproducible()
        if not self.enabled:
            logger.warning("MIDDLEWARE or security settings changed: inference requests take the Django path")
        self._answers = AsgiAnswers()
        self._hosts: dict[str, bool] = {}

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
            # Matched already by the admission wrapper in front (gateway/asgi.py), if there is one.
            match = scope[INFERENCE_MATCH] if INFERENCE_MATCH in scope else INFERENCE_PATH.match(scope["path"])
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
            handling = self._relay_message(relay["task_id"], headers, int(length), ids, receive, send)
        else:
            assert match is not None
            handling = self._infer(match, headers, int(length), ids, receive, send)
        try:
            await handling
        except ClientGone:
            return  # the client left while sending: nobody to answer, as in Django
        except GatewayError as error:
            await self._answers.send_error(send, error, ids)
        except Exception:
            await self._answers.send_error(send, internal_error(ids.gateway), ids)

    async def _infer(
        self,
        match: re.Match[str],
        headers: dict[bytes, str],
        length: int,
        ids: RequestIds,
        receive: Receive,
        send: Send,
    ) -> None:
        route = Route(match["route"])
        result = await inference_run(
            parts=runtime(),
            route=route,
            authorization=credential_header(headers.get(b"authorization", ""), headers.get(b"x-api-key", "")),
            content_length=length if b"content-length" in headers else None,
            read_body=lambda limit: _read_body(receive, limit),
            body_chunks=_body_chunks(receive),
            content_type=headers.get(b"content-type", ""),
            request_id=ids.gateway,
            client_request_id=ids.client,
            cluster=match["cluster"],
            framework=match["framework"],
            max_wait=headers.get(b"x-gateway-max-wait", ""),
            project=headers.get(b"openai-project", ""),
            # Once a JSON body is read, nothing else reads `receive`: a disconnect can be watched for there (a
            # form's body is still being read on its way to the model server, so its disconnect is not).
            client_gone=None if ROUTES[route].form else lambda: _wait_disconnect(receive),
        )
        if isinstance(result, JsonResult):
            await self._answers.send_json(send, result.content, ids, result.headers)
            return
        await self._answers.start_stream(send, ids, result.headers)
        await _relay_until_disconnect(result.events, receive, send)

    async def _relay_message(
        self, task_id: str, headers: dict[bytes, str], length: int, ids: RequestIds, receive: Receive, send: Send
    ) -> None:
        # Part of a stream already admitted: the admission wrapper never sheds it.
        await relay_deliver(
            hub=runtime().relay_hub,
            task_id=task_id,
            authorization=headers.get(b"authorization", ""),
            content_length=length if b"content-length" in headers else None,
            read_body=lambda limit: _read_body(receive, limit),
        )
        # Django's HttpResponse(status=204) as the middleware leaves it, Content-Type included.
        await self._answers.send(send, 204, b"", [(b"Content-Type", b"text/html; charset=utf-8")], ids)


async def _read_body(receive: Receive, limit: int | None) -> bytes:
    """The request body, or its first bytes past `limit` (the caller refuses it: no need to read on)."""
    chunks = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        chunks.append(chunk)
        if not message.get("more_body", False) or (limit is not None and size > limit):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def _body_chunks(receive: Receive) -> AsyncIterator[bytes]:
    """The request body as it arrives (the server reads the socket only as fast as these are taken)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        if chunk := message.get("body", b""):
            yield chunk
        if not message.get("more_body", False):
            return


async def _relay_until_disconnect(events: AsyncGenerator[bytes, None], receive: Receive, send: Send) -> None:
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


async def _send_events(events: AsyncGenerator[bytes, None], send: Send) -> None:
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
