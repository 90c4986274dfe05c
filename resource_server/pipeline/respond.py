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

from resource_server.dispatch.base import UpstreamStream, json_or_none
from resource_server.errors import ErrorCode, GatewayError
from resource_server.pipeline.admit import Headers
from resource_server.pipeline.meter import Meter
from resource_server.pipeline.parse import ParsedRequest
from resource_server.routes import RouteDescriptor, UsageReader
from resource_server.services.usage import UsageRecord

logger = logging.getLogger(__name__)


# Not frozen: made for every request, and a frozen dataclass's __init__ costs 3x.
@dataclass(slots=True)
class JsonResult:
    content: bytes
    headers: Headers  # X-Gateway-Route, and the x-ratelimit-* headers of the caller's limits (Meter.answer_headers)


@dataclass(slots=True)
class StreamResult:
    events: AsyncGenerator[bytes, None]
    headers: Headers  # as JsonResult's (a held stream's route: its best candidate when the answer starts)


def answer_json(content: bytes, descriptor: RouteDescriptor, meter: Meter) -> JsonResult:
    """The model server's JSON answer, unchanged; its usage goes to the meter."""
    reply = json_or_none(content)
    meter.record.set_usage(descriptor.usage.of_answer(reply))
    if settings.GATEWAY.LOG_REQUEST_BODIES:
        meter.record.response_body = reply
    meter.finish(status=200)
    return JsonResult(content, meter.answer_headers())


@dataclass(frozen=True, slots=True)
class StreamWishes:
    """What the client asked of a stream's usage; the gateway always asks the model server for all of it."""

    include_usage: bool  # the final usage chunk
    continuous_usage: bool  # usage on every chunk (vLLM's continuous_usage_stats)
    one_choice: bool = False  # n == 1: a chunk's usage is the whole request's so far

    @classmethod
    def of(cls, request: ParsedRequest) -> StreamWishes:
        return cls(
            include_usage=request.include_usage,
            continuous_usage=request.continuous_usage,
            one_choice=request.n == 1,
        )


class ClientView:
    """Turns the stream the gateway asked for (usage on every chunk, then a usage chunk) back into the one the
    client asked for, and keeps the last usage seen so that a stream cut short is metered up to its last chunk.

    Without `include_usage` vLLM stamps `system_fingerprint` on each choice's finishing chunk instead of on the
    usage chunk; as the fingerprint arrives only with that usage chunk, finishing chunks (and what follows them)
    are held until it comes, normally at once (with several choices, until the last one finishes).
    """

    __slots__ = ("_choices", "_held", "_reader", "_record", "_wishes")

    def __init__(self, reader: UsageReader, record: UsageRecord, wishes: StreamWishes) -> None:
        self._reader = reader
        self._record = record
        self._wishes = wishes
        self._held: list[dict[str, Any] | bytes] = []  # a parsed finishing chunk, to stamp; bytes as they are
        self._choices: dict[object, int] = {}  # choice index -> its completion tokens so far

    def events(self, event: bytes) -> list[bytes]:
        """The events to send the client now for one upstream event."""
        if self._wishes.one_choice and not self._held:
            going_on = self._going_on(event)
            if going_on is not None:
                return going_on
        chunk = self._reader.event_chunk(event)
        if chunk is None:
            return self._pass(event)
        choices = chunk.get("choices")
        if not choices:  # the usage chunk that ends the stream: the model server's own totals
            self._record.set_usage(self._reader.of_chunk(chunk))
            if self._wishes.include_usage:
                return [*self._release(None), event]
            return self._release(chunk.get("system_fingerprint"))
        self._count(chunk, choices)
        finishing = not self._wishes.include_usage and _finishes(choices)
        if not self._wishes.continuous_usage:
            del chunk[self._reader.key]
            if not finishing and not self._held:
                return [_event(chunk)]
        if finishing:
            self._held.append(chunk)
            return []
        return self._pass(event if self._wishes.continuous_usage else _event(chunk))

    def flush(self) -> list[bytes]:
        """What is still held when the stream ends without a usage chunk (or fails)."""
        return self._release(None)

    def _going_on(self, event: bytes) -> list[bytes] | None:
        """Most chunks of a one-choice stream, without parsing them: the choice is not finishing and vLLM's
        usage object comes last, so only those bytes are read, and cut out if the client did not ask for them.
        None: any other event, which takes the full path. (Neither pattern can occur unescaped inside a string.)
        """
        at = event.rfind(b',"usage":{')
        if at < 0 or not event.endswith(b"}}\n\n") or b'"finish_reason":null' not in event:
            return None
        try:
            usage = orjson.loads(event[at + 9 : -3])
        except orjson.JSONDecodeError:
            return None  # the usage object was not last
        if not isinstance(usage, dict):
            return None
        self._record.set_usage(usage)
        return [event] if self._wishes.continuous_usage else [event[:at] + b"}\n\n"]

    def _pass(self, event: bytes) -> list[bytes]:
        if self._held:
            self._held.append(event)
            return []
        return [event]

    def _release(self, fingerprint: object) -> list[bytes]:
        held, self._held = self._held, []
        return [
            item if isinstance(item, bytes) else _event(_stamped(item, fingerprint) if fingerprint else item)
            for item in held
        ]

    def _count(self, chunk: dict[str, Any], choices: list[Any]) -> None:
        """The usage a cut stream is metered with: vLLM counts each choice's tokens on its own chunks."""
        usage = self._reader.of_chunk(chunk)
        if not isinstance(usage, dict) or len(choices) != 1 or not isinstance(choices[0], dict):
            self._record.set_usage(usage)
            return
        self._choices[choices[0].get("index")] = usage.get("completion_tokens") or 0
        completion = sum(self._choices.values())
        prompt = usage.get("prompt_tokens")
        total = prompt + completion if isinstance(prompt, int) else None
        self._record.set_usage({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": total})


class PassThroughView:
    """The stream of a route whose `stream_options` the gateway does not touch (Responses, Anthropic Messages):
    every event goes to the client as it came; the usage its events carry is metered, the last one winning."""

    __slots__ = ("_reader", "_record")

    def __init__(self, reader: UsageReader, record: UsageRecord) -> None:
        self._reader = reader
        self._record = record

    def events(self, event: bytes) -> list[bytes]:
        chunk = self._reader.event_chunk(event)
        if chunk is not None:
            self._record.set_usage(self._reader.of_chunk(chunk))
        return [event]

    def flush(self) -> list[bytes]:
        return []


def _finishes(choices: list[Any]) -> bool:
    return any(isinstance(choice, dict) and choice.get("finish_reason") is not None for choice in choices)


def _stamped(chunk: dict[str, Any], fingerprint: object) -> dict[str, Any]:
    return {**chunk, "system_fingerprint": fingerprint}


def _event(chunk: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(chunk) + b"\n\n"


async def stream_relay(
    stream: UpstreamStream, descriptor: RouteDescriptor, meter: Meter, *, client: StreamWishes
) -> AsyncGenerator[bytes, None]:
    """Relay upstream events one by one as they arrive, as the client asked for them; end as the route's
    streams end (`[DONE]`, or the final named event of the Responses and Messages streams).

    A stream that fails after it began ends with an error event; a client that goes away makes it a 499.
    Either way the row carries the usage of the last chunk seen (see `ClientView`).
    """
    status, error_code = 200, ""
    complete = False
    framing = descriptor.framing
    record = meter.record
    view = (
        ClientView(descriptor.usage, record, client)
        if descriptor.fields.stream_options is not None
        else PassThroughView(descriptor.usage, record)
    )
    try:
        async for event in stream:
            if record.time_to_first_token_ms is None:
                meter.first_event()
            if framing.is_done(event):
                complete = True
                break
            for shaped in view.events(event):
                yield shaped
            # A stream without [DONE] is complete at its final event; the upstream then ends it.
            complete = complete or framing.is_final(event)
        for shaped in view.flush():
            yield shaped
        if not complete:
            raise GatewayError("The model server ended the stream early.", code=ErrorCode.UPSTREAM_STREAM_TRUNCATED)
        if framing.done_event is not None:
            yield framing.done_event
    except GatewayError as error:
        status, error_code = error.status, error.code
        logger.warning("stream %s failed: %s", record.request_id, error.code)
        for shaped in view.flush():
            yield shaped
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
        for shaped in view.flush():
            yield shaped
        yield framing.error_event(GatewayError("The gateway failed while relaying the stream.").body())
        if framing.done_event is not None:
            yield framing.done_event
    finally:
        try:
            await stream.aclose()
        finally:
            # The row is written even if closing the upstream fails (the request's outcome is already known).
            meter.finish(status=status, error_code=error_code)
