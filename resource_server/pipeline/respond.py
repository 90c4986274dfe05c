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


async def stream_relay(
    stream: UpstreamStream, descriptor: RouteDescriptor, meter: Meter, *, client_wants_usage: bool
) -> AsyncGenerator[bytes, None]:
    """Relay upstream events one by one as they arrive; end as the route's streams end (`[DONE]`, or the
    final named event of the Responses and Messages streams).

    The usage chunk the gateway asked for is passed on only if the client asked for it too. A stream that
    fails after it began ends with an error event; a client that goes away makes it a 499.
    """
    status, error_code = 200, ""
    complete = False
    usage = descriptor.usage
    framing = descriptor.framing
    record = meter.record
    try:
        async for event in stream:
            if record.time_to_first_token_ms is None:
                meter.first_event()
            if framing.is_done(event):
                complete = True
                break
            usage_chunk = usage.event_chunk(event)
            if usage_chunk is not None:
                record.set_usage(usage.of_chunk(usage_chunk))
                if not client_wants_usage and usage.added_by_gateway(usage_chunk):
                    continue
            # A stream without [DONE] is complete at its final event; the upstream then ends it.
            complete = complete or framing.is_final(event)
            yield event
        if not complete:
            raise GatewayError("The model server ended the stream early.", code=ErrorCode.UPSTREAM_STREAM_TRUNCATED)
        if framing.done_event is not None:
            yield framing.done_event
    except GatewayError as error:
        status, error_code = error.status, error.code
        logger.warning("stream %s failed: %s", record.request_id, error.code)
        yield framing.error_event(error.body())
        if framing.done_event is not None:
            yield framing.done_event
    except (asyncio.CancelledError, GeneratorExit):
        # The client went away: closing the upstream stream (finally) stops generation on the server.
        status, error_code = 499, "client_disconnected"
        raise
    except Exception:
        status, error_code = 500, ErrorCode.INTERNAL_ERROR
        logger.exception("stream %s failed", record.request_id)
        yield framing.error_event(GatewayError("The gateway failed while relaying the stream.").body())
        if framing.done_event is not None:
            yield framing.done_event
    finally:
        try:
            await stream.aclose()
        finally:
            # The row is written even if closing the upstream fails (the request's outcome is already known).
            meter.finish(status=status, error_code=error_code)
