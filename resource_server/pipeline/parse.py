"""The parse stage: the request body, read within the size limit, and the few fields its route's descriptor
says the gateway reads. The model server decides what else is valid."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson
from django.conf import settings

from resource_server.dispatch.base import UpstreamRequest
from resource_server.errors import ErrorCode, InvalidRequest
from resource_server.routes import RouteDescriptor

if TYPE_CHECKING:
    from resource_server.pipeline.form import FormUpload

# Reads the body; given the size limit, it may stop once past it (the caller refuses the body then).
BodyReader = Callable[[int | None], Awaitable[bytes]]


class ClientGone(Exception):
    """The client disconnected before its request was read whole (a door's body reader raises it)."""


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
    """A request body (a JSON object) and the fields the gateway reads from it (the descriptor names them)."""

    body: dict[str, Any]
    model: str | None  # None: the body names none (a FIRST path may then choose the only one it serves)
    stream: bool
    include_usage: bool  # the client asked for the final usage chunk of a stream
    continuous_usage: bool  # ... and for usage on every chunk (vLLM's continuous_usage_stats)
    n: int  # at least 1: the model server refuses fewer
    max_tokens: int | None
    size: int = 0  # the body's bytes (a form's: 0), for the estimate of its prompt's tokens that limits reserve
    form: FormUpload | None = None  # a multipart body (audio), streamed on as it arrives; `body` has its fields


def request_parse(descriptor: RouteDescriptor, raw: bytes) -> ParsedRequest:
    """Read the few fields the gateway needs, coerced as vLLM's request models coerce them (pydantic's lax
    mode: `"true"` streams, `4.0` is 4); everything else is the model server's to judge.

    Refused here only what vLLM refuses too: a body that is not a JSON object, or a `model` that is not a
    string. A field the gateway reads but cannot make sense of (`"stream": "maybe"`) is left for the model
    server to refuse in its own words; the gateway then reads it as absent.
    """
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise InvalidRequest("The request body is not valid JSON.", code=ErrorCode.INVALID_JSON) from None
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.", code=ErrorCode.INVALID_JSON)
    fields = descriptor.fields
    model = body.get(fields.model)
    if model is not None and not isinstance(model, str):
        raise InvalidRequest(
            f"Invalid value for '{fields.model}': the model's name must be a string.",
            code=ErrorCode.INVALID_VALUE,
            param=fields.model,
        )
    stream = fields.stream is not None and lax_bool(body.get(fields.stream)) is True
    options = body.get(fields.stream_options) if fields.stream_options else None
    include_usage = continuous_usage = False
    if isinstance(options, dict):
        # vLLM's StreamOptions: include_usage defaults to true once stream_options is given.
        include_usage = lax_bool(options.get("include_usage", True)) is True
        continuous_usage = include_usage and lax_bool(options.get("continuous_usage_stats")) is True
    n = lax_int(body.get(fields.n)) if fields.n else None
    return ParsedRequest(
        body=body,
        model=model or None,
        stream=stream,
        include_usage=include_usage,
        continuous_usage=continuous_usage,
        n=n if n is not None and n >= 1 else 1,
        max_tokens=_first_present(body, fields.max_tokens),
        size=len(raw),
    )


# pydantic's lax mode, as vLLM's request models apply it to JSON bodies.
_TRUE_STRINGS = frozenset(("1", "on", "t", "true", "y", "yes"))
_FALSE_STRINGS = frozenset(("0", "off", "f", "false", "n", "no"))


def lax_bool(value: object) -> bool | None:
    """`value` as a pydantic `bool` field in lax mode reads it; None when absent, null or unreadable."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        lowered = value.lower()
        if lowered in _TRUE_STRINGS:
            return True
        if lowered in _FALSE_STRINGS:
            return False
    return None


def lax_int(value: object) -> int | None:
    """`value` as a pydantic `int` field in lax mode reads it (4.0 and "4" are 4); None when it cannot."""
    if isinstance(value, int):  # bool included: lax mode reads true as 1
        return int(value)
    if isinstance(value, float):
        return int(value) if value.is_integer() else None
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            return None
    return None


def _first_present(body: dict[str, Any], names: tuple[str, ...]) -> int | None:
    for name in names:
        value = lax_int(body.get(name))
        if value is not None:
            return value
    return None


def upstream_request(
    descriptor: RouteDescriptor, request: ParsedRequest, request_id: str, *, model: str | None = None
) -> UpstreamRequest:
    """What the backend sends: the client's body unchanged, except that

    - a stream always asks for usage on every chunk (`include_usage` and `continuous_usage_stats`), so that a
      stream cut short is metered to its last chunk; the relay gives the client the stream it asked for;
    - `model`, when the gateway chose it (a FIRST path whose body names none), is named.

    A form gets the same as form fields (pipeline/form.py), vLLM's flat `stream_include_usage` and
    `stream_continuous_usage_stats` for the stream options, and goes on as it arrives.
    """
    if request.form is not None:
        return _form_upstream(descriptor, request, request_id, model)
    body = request.body
    if model is not None:
        body = {**body, descriptor.fields.model: model}
    options_field = descriptor.fields.stream_options
    if request.stream and options_field is not None:
        options = body.get(options_field)
        if options is None or isinstance(options, dict):  # anything else is the model server's to refuse
            metered = {**(options or {}), "include_usage": True, "continuous_usage_stats": True}
            body = {**body, options_field: metered}
    return UpstreamRequest(descriptor.route, body, request_id)


def _form_upstream(
    descriptor: RouteDescriptor, request: ParsedRequest, request_id: str, model: str | None
) -> UpstreamRequest:
    assert request.form is not None
    name = descriptor.fields.model
    added: dict[str, str] = {}
    if model is not None:
        added[name] = model
    elif request.model is not None and request.model != request.form.fields.get(name):
        added[name] = request.model  # the registered name, where the form's differs only by case
    if request.stream:
        added.update(stream_include_usage="true", stream_continuous_usage_stats="true")
    request.form.add_fields(added)
    return UpstreamRequest(descriptor.route, {**request.body, **added}, request_id, form=request.form)
