"""The relay hubs: in-process always, Redis Streams when REDIS_URL is set (both behave the same)."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import AsyncIterator

import pytest
import redis

from resource_server.adapters.relay import (
    Delivery,
    InProcessRelayHub,
    RedisRelayHub,
    RelayError,
    RelayHub,
    RelayMessage,
)
from resource_server.errors import InvalidRequest

REDIS_URL = os.environ.get("REDIS_URL", "")


def event(text: str, seq: int = 0) -> RelayMessage:
    return RelayMessage(seq, events=(f"data: {text}\n\n".encode(),))


@pytest.fixture(params=["in-process", "redis"])
async def hub(request: pytest.FixtureRequest) -> AsyncIterator[RelayHub]:
    if request.param == "in-process":
        yield InProcessRelayHub(max_pending=3)
        return
    if not REDIS_URL:
        pytest.skip("needs REDIS_URL pointing at Redis")
    redis_hub = RedisRelayHub(REDIS_URL, max_pending=3)
    yield redis_hub
    await redis_hub.aclose()


async def test_messages_arrive_in_order_for_the_tokens_holder(hub: RelayHub) -> None:
    channel = await hub.open(lifetime=30)
    assert await hub.authorized(channel.task_id, channel.token)
    for n in range(2):
        assert await hub.append(channel.task_id, event(f"m{n}", n)) is Delivery.ACCEPTED

    assert await channel.read(1) == [event("m0", 0), event("m1", 1)]
    assert await hub.append(channel.task_id, event("m2", 2)) is Delivery.ACCEPTED
    assert await channel.read(1) == [event("m2", 2)]
    await channel.close()


async def test_a_blocked_reader_wakes_when_a_message_arrives(hub: RelayHub) -> None:
    channel = await hub.open(lifetime=30)
    reader = asyncio.create_task(channel.read(30))
    await asyncio.sleep(0.05)  # the reader is now blocked
    assert not reader.done()

    await hub.append(channel.task_id, event("hello"))

    assert await reader == [event("hello")]
    await channel.close()


async def test_a_read_that_times_out_returns_nothing(hub: RelayHub) -> None:
    channel = await hub.open(lifetime=30)
    assert await channel.read(0.05) == []
    assert await channel.read(0) == []
    await channel.close()


async def test_wrong_and_foreign_tokens_are_refused(hub: RelayHub) -> None:
    first, second = await hub.open(lifetime=30), await hub.open(lifetime=30)

    assert not await hub.authorized(first.task_id, second.token)
    assert not await hub.authorized(first.task_id, first.token + "x")
    assert not await hub.authorized(first.task_id, "")
    assert not await hub.authorized("0" * 32, first.token)
    assert first.token != second.token and first.task_id != second.task_id
    await first.close()
    await second.close()


async def test_closing_revokes_the_token_and_refuses_late_messages(hub: RelayHub) -> None:
    channel = await hub.open(lifetime=30)
    await channel.close()

    assert not await hub.authorized(channel.task_id, channel.token)
    assert await hub.append(channel.task_id, event("late")) is Delivery.GONE


async def test_the_token_expires_after_its_lifetime(hub: RelayHub) -> None:
    channel = await hub.open(lifetime=0.05)
    await asyncio.sleep(0.1)

    assert not await hub.authorized(channel.task_id, channel.token)
    assert await hub.append(channel.task_id, event("late")) is Delivery.GONE
    await channel.close()


async def test_a_reader_far_behind_makes_the_relay_push_back(hub: RelayHub) -> None:
    channel = await hub.open(lifetime=30)
    for n in range(3):
        await hub.append(channel.task_id, event(str(n), n))

    assert await hub.append(channel.task_id, event("one too many", 3)) is Delivery.FULL
    assert await channel.read(1) == [event("0", 0), event("1", 1), event("2", 2)]
    assert await channel.read(0) == []  # (Redis drops what was read in the next read's round trip)
    assert await hub.append(channel.task_id, event("3", 3)) is Delivery.ACCEPTED
    assert await channel.read(1) == [event("3", 3)]
    await channel.close()


async def test_a_message_from_another_threads_event_loop_reaches_the_reader(hub: RelayHub) -> None:
    channel = await hub.open(lifetime=30)
    reader = asyncio.create_task(channel.read(30))
    outcome: list[Delivery] = []

    async def post() -> None:
        outcome.append(await hub.append(channel.task_id, event("from afar")))
        if isinstance(hub, RedisRelayHub):
            await hub.aclose()

    thread = threading.Thread(target=asyncio.run, args=(post(),))
    thread.start()
    messages = await reader
    thread.join()

    assert outcome == [Delivery.ACCEPTED]
    assert messages == [event("from afar")]
    await channel.close()


@pytest.mark.skipif(not REDIS_URL, reason="needs REDIS_URL pointing at Redis")
async def test_redis_keys_expire_with_the_token_are_trimmed_as_read_and_go_on_close() -> None:
    hub = RedisRelayHub(REDIS_URL, max_pending=10)
    inspect = redis.Redis.from_url(REDIS_URL)
    channel = await hub.open(lifetime=30)
    token_key, stream_key, attempt_key = hub.keys(channel.task_id)
    await hub.append(channel.task_id, event("a", 0))
    await hub.append(channel.task_id, event("b", 1))

    assert 0 < inspect.pttl(token_key) <= 30_000
    assert 0 < inspect.pttl(stream_key) <= 30_000  # never outlives the token
    assert 0 < inspect.pttl(attempt_key) <= 30_000
    assert inspect.get(token_key) != channel.token.encode()  # only a digest is stored
    assert await channel.read(1) == [event("a", 0), event("b", 1)]
    assert await channel.read(0) == []
    assert inspect.xlen(stream_key) == 0  # what was read is deleted

    await channel.close()
    assert inspect.exists(token_key, stream_key, attempt_key) == 0
    inspect.close()
    await hub.aclose()


async def test_every_kind_of_message_is_read_as_it_was_appended(hub: RelayHub) -> None:
    # An event may end in more than the two newlines that close it; batches keep each event's own bytes.
    sent = [
        RelayMessage(0, events=(b"data: one\n\n", b"data: two\n\n\n", b"\ndata: three\n\n")),
        RelayMessage(1, error=RelayError(400, "vllm_rejected", "prompt too long: \u00e9")),
        RelayMessage(2, done=True),
    ]
    channel = await hub.open(lifetime=30)
    for message in sent:
        assert await hub.append(channel.task_id, message) is Delivery.ACCEPTED

    assert await channel.read(1) == sent
    await channel.close()


async def test_the_first_attempt_to_deliver_owns_the_stream_and_a_retried_run_is_superseded(hub: RelayHub) -> None:
    channel = await hub.open(lifetime=30)
    retried = RelayMessage(0, events=(b"data: other answer\n\n",), attempt="run-2")
    first = [RelayMessage(n, events=(f"data: {n}\n\n".encode(),), attempt="run-1") for n in range(2)]

    assert await hub.append(channel.task_id, first[0]) is Delivery.ACCEPTED
    assert await hub.append(channel.task_id, retried) is Delivery.SUPERSEDED
    assert await hub.append(channel.task_id, first[1]) is Delivery.ACCEPTED

    assert await channel.read(1) == first
    await channel.close()


async def test_a_function_without_attempt_ids_is_one_anonymous_attempt(hub: RelayHub) -> None:
    channel = await hub.open(lifetime=30)
    assert await hub.append(channel.task_id, event("a", 0)) is Delivery.ACCEPTED
    assert await hub.append(channel.task_id, event("b", 1)) is Delivery.ACCEPTED
    assert await channel.read(1) == [event("a", 0), event("b", 1)]
    await channel.close()


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (
            b'{"seq": 0, "events": ["data: a\\n\\n", "data: b\\n\\n"]}',
            RelayMessage(0, events=(b"data: a\n\n", b"data: b\n\n")),
        ),
        (b'{"seq": 7, "done": true}', RelayMessage(7, done=True)),
        (
            b'{"seq": 2, "attempt": "5119af4c73f2012d", "done": true}',
            RelayMessage(2, done=True, attempt="5119af4c73f2012d"),
        ),
        (
            b'{"seq": 1, "error": {"status": 504, "code": "vllm_timeout", "message": "slow"}}',
            RelayMessage(1, error=RelayError(504, "vllm_timeout", "slow")),
        ),
    ],
)
def test_a_relay_message_is_parsed_into_its_typed_form(body: bytes, expected: RelayMessage) -> None:
    assert RelayMessage.parse(body) == expected


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b'{"seq": -1, "done": true}', "seq"),
        (b'{"seq": 0, "events": ["data: no end"]}', "events"),
        (b'{"seq": 0, "events": ["data: a\\n\\ndata: b\\n\\n"]}', "events"),
        (b'{"seq": 0, "done": false}', "done"),
        (b'{"seq": 0, "error": {"status": "500", "code": "x", "message": "y"}}', "error"),
        (b'{"seq": 0, "done": true, "events": []}', None),
        (b'{"seq": 0, "attempt": 7, "done": true}', "attempt"),
        (b'{"seq": 0, "attempt": "' + b"x" * 65 + b'", "done": true}', "attempt"),
        (b'{"seq": 0, "attempt": "a", "done": true, "extra": 1}', None),
    ],
)
def test_a_malformed_relay_message_is_refused_with_what_is_wrong(body: bytes, param: str | None) -> None:
    with pytest.raises(InvalidRequest) as refused:
        RelayMessage.parse(body)
    assert refused.value.status == 400
    assert refused.value.param == param
