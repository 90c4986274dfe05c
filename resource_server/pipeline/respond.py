"""The respond stage: the model server's answer as the client gets it, JSON or a relayed event stream.

Both read the request's usage as the route's descriptor says and end in the meter stage.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

import orjson
from django.conf import settings

from resource_server.dispatch.base import UpstreamStream
from resource_server.errors import ErrorCode, GatewayError
from resource_server.pipeline.meter import Meter
from resource_server.routes import RouteDescriptor

logger = logging.getLogger(__name__)

DONE_EVENT = b"data: [DONE]\n\n"


@dataclass(frozen=True, slots=True)
class JsonResult:
    content: bytes


@dataclass(frozen=True, slots=True)
class StreamResult:
    events: AsyncGenerator[bytes, None]


def answer_json(content: bytes, descriptor: RouteDescriptor, meter: Meter) -> JsonResult:
    """The model server's JSON answer, unchanged; its usage goes to the meter."""
    reply = _json_or_none(content)
    meter.record.set_usage(descriptor.usage.of_answer(reply))
    if settings.GATEWAY.LOG_REQUEST_BODIES:
        meter.record.response_body = reply
    meter.finish(status=200)
    return JsonResult(content)


def _json_or_none(content: bytes) -> Any:
    try:
        return orjson.loads(content)
    except orjson.JSONDecodeError:
        return None


def _error_event(error: GatewayError) -> bytes:
    return b"data: " + error.body() + b"\n\n"


async def stream_relay(
    stream: UpstreamStream, descriptor: RouteDescriptor, meter: Meter, *, client_wants_usage: bool
) -> AsyncGenerator[bytes, None]:
    """Relay upstream events one by one as they arrive; always end with `[DONE]`.

    The usage chunk the gateway asked for is passed on only if the client asked for it too. A stream that
    fails after it began ends with an error event; a client that goes away makes it a 499.
    """
    status, error_code = 200, ""
    saw_done = False
    usage = descriptor.usage
    record = meter.record
    try:
        async for event in stream:
            if record.time_to_first_token_ms is None:
                meter.first_event()
            if event.startswith(DONE_EVENT[:12]):
                saw_done = True
                break
            usage_chunk = usage.event_chunk(event)
            if usage_chunk is not None:
                record.set_usage(usage.of_chunk(usage_chunk))
                if not client_wants_usage and not usage_chunk.get("choices"):
                    continue
            yield event
        if not saw_done:
            raise GatewayError("The model server ended the stream early.", code=ErrorCode.UPSTREAM_STREAM_TRUNCATED)
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
        status, error_code = 500, ErrorCode.INTERNAL_ERROR
        logger.exception("stream %s failed", record.request_id)
        yield _error_event(GatewayError("The gateway failed while relaying the stream."))
        yield DONE_EVENT
    finally:
        try:
            await stream.aclose()
        finally:
            # The row is written even if closing the upstream fails (the request's outcome is already known).
            meter.finish(status=status, error_code=error_code)
