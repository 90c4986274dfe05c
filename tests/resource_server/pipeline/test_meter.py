"""The meter stage (one usage row per outcome, the admit stage's reservation settled) and the respond stage."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import orjson
import pytest
from asgiref.sync import sync_to_async

from resource_server.auth.base import AuthKind, Principal
from resource_server.bootstrap import runtime
from resource_server.models import RequestLog
from resource_server.pipeline.admit import UNLIMITED, admit
from resource_server.pipeline.meter import Meter
from resource_server.pipeline.parse import request_parse
from resource_server.pipeline.respond import answer_json, stream_relay
from resource_server.routes import ROUTES, Route
from resource_server.services.usage import UsageRecord
from tests.conftest import Seeded

pytestmark = pytest.mark.django_db(transaction=True)

CHAT = ROUTES[Route.CHAT]
USAGE = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}


class Settled:
    """A reservation that remembers what it was settled with."""

    def __init__(self) -> None:
        self.records: list[UsageRecord] = []

    def settle(self, record: UsageRecord) -> None:
        self.records.append(record)


class Upstream:
    """An upstream stream over fixed events; `fail` raises after them, as a broken connection would."""

    def __init__(self, *events: bytes, fail: BaseException | None = None) -> None:
        self._events = events
        self._fail = fail
        self.closed = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for event in self._events:
            yield event
        if self._fail is not None:
            raise self._fail

    async def aclose(self) -> None:
        self.closed = True


def _meter(seeded: Seeded, request_id: str) -> tuple[Meter, Settled]:
    principal = Principal(seeded.user.pk, seeded.user.identity_id, seeded.user.username, AuthKind.API_KEY)
    meter = Meter(
        sink=runtime().usage_sink, principal=principal, route=Route.CHAT, request_id=request_id, client_request_id=""
    )
    meter.reservation = settled = Settled()
    return meter, settled


async def _row(request_id: str) -> RequestLog:
    assert await sync_to_async(runtime().usage_sink.flush)(timeout=10)
    return await RequestLog.objects.aget(request_id=request_id)


def _event(chunk: dict[str, object]) -> bytes:
    return b"data: " + orjson.dumps(chunk) + b"\n\n"


async def test_the_admit_stage_admits_every_request_for_now(seeded: Seeded) -> None:
    request = request_parse(CHAT, b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]}')
    principal = Principal(seeded.user.pk, seeded.user.identity_id, seeded.user.username, AuthKind.API_KEY)
    assert await admit(principal=principal, request=request, candidates=[]) is UNLIMITED


async def test_a_json_answer_leaves_one_row_with_its_usage_and_settles_once(seeded: Seeded) -> None:
    meter, settled = _meter(seeded, "meter-json-0001")
    meter.dispatching(seeded.endpoint.pk)
    answer = orjson.dumps({"choices": [], "usage": USAGE})
    assert answer_json(answer, CHAT, meter).content == answer
    row = await _row("meter-json-0001")
    assert (row.status_code, row.total_tokens, row.endpoint_id) == (200, 5, seeded.endpoint.pk)
    assert settled.records == [meter.record]


async def test_a_failover_names_the_endpoint_tried_last(seeded: Seeded) -> None:
    meter, settled = _meter(seeded, "meter-fail-0001")
    meter.dispatching(seeded.endpoint.pk + 100)
    meter.dispatching(seeded.endpoint.pk)
    meter.finish(status=503, error_code="upstream_unreachable")
    row = await _row("meter-fail-0001")
    assert (row.status_code, row.error_code, row.endpoint_id) == (503, "upstream_unreachable", seeded.endpoint.pk)
    assert len(settled.records) == 1


async def test_a_stream_hides_the_usage_chunk_not_asked_for_but_meters_it(seeded: Seeded) -> None:
    meter, settled = _meter(seeded, "meter-stream-01")
    usage = _event({"choices": [], "usage": USAGE})
    upstream = Upstream(_event({"choices": [{"delta": {"content": "hi"}}]}), usage, b"data: [DONE]\n\n")
    events = [event async for event in stream_relay(upstream, CHAT, meter, client_wants_usage=False)]
    assert events == [_event({"choices": [{"delta": {"content": "hi"}}]}), b"data: [DONE]\n\n"]
    assert upstream.closed
    row = await _row("meter-stream-01")
    assert (row.status_code, row.total_tokens) == (200, 5)
    assert row.time_to_first_token_ms is not None
    assert len(settled.records) == 1


async def test_a_stream_that_ends_early_gets_an_error_event_then_done(seeded: Seeded) -> None:
    meter, _ = _meter(seeded, "meter-trunc-001")
    upstream = Upstream(_event({"choices": [{"delta": {"content": "hi"}}]}))
    events = [event async for event in stream_relay(upstream, CHAT, meter, client_wants_usage=True)]
    assert orjson.loads(events[1][6:])["error"]["code"] == "upstream_stream_truncated"
    assert events[-1] == b"data: [DONE]\n\n"
    assert (await _row("meter-trunc-001")).status_code == 502


async def test_a_stream_the_client_leaves_is_a_499_and_closes_upstream(seeded: Seeded) -> None:
    meter, settled = _meter(seeded, "meter-gone-0001")
    upstream = Upstream(_event({"choices": [{"delta": {"content": "hi"}}]}), fail=asyncio.CancelledError())
    relay = stream_relay(upstream, CHAT, meter, client_wants_usage=False)
    await relay.__anext__()
    with pytest.raises(asyncio.CancelledError):
        await relay.__anext__()
    assert upstream.closed
    row = await _row("meter-gone-0001")
    assert (row.status_code, row.error_code) == (499, "client_disconnected")
    assert len(settled.records) == 1
