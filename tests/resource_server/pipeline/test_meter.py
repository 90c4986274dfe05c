"""The meter stage (one usage row per outcome, the admit stage's reservation settled) and the respond stage."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import orjson
import pytest
from asgiref.sync import sync_to_async

from resource_server.auth.base import AuthKind, Principal
from resource_server.bootstrap import runtime
from resource_server.errors import ErrorCode, UpstreamError
from resource_server.limits.policy import LimitRules
from resource_server.models import RequestLog
from resource_server.pipeline.admit import UNLIMITED, admit
from resource_server.pipeline.meter import Meter
from resource_server.pipeline.parse import request_parse
from resource_server.pipeline.respond import ClientView, StreamWishes, answer_json, stream_relay
from resource_server.routes import ROUTES, Route
from resource_server.services.usage import UsageRecord
from tests.conftest import Seeded

pytestmark = pytest.mark.django_db(transaction=True)

CHAT = ROUTES[Route.CHAT]
USAGE = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
NOTHING = StreamWishes(include_usage=False, continuous_usage=False)
FINAL_USAGE = StreamWishes(include_usage=True, continuous_usage=False)
EVERY_CHUNK = StreamWishes(include_usage=True, continuous_usage=True)


class Settled:
    """A reservation that remembers what it was settled with."""

    headers = ()

    def __init__(self) -> None:
        self.records: list[UsageRecord] = []

    def settle(self, record: UsageRecord) -> None:
        self.records.append(record)

    async def settled(self) -> None:
        return None


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
        sink=runtime().usage_sink,
        in_flight=runtime().in_flight,
        principal=principal,
        route=Route.CHAT,
        request_id=request_id,
        client_request_id="",
    )
    meter.reservation = settled = Settled()
    return meter, settled


async def _row(request_id: str) -> RequestLog:
    assert await sync_to_async(runtime().usage_sink.flush)(timeout=10)
    return await RequestLog.objects.aget(request_id=request_id)


def _event(chunk: dict[str, object]) -> bytes:
    return b"data: " + orjson.dumps(chunk) + b"\n\n"


async def test_the_admit_stage_reserves_nothing_when_no_limit_applies(seeded: Seeded) -> None:
    request = request_parse(CHAT, b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]}')
    principal = Principal(seeded.user.pk, seeded.user.identity_id, seeded.user.username, AuthKind.API_KEY)
    meter, _ = _meter(seeded, "meter-admit-0001")
    reservation = await admit(
        limiter=runtime().limiter,
        rules=LimitRules(),
        principal=principal,
        descriptor=CHAT,
        request=request,
        candidates=[],
        project="",
        record=meter.record,
    )
    assert reservation is UNLIMITED
    assert (reservation.headers, meter.record.project_id) == ((), None)


async def test_a_json_answer_leaves_one_row_with_its_usage_and_settles_once(seeded: Seeded) -> None:
    meter, settled = _meter(seeded, "meter-json-0001")
    meter.dispatching(seeded.endpoint.pk, "cluster=polaris; endpoint=1; reason=live,only")
    answer = orjson.dumps({"choices": [], "usage": USAGE})
    assert answer_json(answer, CHAT, meter).content == answer
    row = await _row("meter-json-0001")
    assert (row.status_code, row.total_tokens, row.endpoint_id) == (200, 5, seeded.endpoint.pk)
    assert settled.records == [meter.record]


async def test_a_failover_names_the_endpoint_tried_last_and_its_route(seeded: Seeded) -> None:
    meter, settled = _meter(seeded, "meter-fail-0001")
    first, last = seeded.endpoint.pk + 100, seeded.endpoint.pk
    meter.dispatching(first, f"cluster=aurora; endpoint={first}; reason=live,least_loaded")
    meter.not_taken()
    failed_over = f"cluster=polaris; endpoint={last}; reason=live,failover_from={first}"
    meter.dispatching(last, failed_over)
    meter.finish(status=503, error_code="upstream_unreachable")
    row = await _row("meter-fail-0001")
    assert (row.status_code, row.error_code, row.endpoint_id) == (503, "upstream_unreachable", last)
    assert row.gateway_route == failed_over
    assert len(settled.records) == 1


async def test_a_request_counts_in_flight_on_the_endpoint_it_is_at_until_it_ends(seeded: Seeded) -> None:
    in_flight = runtime().in_flight
    first, last = seeded.endpoint.pk + 100, seeded.endpoint.pk
    one, _ = _meter(seeded, "meter-load-0001")
    other, _ = _meter(seeded, "meter-load-0002")
    one.dispatching(first, "route")
    other.dispatching(first, "route")
    assert (in_flight.load(first), in_flight.load(last)) == (2, 0)
    one.not_taken()  # the first endpoint refused it before it ran: it goes on to the next
    one.dispatching(last, "route")
    assert (in_flight.load(first), in_flight.load(last)) == (1, 1)
    one.finish(status=200)
    other.finish(status=502, error_code="upstream_error")
    assert (in_flight.load(first), in_flight.load(last)) == (0, 0)
    assert in_flight.mine() == {}


async def test_a_stream_hides_the_usage_chunk_not_asked_for_but_meters_it(seeded: Seeded) -> None:
    meter, settled = _meter(seeded, "meter-stream-01")
    usage = _event({"choices": [], "usage": USAGE})
    upstream = Upstream(_event({"choices": [{"delta": {"content": "hi"}}]}), usage, b"data: [DONE]\n\n")
    events = [event async for event in stream_relay(upstream, CHAT, meter, client=NOTHING)]
    assert events == [_event({"choices": [{"delta": {"content": "hi"}}]}), b"data: [DONE]\n\n"]
    assert upstream.closed
    row = await _row("meter-stream-01")
    assert (row.status_code, row.total_tokens) == (200, 5)
    assert row.time_to_first_token_ms is not None
    assert len(settled.records) == 1


async def test_a_stream_that_ends_early_gets_an_error_event_then_done(seeded: Seeded) -> None:
    meter, _ = _meter(seeded, "meter-trunc-001")
    upstream = Upstream(_event({"choices": [{"delta": {"content": "hi"}}]}))
    events = [event async for event in stream_relay(upstream, CHAT, meter, client=FINAL_USAGE)]
    assert orjson.loads(events[1][6:])["error"]["code"] == "upstream_stream_truncated"
    assert events[-1] == b"data: [DONE]\n\n"
    assert (await _row("meter-trunc-001")).status_code == 502


async def test_a_stream_the_client_leaves_is_a_499_and_closes_upstream(seeded: Seeded) -> None:
    meter, settled = _meter(seeded, "meter-gone-0001")
    upstream = Upstream(_event({"choices": [{"delta": {"content": "hi"}}]}), fail=asyncio.CancelledError())
    relay = stream_relay(upstream, CHAT, meter, client=NOTHING)
    await relay.__anext__()
    with pytest.raises(asyncio.CancelledError):
        await relay.__anext__()
    assert upstream.closed
    row = await _row("meter-gone-0001")
    assert (row.status_code, row.error_code) == (499, "client_disconnected")
    assert len(settled.records) == 1


def _chunk(index: int, text: str, tokens: int, *, finish: str | None = None) -> dict[str, object]:
    """A chunk as vLLM streams it when asked for continuous_usage_stats (usage counts this choice's tokens)."""
    usage = {"prompt_tokens": 3, "total_tokens": 3 + tokens, "completion_tokens": tokens}
    return {"id": "c", "choices": [{"index": index, "text": text, "finish_reason": finish}], "usage": usage}


def _without_usage(chunk: dict[str, object]) -> dict[str, object]:
    return {key: value for key, value in chunk.items() if key != "usage"}


STREAM = (_chunk(0, " a", 1), _chunk(0, " b", 2), _chunk(0, " c", 3, finish="length"))
FINAL = {
    "id": "c",
    "choices": [],
    "usage": {**USAGE, "completion_tokens": 3, "total_tokens": 6},
    "system_fingerprint": "fp",
}


@pytest.mark.parametrize(
    ("wishes", "expected"),
    [
        # Without include_usage vLLM stamps the fingerprint on the finishing chunk and sends no usage at all.
        (NOTHING, [*map(_without_usage, STREAM[:2]), {**_without_usage(STREAM[2]), "system_fingerprint": "fp"}]),
        (FINAL_USAGE, [*map(_without_usage, STREAM), FINAL]),
        (EVERY_CHUNK, [*STREAM, FINAL]),
    ],
)
async def test_a_stream_reaches_the_client_as_vllm_would_send_it_for_what_the_client_asked(
    seeded: Seeded, wishes: StreamWishes, expected: list[dict[str, object]]
) -> None:
    meter, _ = _meter(seeded, f"meter-view-{wishes.include_usage:d}{wishes.continuous_usage:d}")
    upstream = Upstream(*map(_event, STREAM), _event(FINAL), b"data: [DONE]\n\n")
    events = [event async for event in stream_relay(upstream, CHAT, meter, client=wishes)]
    assert events[-1] == b"data: [DONE]\n\n"
    assert [orjson.loads(event[6:]) for event in events[:-1]] == expected
    row = await _row(meter.record.request_id)
    assert (row.prompt_tokens, row.completion_tokens, row.total_tokens) == (3, 3, 6)


async def test_a_stream_the_client_leaves_is_metered_to_its_last_chunk(seeded: Seeded) -> None:
    meter, _ = _meter(seeded, "meter-gone-0002")
    upstream = Upstream(*map(_event, STREAM[:2]), fail=asyncio.CancelledError())
    relay = stream_relay(upstream, CHAT, meter, client=NOTHING)
    assert orjson.loads((await relay.__anext__())[6:]) == _without_usage(STREAM[0])
    assert orjson.loads((await relay.__anext__())[6:]) == _without_usage(STREAM[1])
    with pytest.raises(asyncio.CancelledError):
        await relay.__anext__()
    row = await _row("meter-gone-0002")
    assert (row.status_code, row.prompt_tokens, row.completion_tokens, row.total_tokens) == (499, 3, 2, 5)


async def test_a_stream_cut_upstream_is_metered_per_choice_and_sends_what_it_held(seeded: Seeded) -> None:
    meter, _ = _meter(seeded, "meter-cut-00001")
    # Two choices: the first finishes (held for the fingerprint), the second goes on, then the server dies.
    chunks = (_chunk(0, " a", 1), _chunk(1, " x", 1), _chunk(0, " b", 2, finish="stop"), _chunk(1, " y", 2))
    cut = UpstreamError("The connection to the model server broke off.", code=ErrorCode.UPSTREAM_CONNECTION_FAILED)
    upstream = Upstream(*map(_event, chunks), fail=cut)
    events = [event async for event in stream_relay(upstream, CHAT, meter, client=NOTHING)]
    assert [orjson.loads(event[6:]) for event in events[:4]] == list(map(_without_usage, chunks))
    assert orjson.loads(events[4][6:])["error"]["code"] == "upstream_connection_failed"
    row = await _row("meter-cut-00001")
    assert (row.status_code, row.prompt_tokens, row.completion_tokens, row.total_tokens) == (502, 3, 4, 7)


def _vllm_chunk(tokens: int, *, finish: str | None = None, choices: bool = True) -> bytes:
    # vLLM's shape: compact JSON, the usage object last.
    body = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "choices": [{"index": 0, "delta": {"content": f" w{tokens}"}, "finish_reason": finish}] if choices else [],
        "usage": {"prompt_tokens": 5, "total_tokens": 5 + tokens, "completion_tokens": tokens},
    }
    if not choices:
        body["system_fingerprint"] = "fp-1"
    return b"data: " + orjson.dumps(body) + b"\n\n"


@pytest.mark.parametrize("asked", [NOTHING, FINAL_USAGE, EVERY_CHUNK])
def test_one_choice_chunks_cut_by_their_bytes_equal_the_parsed_path(asked: StreamWishes) -> None:
    upstream = [_vllm_chunk(1), _vllm_chunk(2), _vllm_chunk(3, finish="length"), _vllm_chunk(3, choices=False)]
    seen = []
    for one_choice in (False, True):
        wishes = StreamWishes(asked.include_usage, asked.continuous_usage, one_choice=one_choice)
        record = UsageRecord(request_id="r", client_request_id="", user_id=1, api_key_id=None, route="chat")
        view = ClientView(ROUTES[Route.CHAT].usage, record, wishes)
        sent = [event for chunk in upstream for event in view.events(chunk)] + view.flush()
        seen.append(([orjson.loads(event[6:]) for event in sent], record.completion_tokens))
        cut = ClientView(ROUTES[Route.CHAT].usage, record, wishes)
        cut.events(_vllm_chunk(1))
        cut.events(_vllm_chunk(2))
        assert record.completion_tokens == 2, "a stream cut after two chunks is metered to them"
    assert seen[0] == seen[1]
    events, tokens = seen[1]
    assert tokens == 3
    assert all(("usage" in event) == asked.continuous_usage for event in events[:2])
