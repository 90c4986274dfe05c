"""The parse stage: the request body, read within the size limit, checked against its route's descriptor."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson
from django.conf import settings
from pydantic import ValidationError

from resource_server.dispatch.base import UpstreamRequest
from resource_server.errors import ErrorCode, InvalidRequest
from resource_server.routes import RouteDescriptor

# Reads the body; given the size limit, it may stop once past it (the caller refuses the body then).
BodyReader = Callable[[int | None], Awaitable[bytes]]

# Pydantic names the union member it tried ("str", "list[str]", ...) in an error's location.
_UNION_BRANCH = re.compile(r"^(str|int|float|bool|none|list\[.*\]|dict\[.*\]|[a-z-]+\[.*\])$")


def body_too_large() -> InvalidRequest:
    return InvalidRequest("The request body is too large.", code=ErrorCode.REQUEST_TOO_LARGE)


async def body_read(*, content_length: int | None, read: BodyReader) -> bytes:
    """The body, refused with 413 past DATA_UPLOAD_MAX_MEMORY_SIZE: on its declared length before reading,
    and on what arrived (a client may send more than it declared)."""
    limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
    if limit is not None and content_length is not None and content_length > limit:
        raise body_too_large()
    body = await read(limit)
    if limit is not None and len(body) > limit:
        raise body_too_large()
    return body


@dataclass(frozen=True, slots=True)
class ParsedRequest:
    """A valid request body and the fields the gateway reads from it (the descriptor names them)."""

    body: dict[str, Any]
    model: str
    stream: bool
    include_usage: bool  # the client asked for the final usage chunk of a stream
    n: int
    max_tokens: int | None


def request_parse(descriptor: RouteDescriptor, raw: bytes) -> ParsedRequest:
    """Check the body as strictly as the route's schema says; 400 naming the field at fault otherwise."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise InvalidRequest("The request body is not valid JSON.", code=ErrorCode.INVALID_JSON) from None
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.", code=ErrorCode.INVALID_JSON)
    try:
        descriptor.request_schema.model_validate(body)
    except ValidationError as exc:
        raise _invalid_request(exc) from None
    fields = descriptor.fields
    stream = fields.stream is not None and body.get(fields.stream) is True
    options = body.get(fields.stream_options) if fields.stream_options else None
    return ParsedRequest(
        body=body,
        model=body[fields.model],
        stream=stream,
        include_usage=bool((options or {}).get("include_usage")),
        n=(body.get(fields.n) if fields.n else None) or 1,
        max_tokens=_first_present(body, fields.max_tokens),
    )


def _first_present(body: dict[str, Any], names: tuple[str, ...]) -> Any:
    for name in names:
        value = body.get(name)
        if value is not None:
            return value
    return None


def upstream_request(descriptor: RouteDescriptor, request: ParsedRequest, request_id: str) -> UpstreamRequest:
    """What the backend sends: the body unchanged, except that a stream always asks for its usage, so that
    the final token counts come from the model server (the relay hides that chunk if the client did not ask)."""
    options_field = descriptor.fields.stream_options
    if not request.stream or options_field is None:
        return UpstreamRequest(descriptor.route, request.body, request_id)
    options = request.body.get(options_field) or {}
    body = {**request.body, options_field: {**options, "include_usage": True}}
    return UpstreamRequest(descriptor.route, body, request_id)


def _invalid_request(exc: ValidationError) -> InvalidRequest:
    error = exc.errors(include_url=False)[0]
    param = ".".join(str(part) for part in error["loc"] if not _UNION_BRANCH.match(str(part)))
    if error["type"] == "missing":
        return InvalidRequest(
            f"Missing required parameter: '{param}'.", code=ErrorCode.MISSING_REQUIRED_PARAMETER, param=param
        )
    message = error["msg"].removeprefix("Value error, ")
    where = f"Invalid value for '{param}': " if param else ""
    return InvalidRequest(f"{where}{message}.", code=ErrorCode.INVALID_VALUE, param=param or None)
