"""The Backend seam: how the gateway hands a validated request to a model server."""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from resource_server.errors import MODEL_SERVER_4XX, ErrorCode, ServiceUnavailable, UpstreamError, UpstreamRefusal
from resource_server.routes import Route

logger = logging.getLogger(__name__)


class FormBody(Protocol):
    """A multipart/form-data body (the audio routes) on its way to the model server, read as it arrives."""

    @property
    def content_type(self) -> str:
        """The body's Content-Type, its boundary included."""
        ...

    @property
    def declared_length(self) -> int | None:
        """What the client said the body is long (Content-Length), if it did: a backend may refuse it at once."""
        ...

    def chunks(self) -> AsyncGenerator[bytes, None]:
        """The body's bytes for the model server, from the first; it can be read only once."""
        ...


@dataclass(frozen=True, slots=True)
class UpstreamRequest:
    route: Route
    body: dict[str, Any]  # the JSON body; for a form, the text fields the gateway read (the form goes as it came)
    request_id: str
    form: FormBody | None = None


@dataclass(frozen=True, slots=True)
class ComputeFacts:
    """What a Globus Compute endpoint's status says beyond online (its engine's report), for the status board:
    an endpoint online with no workers but tasks outstanding has asked its scheduler for a block."""

    online: bool | None  # None: the status could not be fetched
    workers: int | None = None
    outstanding_tasks: int | None = None  # tasks its engine holds, queued or running
    can_start: bool | None = None  # its engine may start a block (scaling on, max_blocks > 0); None: not said


@dataclass(frozen=True, slots=True)
class BackendHealth:
    ok: bool  # the model is expected to answer requests now
    detail: str
    # The model cards the server lists (vLLM's `GET /v1/models` items: max_model_len, root, parent...).
    models: tuple[dict[str, Any], ...] = ()
    compute: ComputeFacts | None = None  # globus_compute: its endpoint's status
    # False: the backend could not tell (e.g. Globus Compute's status service failed), which says nothing of
    # the model: the status board keeps the last reading it had, marked stale, rather than call it down.
    known: bool = True


def model_cards(listing: object) -> tuple[dict[str, Any], ...]:
    """The items of an OpenAI models list (`{"object": "list", "data": [...]}`) that are objects."""
    data = listing.get("data") if isinstance(listing, dict) else None
    return tuple(item for item in data if isinstance(item, dict)) if isinstance(data, list) else ()


class UpstreamStream(Protocol):
    """An opened upstream stream: yields complete SSE events (`data: ...\\n\\n`) as they arrive."""

    def __aiter__(self) -> AsyncIterator[bytes]: ...

    async def aclose(self) -> None: ...


class Backend(Protocol):
    async def submit(self, request: UpstreamRequest) -> bytes:
        """Send a non-streamed request; return the JSON body of a 2xx reply or raise UpstreamError."""
        ...

    async def open_stream(self, request: UpstreamRequest) -> UpstreamStream:
        """Start a streamed request; raise UpstreamError if the server refuses it before streaming."""
        ...

    async def health(self) -> BackendHealth: ...

    async def wake(self) -> None:
        """Ask a cold endpoint to start its model, if the backend can (Globus Compute: a task that makes the
        endpoint start a block); a no-op otherwise. Never raises: the cold path answers 503 either way."""
        ...

    async def aclose(self) -> None: ...


def json_or_none(content: bytes) -> Any:
    """A JSON document, or None if `content` is not one (a model server's answer is relayed either way)."""
    try:
        return orjson.loads(content)
    except orjson.JSONDecodeError:
        return None


class SseSplitter:
    """Cuts a byte stream into whole server-sent events, so each is relayed as soon as it is complete."""

    __slots__ = ("_pending",)

    def __init__(self) -> None:
        self._pending = b""

    def feed(self, chunk: bytes) -> list[bytes]:
        data = self._pending + chunk if self._pending else chunk
        if b"\r" in data:
            data = data.replace(b"\r\n", b"\n")
        *events, self._pending = data.split(b"\n\n")
        return [event + b"\n\n" for event in events if event]


def _error_body(content: bytes) -> tuple[str, bool]:
    """The message of an OpenAI, vLLM or FastAPI error body (empty if there is none), and whether the body is
    in OpenAI's envelope (a JSON object whose `error` is an object), the shape a client can read as it is."""
    try:
        body = orjson.loads(content)
    except orjson.JSONDecodeError:
        return "", False
    if not isinstance(body, dict):
        return "", False
    error = body.get("error")
    if isinstance(error, dict):
        message = error.get("message")
        return (message if isinstance(message, str) else ""), True
    for key in ("message", "detail"):
        if isinstance(body.get(key), str):
            return str(body[key]), False
    return "", False


# What vLLM (FastAPI) answers for a path it has no route for: vLLM registers only the routes of its model's
# kind, so embeddings on a generating model get this, where a missing model gets vLLM's own message.
ROUTE_NOT_FOUND_MESSAGE = "Not Found"

_CLIENT_ERROR_CODES = {
    400: ErrorCode.INVALID_REQUEST,
    404: ErrorCode.MODEL_NOT_FOUND,
    413: ErrorCode.REQUEST_TOO_LARGE,
    429: ErrorCode.RATE_LIMIT_EXCEEDED,
}


def upstream_error(status: int, content: bytes, *, model_server: str) -> UpstreamError | ServiceUnavailable:
    """What the caller gets when the model server answers `status`.

    The caller's own mistakes (4xx) reach them as that 4xx with the server's error body unchanged (vLLM's
    message, type, param and code), so that "prompt too long" is a 400 they can act on; a body not in OpenAI's
    envelope is put in it. Server failures become 502/503/504 without the server's internals, which are
    logged instead.
    """
    message, enveloped = _error_body(content)
    if status == 404 and message == ROUTE_NOT_FOUND_MESSAGE:
        not_served = UpstreamError(
            "The model's server does not serve this route.",
            status=404,
            error_type="invalid_request_error",
            code=ErrorCode.ROUTE_NOT_SERVED,
        )
        not_served.never_reached = True  # its server ran nothing: another endpoint of the model may serve it
        return not_served
    if status in MODEL_SERVER_4XX:
        code = _CLIENT_ERROR_CODES.get(status, ErrorCode.INVALID_REQUEST)
        if "maximum context length" in message or "context length" in message:
            code = ErrorCode.CONTEXT_LENGTH_EXCEEDED
        message = message or f"The model server rejected the request (HTTP {status})."
        if enveloped:
            return UpstreamRefusal(message, raw=content, status=status, code=code)
        return UpstreamError(message, status=status, error_type="invalid_request_error", code=code)
    logger.warning("model server %s answered HTTP %s: %s", model_server, status, message[:500])
    if status in (401, 403, 407):
        return UpstreamError(
            "The model server refused the gateway's credentials. Please tell the gateway administrators.",
            code=ErrorCode.UPSTREAM_AUTH_FAILED,
        )
    if status == 503:
        return ServiceUnavailable(
            "The model server is temporarily unavailable. Please retry shortly.",
            retry_after=5,
            code=ErrorCode.UPSTREAM_UNAVAILABLE,
        )
    if status == 504:
        return UpstreamError("The model server timed out.", code=ErrorCode.UPSTREAM_TIMEOUT)
    return UpstreamError(
        f"The model server failed (HTTP {status}). Please retry; if it persists, tell the administrators."
    )
