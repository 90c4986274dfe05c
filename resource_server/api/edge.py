"""The HTTP edge both doors share: the lean ASGI app (`api/fast.py`) and the ninja views write their answers here.

Request ids, how a GatewayError is answered (status, headers, OpenAI's envelope), the internal-error and 413
answers, the SSE response headers, the headers Django's middleware adds to an API response, and the
inference paths (from the route table), so that the two doors cannot drift apart.
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, MutableMapping
from typing import Any, NamedTuple

from django.conf import settings
from django.http import HttpResponse, HttpResponseBase, StreamingHttpResponse

from resource_server.errors import ErrorCode, GatewayError, NotFound
from resource_server.pipeline.admit import Headers as AnswerHeaders
from resource_server.routes import ROUTES

logger = logging.getLogger("resource_server.api")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
Headers = Iterable[tuple[bytes, bytes]]

API_PREFIX = "/resource_server/"
_ROUTES = "|".join(re.escape(descriptor.path) for descriptor in ROUTES.values())
# `POST /resource_server/v1/<route>` and FIRST's `POST /resource_server/<cluster>/<framework>/v1/<route>`.
INFERENCE_PATH = re.compile(rf"^/resource_server/(?:(?P<cluster>[^/]+)/(?P<framework>[^/]+)/)?v1/(?P<route>{_ROUTES})$")
# The scope key under which the admission wrapper (gateway/asgi.py) leaves its INFERENCE_PATH match of a
# POST (None: not an inference path), so that the lean door need not match the path again.
INFERENCE_MATCH = "gateway.inference_match"


def credential_header(authorization: str, x_api_key: str) -> str:
    """The Authorization header, or else an `x-api-key` header as a bearer credential.

    The stock `anthropic` client sends its key as `x-api-key` (with `api_key=`; `auth_token=` sends a bearer
    token), so a gateway key or Globus token works there too. Authorization wins when both are sent.
    """
    if authorization or not x_api_key:
        return authorization
    return f"Bearer {x_api_key}"


CLIENT_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{8,64}$")
JSON = "application/json"
SSE_HEADERS = (
    ("Content-Type", "text/event-stream"),
    ("Cache-Control", "no-cache"),
    ("X-Accel-Buffering", "no"),  # nginx must pass each event on at once
)


class RequestIds(NamedTuple):
    """The gateway's own id for a request (the usage row's key) and the client's X-Request-ID if it is sane.

    The client's id is never the key: a client reusing one id must still leave one row per request.
    """

    gateway: str
    client: str

    @classmethod
    def of(cls, offered: str) -> RequestIds:
        return cls(uuid.uuid4().hex, offered if CLIENT_REQUEST_ID.match(offered) else "")

    def headers(self) -> tuple[tuple[str, str], tuple[str, str]]:
        """X-Request-ID echoes the client's id (ours if it sent none); X-Gateway-Request-ID is always ours."""
        return ("X-Request-ID", self.client or self.gateway), ("X-Gateway-Request-ID", self.gateway)

    def raw_headers(self) -> list[tuple[bytes, bytes]]:
        return [(name.encode(), value.encode()) for name, value in self.headers()]


def rendered(error: GatewayError) -> tuple[int, list[tuple[str, str]], bytes]:
    """An error's answer: its status, its headers (Content-Type first) and OpenAI's envelope."""
    return error.status, [("Content-Type", JSON), *error.headers.items()], error.body()


def internal_error(request_id: str) -> GatewayError:
    """The answer to an exception nobody expected (logged here, with its traceback): no internals, the id."""
    logger.exception("unhandled error in request %s", request_id)
    return GatewayError(f"The gateway hit an internal error. Quote request id {request_id} when reporting it.")


def framework_error(status: int, allow: str | None) -> GatewayError:
    """What an error answer of Django or ninja (not ours: unknown route, wrong method) says in the envelope."""
    if status == 404:
        return NotFound("Unknown route. The API lives under /resource_server/v1/.", code=ErrorCode.UNKNOWN_ROUTE)
    if status == 405:
        return GatewayError(
            f"Method not allowed; use {allow or 'another method'}.",
            error_type="invalid_request_error",
            code=ErrorCode.METHOD_NOT_ALLOWED,
        )
    return GatewayError(
        "The request failed.", status=status, error_type="invalid_request_error", code=ErrorCode.REQUEST_FAILED
    )


# The ninja door.


def error_response(error: GatewayError) -> HttpResponse:
    status, headers, body = rendered(error)
    response = HttpResponse(body, status=status)
    for name, value in headers:
        response[name] = value
    return response


def as_envelope(response: HttpResponseBase) -> HttpResponseBase:
    """A framework's error answer on an API path, in the envelope (its Allow header kept)."""
    shaped = error_response(framework_error(response.status_code, response.get("Allow")))
    if "Allow" in response:
        shaped["Allow"] = response["Allow"]
    return shaped


def stream_response(events: AsyncIterator[bytes], headers: AnswerHeaders) -> StreamingHttpResponse:
    (_, content_type), *others = SSE_HEADERS
    response = StreamingHttpResponse(events, content_type=content_type)
    for name, value in (*others, *headers):
        response[name] = value
    return response


# The lean ASGI door, and the admission wrapper in front of both.


def common_headers() -> list[tuple[bytes, bytes]]:
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


_JSON_RAW = (b"Content-Type", JSON.encode())
_SSE_RAW = [(name.encode(), value.encode()) for name, value in SSE_HEADERS]


def _raw(headers: Iterable[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
    return [(name.encode("latin1"), value.encode("latin1")) for name, value in headers]


class AsgiAnswers:
    """Writes answers over ASGI with the headers and in the order Django's middleware gives them."""

    __slots__ = ("after",)

    def __init__(self) -> None:
        self.after = common_headers()  # read once: settings do not change in a running worker

    async def send(self, send: Send, status: int, body: bytes, first: Headers, ids: RequestIds) -> None:
        headers = [
            *first,
            self.after[0],
            (b"Content-Length", str(len(body)).encode()),
            *self.after[1:],
            *ids.raw_headers(),
        ]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})

    async def send_json(self, send: Send, body: bytes, ids: RequestIds, headers: AnswerHeaders) -> None:
        await self.send(send, 200, body, (_JSON_RAW, *_raw(headers)), ids)

    async def send_error(self, send: Send, error: GatewayError, ids: RequestIds) -> None:
        status, headers, body = rendered(error)
        await self.send(send, status, body, _raw(headers), ids)

    async def start_stream(self, send: Send, ids: RequestIds, headers: AnswerHeaders) -> None:
        raw = [*_SSE_RAW, *_raw(headers), *self.after, *ids.raw_headers()]
        await send({"type": "http.response.start", "status": 200, "headers": raw})
