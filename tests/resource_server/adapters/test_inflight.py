"""Requests in flight per endpoint: each worker's own count, and (with Redis) every worker's, read in the background."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import pytest

from resource_server.adapters.inflight import InFlight, SharedInFlight
from tests.servers import free_port
from tests.tcp_proxy import TcpProxy

REDIS_URL = os.environ.get("REDIS_URL", "")
needs_redis = pytest.mark.skipif(not REDIS_URL, reason="needs REDIS_URL pointing at Redis")


def test_a_worker_counts_its_requests_per_endpoint_until_they_end() -> None:
    counts = InFlight()
    for endpoint_id in (1, 1, 2):
        counts.begin(endpoint_id)
    assert (counts.load(1), counts.load(2), counts.load(3)) == (2, 1, 0)
    counts.end(1)
    counts.end(2)
    assert counts.mine() == {1: 1}


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def key() -> AsyncIterator[str]:
    """A hash of the test's own on the test's Redis database."""
    name = f"test:inflight:{uuid.uuid4().hex}"
    yield name
    from redis.asyncio import Redis

    client = Redis.from_url(REDIS_URL)
    await client.delete(name)
    await client.aclose()


@needs_redis
async def test_workers_add_each_others_published_counts_to_their_own(key: str) -> None:
    clock = Clock()
    one, two = (SharedInFlight(REDIS_URL, period=1, key=key, worker=name, clock=clock) for name in ("one", "two"))
    try:
        one.begin(5)
        one.begin(5)
        two.begin(6)
        await one.share()
        await two.share()
        assert (two.load(5), two.load(6)) == (2, 1)
        two.begin(5)  # its own count is live; the other's is as last read
        assert two.load(5) == 3
        await two.share()
        await one.share()
        assert (one.load(5), one.load(6)) == (3, 1)
    finally:
        await one.stop()
        await two.stop()


@needs_redis
async def test_a_worker_that_stopped_publishing_is_forgotten_after_three_periods(key: str) -> None:
    from redis.asyncio import Redis

    clock = Clock()
    crashed = SharedInFlight(REDIS_URL, period=1, key=key, worker="crashed", clock=clock)
    alive = SharedInFlight(REDIS_URL, period=1, key=key, worker="alive", clock=clock)
    crashed.begin(5)
    await crashed.share()  # ... and never again, nor stopped
    clock.now += 2.5
    await alive.share()
    assert alive.load(5) == 1, "a publication younger than three periods counts"
    clock.now += 1
    await alive.share()
    assert alive.load(5) == 0
    client = Redis.from_url(REDIS_URL)
    try:
        assert set(await client.hkeys(key)) == {b"alive"}, "the dead worker's field is deleted"
        assert 0 < await client.pttl(key) <= 3000, "the hash expires three periods after the last publication"
        await alive.stop()
        assert not await client.exists(key), "a stopped worker takes its field out"
    finally:
        await client.aclose()
        await crashed.stop()


async def test_without_redis_a_worker_counts_only_its_own() -> None:
    unreachable = SharedInFlight(f"redis://127.0.0.1:{free_port()}/0", period=1, worker="alone")
    unreachable.begin(5)
    await unreachable.share()  # logged, never raised: it runs in the background
    assert unreachable.load(5) == 1
    await unreachable.stop()


@needs_redis
async def test_during_a_redis_outage_the_last_read_counts_for_three_periods(key: str) -> None:
    address = urlsplit(REDIS_URL)
    proxy = TcpProxy((address.hostname or "127.0.0.1", address.port or 6379))
    proxy.restore()
    clock = Clock()
    through_proxy = f"redis://127.0.0.1:{proxy.port}{address.path}"
    other = SharedInFlight(REDIS_URL, period=1, key=key, worker="other", clock=clock)
    cut_off = SharedInFlight(through_proxy, period=1, key=key, worker="cut-off", clock=clock)
    try:
        other.begin(5)
        await other.share()
        cut_off.begin(5)
        await cut_off.share()
        assert cut_off.load(5) == 2
        proxy.cut()
        clock.now += 2.5
        await cut_off.share()
        assert cut_off.load(5) == 2, "the last read still counts"
        clock.now += 1
        await cut_off.share()
        assert cut_off.load(5) == 1, "then only its own requests"
        proxy.restore()
        await other.share()
        await cut_off.share()
        assert cut_off.load(5) == 2, "and the others' again once Redis is back"
    finally:
        proxy.cut()
        await other.stop()
        await cut_off.stop()
