"""Run one inference request: validate, route, dispatch, relay, and record its usage."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import orjson
from django.conf import settings
from pydantic import ValidationError

from resource_server.auth.base import Principal
from resource_server.dispatch.base import Route, UpstreamRequest, UpstreamStream
from resource_server.dispatch.registry import backend_pool
from resource_server.errors import GatewayError, InvalidRequest
from resource_server.schemas import REQUEST_SCHEMAS
from resource_server.selectors.endpoints import endpoint_resolve
from resource_server.services.usage import UsageRecord, usage_sink

logger = logging.getLogger(__name__)

DONE_EVENT = b"data: [DONE]\n\n"
# Pydantic names the union member it tried ("str", "list[str]", ...) in an error's location.
_UNION_BRANCH = re.compile(r"^(str|int|float|bool|none|list\[.*\]|dict\[.*\]|[a-z-]+\[.*\])$")


@dataclass(frozen=True, slots=True)
class JsonResult:
    content: bytes


@dataclass(frozen=True, slots=True)
class StreamResult:
    events: AsyncIterator[bytes]


def _parse_body(raw: bytes, route: Route) -> dict[str, Any]:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise InvalidRequest("The request body is not valid JSON.", code="invalid_json") from None
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.", code="invalid_json")
    try:
        REQUEST_SCHEMAS[route].model_validate(body)
    except ValidationError as exc:
        raise _invalid_request(exc) from None
    return body


def _invalid_request(exc: ValidationError) -> InvalidRequest:
    error = exc.errors(include_url=False)[0]
    param = ".".join(str(part) for part in error["loc"] if not _UNION_BRANCH.match(str(part)))
    if error["type"] == "missing":
        return InvalidRequest(f"Missing required parameter: '{param}'.", code="missing_required_parameter", param=param)
    message = error["msg"].removeprefix("Value error, ")
    where = f"Invalid value for '{param}': " if param else ""
    return InvalidRequest(f"{where}{message}.", code="invalid_value", param=param or None)


def _error_event(error: GatewayError) -> bytes:
    return b"data: " + error.body() + b"\n\n"


async def inference_run(
    *,
    principal: Principal,
    route: Route,
    raw_body: bytes,
    request_id: str,
    client_request_id: str = "",
    cluster: str | None = None,
    framework: str | None = None,
) -> JsonResult | StreamResult:
    """Answer one OpenAI request for `principal`; every outcome leaves exactly one usage record."""
    started = time.perf_counter()
    record = UsageRecord(
        request_id=request_id,
        client_request_id=client_request_id,
        user_id=principal.user_id,
        api_key_id=principal.api_key_id,
        route=route.value,
    )
    try:
        body = _parse_body(raw_body, route)
        record.model = body["model"]
        record.streamed = route is not Route.EMBEDDINGS and body.get("stream") is True
        if settings.GATEWAY.LOG_REQUEST_BODIES:
            record.request_body = body
        target = await endpoint_resolve(principal=principal, model=body["model"], cluster=cluster, framework=framework)
        record.endpoint_id = target.id
        backend = backend_pool.get(target.id, target.backend, target.config)
        usage_sink.opened(record)  # from here a worker crash could cut it: the next start records it lost
        if record.streamed:
            client_wants_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            # Always ask for usage so the final token counts come from the model server.
            upstream_body = {**body, "stream_options": {**(body.get("stream_options") or {}), "include_usage": True}}
            stream = await backend.open_stream(UpstreamRequest(route, upstream_body, request_id))
            return StreamResult(_relay(stream, record, started, client_wants_usage))
        content = await backend.submit(UpstreamRequest(route, body, request_id))
    except GatewayError as error:
        _finish(record, started, status=error.status, error_code=error.code)
        raise
    except BaseException:
        _finish(record, started, status=500, error_code="internal_error")
        raise
    reply = _json_or_none(content)
    if isinstance(reply, dict):
        record.set_usage(reply.get("usage"))
    if settings.GATEWAY.LOG_REQUEST_BODIES:
        record.response_body = reply
    _finish(record, started, status=200)
    return JsonResult(content)


def _json_or_none(content: bytes) -> Any:
    try:
        return orjson.loads(content)
    except orjson.JSONDecodeError:
        return None


def _finish(record: UsageRecord, started: float, *, status: int, error_code: str = "") -> None:
    record.status_code = status
    record.error_code = error_code
    record.latency_ms = (time.perf_counter() - started) * 1000
    usage_sink.record(record)


def _usage_of(event: bytes) -> dict[str, Any] | None:
    """The usage object of a stream chunk that carries one (cheap byte test before parsing)."""
    if b'"usage"' not in event or b'"usage":null' in event or b'"usage": null' in event:
        return None
    chunk = _json_or_none(event[6:].strip()) if event.startswith(b"data: ") else None
    if isinstance(chunk, dict) and isinstance(chunk.get("usage"), dict):
        return chunk
    return None


async def _relay(
    stream: UpstreamStream, record: UsageRecord, started: float, client_wants_usage: bool
) -> AsyncIterator[bytes]:
    """Relay upstream events one by one as they arrive; always end with `[DONE]`."""
    status, error_code = 200, ""
    saw_done = False
    try:
        async for event in stream:
            if record.time_to_first_token_ms is None:
                record.time_to_first_token_ms = (time.perf_counter() - started) * 1000
            if event.startswith(DONE_EVENT[:12]):
                saw_done = True
                break
            usage_chunk = _usage_of(event)
            if usage_chunk is not None:
                record.set_usage(usage_chunk["usage"])
                if not client_wants_usage and not usage_chunk.get("choices"):
                    continue
            yield event
        if not saw_done:
            raise GatewayError("The model server ended the stream early.", status=502, code="upstream_stream_truncated")
        yield DONE_EVENT
    except GatewayError as error:
        status, error_code = error.status, error.code
        logger.warning("stream %s failed: %s", record.request_id, error.code)
        yield _error_event(error)
        yield DONE_EVENT
    except (asyncio.CancelledError, GeneratorExit):
        # The client went away: closing the upstream stream (finally) stops generation on the server.
        status, error_code = 499, "client_disconnected"
        raise
    except Exception:
        status, error_code = 500, "internal_error"
        logger.exception("stream %s failed", record.request_id)
        yield _error_event(GatewayError("The gateway failed while relaying the stream."))
        yield DONE_EVENT
    finally:
        try:
            await stream.aclose()
        finally:
            # The row is written even if closing the upstream fails (the request's outcome is already known).
            _finish(record, started, status=status, error_code=error_code)
