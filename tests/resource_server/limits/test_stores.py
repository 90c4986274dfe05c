"""The counter stores' contract: the same tests on the Redis store and on the database store.

Redis runs when REDIS_URL points at one (skipped otherwise); the database store runs on whatever the tests'
database is (SQLite by default, PostgreSQL with DATABASE_URL). Time is the caller's (`now`), so the tests move it
instead of waiting. Races run both within one event loop and across processes, each with its own connections.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from urllib.parse import urlsplit

import pytest
from django.db import connection

from resource_server.limits.base import Check, Kind, LimitStore, LimitStoreUnavailable, Verdict
from resource_server.limits.store_db import DatabaseLimitStore
from resource_server.limits.store_redis import RedisLimitStore
from tests.resource_server.limits.racers import Race, race
from tests.tcp_proxy import TcpProxy, proxy_to

REDIS_URL = os.environ.get("REDIS_URL", "")
needs_redis = pytest.mark.skipif(not REDIS_URL, reason="needs REDIS_URL pointing at Redis")

TTL = 60.0
NOW = 1_800_000_000.0  # the caller's clock: far from the real one, which the stores must not read
PERIOD_END = NOW + 86_400
# Each race is run this many times, and must be exact every time. The twenty rounds of each race are run
# through the real server, on both stores, by tests/e2e/test_limits.py; here five keep the database store's races
# (about 2 s a round on PostgreSQL) from costing CI two minutes.
ROUNDS = 5


class Seeds:
    """The budget seed: used tokens per counter key (0 unless set), and which keys were asked for."""

    def __init__(self) -> None:
        self.used: dict[str, int] = {}
        self.asked: list[str] = []

    async def __call__(self, check: Check) -> int:
        self.asked.append(check.key)
        return self.used.get(check.key, 0)


@pytest.fixture
def seeds() -> Seeds:
    return Seeds()


def _redis_cleanup(prefix: str) -> None:
    from redis import Redis

    client = Redis.from_url(REDIS_URL)
    keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


# The database store runs its queries in the ORM thread, outside any transaction of the test's: rows must be
# committed (and other processes must see them), so its tests are transactional.
STORES = [
    pytest.param("redis", marks=needs_redis),
    pytest.param("database", marks=pytest.mark.django_db(transaction=True)),
]


@pytest.fixture(params=STORES)
def store_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def store(store_kind: str, seeds: Seeds) -> AsyncIterator[LimitStore]:
    made: LimitStore
    if store_kind == "redis":
        prefix = f"test:limit:{uuid.uuid4().hex}:"
        made = RedisLimitStore(REDIS_URL, seed=seeds, ttl=TTL, timeout=2.0, prefix=prefix)
        yield made
        await made.aclose()
        _redis_cleanup(prefix)
    else:
        made = DatabaseLimitStore(seed=seeds, ttl=TTL)
        yield made
        await made.aclose()


def slots(key: str = "c", limit: int = 1) -> Check:
    return Check(key=key, kind=Kind.CONCURRENT, limit=limit, amount=1, label="concurrent requests")


def requests(key: str = "r", limit: int = 60, window: float = 60.0) -> Check:
    return Check(key=key, kind=Kind.REQUESTS, limit=limit, amount=1, window=window)


def tokens(amount: int, key: str = "t", limit: int = 1000, window: float = 60.0) -> Check:
    return Check(key=key, kind=Kind.TOKENS, limit=limit, amount=amount, window=window)


def budget(amount: int, key: str = "b", limit: int = 100) -> Check:
    return Check(key=key, kind=Kind.BUDGET, limit=limit, amount=amount, period_end=PERIOD_END)


async def reserve(store: LimitStore, *checks: Check, now: float = NOW, reservation: str = "") -> Verdict:
    return await store.reserve(reservation or uuid.uuid4().hex, checks, now=now)


# --- all or none ----------------------------------------------------------------------------------------------


async def test_a_refused_check_leaves_the_others_unconsumed(store: LimitStore, seeds: Seeds) -> None:
    seeds.used["b"] = 30
    refused = await reserve(store, slots(limit=1), tokens(1000), budget(80), now=NOW)
    assert not refused.admitted
    assert refused.refused == 2
    assert refused.retry_after == PERIOD_END - NOW
    # Neither the slot nor the tokens were taken: both can be had in full.
    admitted = await reserve(store, slots(limit=1), tokens(1000), now=NOW)
    assert admitted.admitted
    assert admitted.refused == -1
    assert [state.remaining for state in admitted.states] == [0, 0]


async def test_states_tell_what_is_left_of_every_check_and_when_it_is_whole_again(
    store: LimitStore, seeds: Seeds
) -> None:
    seeds.used["b"] = 40
    verdict = await reserve(store, slots(limit=3), requests(limit=60), tokens(250), budget(10), now=NOW)
    assert verdict.admitted
    concurrent, rate, token_rate, used = verdict.states
    assert (concurrent.remaining, concurrent.reset_seconds) == (2, 0.0)  # a slot is free: nothing to wait for
    assert (rate.remaining, rate.reset_seconds) == (59, 1.0)  # 1 request refills in 1 s at 60 per minute
    assert (token_rate.remaining, token_rate.reset_seconds) == (750, 15.0)  # 250 tokens at 1000 per minute
    assert (used.remaining, used.reset_seconds) == (50, PERIOD_END - NOW)


# --- concurrency ----------------------------------------------------------------------------------------------


@pytest.mark.slow  # 4,000 reserves: seconds of the database store's time, so not in `make test-fast`
async def test_200_concurrent_reserves_against_a_concurrency_limit_admit_exactly_the_limit(store: LimitStore) -> None:
    for round_ in range(ROUNDS):
        check = slots(key=f"c{round_}", limit=7)
        verdicts = await asyncio.gather(*(reserve(store, check) for _ in range(200)))
        assert sum(verdict.admitted for verdict in verdicts) == 7, f"round {round_}"
        refused = next(verdict for verdict in verdicts if not verdict.admitted)
        assert (refused.refused, refused.retry_after) == (0, 0.0)  # a slot: any request may end first
        assert refused.states[0].remaining == 0
        assert refused.states[0].reset_seconds == TTL  # the earliest lease's expiry: an upper bound


async def test_settling_releases_the_slot(store: LimitStore) -> None:
    check = slots(limit=1)
    assert (await reserve(store, check, reservation="first")).admitted
    assert not (await reserve(store, check)).admitted
    await store.settle("first", [check], used_tokens=0, now=NOW + 1)
    assert (await reserve(store, check, now=NOW + 1)).admitted


async def test_a_lease_not_refreshed_expires_after_the_ttl_and_its_slot_is_free_again(store: LimitStore) -> None:
    check = slots(limit=1)
    assert (await reserve(store, check, now=NOW, reservation="crashed")).admitted
    almost = await reserve(store, check, now=NOW + TTL - 1)
    assert not almost.admitted
    assert almost.states[0].reset_seconds == 1.0
    assert (await reserve(store, check, now=NOW + TTL, reservation="next")).admitted
    # The crashed worker's refresh, late, does not take the slot back.
    await store.refresh([(check.key, "crashed")], now=NOW + TTL + 1)
    await store.settle("next", [check], used_tokens=0, now=NOW + TTL + 2)
    assert (await reserve(store, check, now=NOW + TTL + 2)).admitted


async def test_a_refreshed_lease_outlives_the_ttl(store: LimitStore) -> None:
    check = slots(limit=1)
    other = slots(key="other", limit=1)
    assert (await reserve(store, check, other, now=NOW, reservation="long")).admitted
    await store.refresh([(check.key, "long"), (other.key, "long")], now=NOW + 50)
    later = await reserve(store, check, now=NOW + TTL + 1)
    assert not later.admitted
    assert later.states[0].reset_seconds == 49.0  # until the refreshed lease's expiry
    assert not (await reserve(store, other, now=NOW + TTL + 1)).admitted
    assert (await reserve(store, check, now=NOW + 50 + TTL)).admitted


# --- rates ----------------------------------------------------------------------------------------------------


async def test_requests_per_minute_refill_one_request_per_second(store: LimitStore) -> None:
    check = requests(limit=60, window=60)
    for _ in range(60):
        assert (await reserve(store, check, now=NOW)).admitted
    empty = await reserve(store, check, now=NOW)
    assert not empty.admitted
    assert (empty.refused, empty.retry_after) == (0, 1.0)
    assert (empty.states[0].remaining, empty.states[0].reset_seconds) == (0, 60.0)
    half = await reserve(store, check, now=NOW + 0.5)
    assert (half.admitted, half.retry_after) == (False, 0.5)
    assert (await reserve(store, check, now=NOW + 1)).admitted
    assert not (await reserve(store, check, now=NOW + 1)).admitted
    # A full minute later the bucket is full again, never fuller.
    full = await reserve(store, check, now=NOW + 1000)
    assert (full.admitted, full.states[0].remaining) == (True, 59)


async def test_tokens_per_minute_wait_for_the_tokens_the_request_needs(store: LimitStore) -> None:
    assert (await reserve(store, tokens(600), now=NOW)).admitted
    short = await reserve(store, tokens(600), now=NOW)
    assert not short.admitted
    assert short.retry_after == 12.0  # 200 tokens missing, at 1000 per minute
    assert short.states[0].remaining == 400
    assert not (await reserve(store, tokens(600), now=NOW + 11.9)).admitted
    assert (await reserve(store, tokens(600), now=NOW + 12)).admitted


async def test_a_request_larger_than_the_whole_limit_never_passes_and_says_so_with_no_retry(
    store: LimitStore,
) -> None:
    for check in (tokens(1001), budget(101)):
        verdict = await reserve(store, check, now=NOW)
        assert (verdict.admitted, verdict.refused, verdict.retry_after) == (False, 0, 0.0)


async def test_tokens_settle_to_what_was_used(store: LimitStore) -> None:
    assert (await reserve(store, tokens(600), now=NOW, reservation="small")).admitted
    assert not (await reserve(store, tokens(900), now=NOW)).admitted
    await store.settle("small", [tokens(600)], used_tokens=100, now=NOW)
    # 500 tokens came back: 900 fit now, at the same instant.
    assert (await reserve(store, tokens(900), now=NOW, reservation="big")).admitted
    await store.settle("big", [tokens(900)], used_tokens=1400, now=NOW)
    # It used 500 more than it reserved: the bucket is 500 below empty, so even one token waits 501 tokens' time.
    late = await reserve(store, tokens(1), now=NOW)
    assert (late.admitted, late.retry_after, late.states[0].remaining) == (False, 30.06, 0)
    assert not (await reserve(store, tokens(1), now=NOW + 30)).admitted
    assert (await reserve(store, tokens(1), now=NOW + 31)).admitted


async def test_requests_settle_changes_nothing(store: LimitStore) -> None:
    check = requests(limit=1)
    assert (await reserve(store, check, reservation="one")).admitted
    await store.settle("one", [check], used_tokens=0, now=NOW)
    assert not (await reserve(store, check)).admitted


# --- budgets --------------------------------------------------------------------------------------------------


@pytest.mark.slow  # 4,000 reserves: seconds of the database store's time, so not in `make test-fast`
async def test_200_concurrent_reserves_against_a_budget_admit_exactly_as_many_as_fit(
    store: LimitStore, seeds: Seeds
) -> None:
    for round_ in range(ROUNDS):
        check = budget(30, key=f"b{round_}", limit=1000)
        seeds.used[check.key] = 100
        verdicts = await asyncio.gather(*(reserve(store, check) for _ in range(200)))
        assert sum(verdict.admitted for verdict in verdicts) == (1000 - 100) // 30, f"round {round_}"


async def test_a_budget_settles_to_real_usage_and_may_go_over(store: LimitStore) -> None:
    for name in ("one", "two", "three"):
        assert (await reserve(store, budget(30), reservation=name)).admitted
    refused = await reserve(store, budget(30))
    assert (refused.admitted, refused.states[0].remaining) == (False, 10)
    await store.settle("one", [budget(30)], used_tokens=10, now=NOW)
    # 20 came back: 70 used, so 30 fit again.
    assert (await reserve(store, budget(30), reservation="four")).admitted
    await store.settle("two", [budget(30)], used_tokens=50, now=NOW)
    # It used 20 more than reserved: that is real usage, so the budget is over (120 of 100).
    over = await reserve(store, budget(0))
    assert (over.admitted, over.states[0].remaining, over.retry_after) == (False, 0, PERIOD_END - NOW)


async def test_a_missing_budget_counter_starts_from_its_seed_not_from_zero(store: LimitStore, seeds: Seeds) -> None:
    seeds.used["b"] = 80
    refused = await reserve(store, budget(30))
    assert (refused.admitted, refused.states[0].remaining) == (False, 20)
    assert seeds.asked == ["b"]
    assert (await reserve(store, budget(20))).admitted
    assert seeds.asked == ["b"]  # the counter is kept from then on


async def test_each_missing_budget_starts_from_its_own_seed(store: LimitStore, seeds: Seeds) -> None:
    seeds.used.update({"day": 10, "month": 70})
    verdict = await reserve(store, budget(20, key="month"), budget(20, key="day"), tokens(20))
    assert verdict.admitted
    assert [state.remaining for state in verdict.states] == [10, 70, 980]
    assert sorted(seeds.asked) == ["day", "month"]


# --- reservations -------------------------------------------------------------------------------------------


async def test_settling_what_was_not_reserved_is_harmless(store: LimitStore) -> None:
    checks = [slots(limit=1), tokens(1000), budget(1000, limit=1000)]
    assert (await reserve(store, *checks, reservation="real")).admitted
    for stranger in ("unknown", "real-refused"):
        await store.settle(stranger, checks, used_tokens=0, now=NOW)
    assert not (await reserve(store, *checks, reservation="real-refused")).admitted
    await store.settle("real-refused", checks, used_tokens=0, now=NOW)
    # Nothing came back: the slot is still held, the tokens and the budget still spent.
    for check in (slots(limit=1), tokens(1), budget(1, limit=1000)):
        assert not (await reserve(store, check)).admitted
    # Settled twice, a reservation gives back once.
    await store.settle("real", checks, used_tokens=400, now=NOW)
    await store.settle("real", checks, used_tokens=400, now=NOW)
    assert (await reserve(store, slots(limit=1), tokens(600), budget(600, limit=1000))).admitted
    assert not (await reserve(store, tokens(1))).admitted
    assert not (await reserve(store, budget(1, limit=1000))).admitted


async def test_reserving_again_under_the_same_reservation_counts_once(store: LimitStore) -> None:
    checks = [slots(limit=2), tokens(500), budget(50)]
    first = await reserve(store, *checks, reservation="retried")
    again = await reserve(store, *checks, reservation="retried")
    assert first.admitted and again.admitted
    assert [state.remaining for state in again.states] == [1, 500, 50]


async def test_checks_that_no_store_can_count_are_a_programming_error(store: LimitStore) -> None:
    with pytest.raises(ValueError, match="share the counter"):
        await reserve(store, tokens(1), tokens(2))
    with pytest.raises(ValueError, match="must be >= 0"):
        await reserve(store, budget(1, limit=-1))


async def test_a_limit_of_zero_admits_nothing_that_takes_something(store: LimitStore) -> None:
    refused = await reserve(store, budget(1, limit=0))
    assert (refused.admitted, refused.states[0].remaining) == (False, 0)


# --- across processes -----------------------------------------------------------------------------------------


@pytest.fixture(params=STORES)
def race_store(request: pytest.FixtureRequest) -> Iterator[dict[str, str]]:
    """Where the racing processes find the store: Redis (a prefix of this test's own), or this test database."""
    if request.param == "redis":
        prefix = f"test:limit:{uuid.uuid4().hex}:"
        yield {"store": "redis", "redis_url": REDIS_URL, "redis_prefix": prefix}
        _redis_cleanup(prefix)
    else:
        yield {"store": "database", "database": str(connection.settings_dict["NAME"])}


@pytest.mark.server
@pytest.mark.parametrize(("kind", "amount", "seed", "admits"), [("concurrent", 1, 0, 7), ("budget", 30, 100, 30)])
def test_processes_racing_for_one_limit_are_admitted_exactly_as_many_as_fit(
    race_store: dict[str, str], kind: str, amount: int, seed: int, admits: int
) -> None:
    # 3 processes x 67 requests at once, 20 rounds; a limit of 7 slots, or a budget of 1000 tokens with 100
    # used before the round, 30 per request: floor(900 / 30) = 30.
    processes = 3
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(processes), context.Queue()
    limit = 7 if kind == "concurrent" else 1000
    spec = Race(kind=kind, rounds=ROUNDS, requests=67, limit=limit, amount=amount, seed=seed, now=NOW, **race_store)
    racers = [context.Process(target=race, args=(spec, barrier, results)) for _ in range(processes)]
    for racer in racers:
        racer.start()
    try:
        reports = [results.get(timeout=300) for _ in racers]
    finally:
        for racer in racers:
            racer.join(30)
    assert all(isinstance(report, list) for report in reports), reports
    assert [sum(round_) for round_ in zip(*reports, strict=True)] == [admits] * ROUNDS
    assert all(racer.exitcode == 0 for racer in racers)


# --- Redis out of reach ---------------------------------------------------------------------------------------


@pytest.fixture
def redis_proxy() -> Iterator[TcpProxy]:
    with proxy_to(REDIS_URL, 6379) as tcp:
        yield tcp


@needs_redis
@pytest.mark.slow
@pytest.mark.parametrize("outage", ["cut", "stall"])
async def test_redis_out_of_reach_fails_reserve_within_the_timeout_and_the_store_recovers(
    redis_proxy: TcpProxy, seeds: Seeds, outage: str
) -> None:
    prefix = f"test:limit:{uuid.uuid4().hex}:"
    url = urlsplit(REDIS_URL)._replace(netloc=f"127.0.0.1:{redis_proxy.port}").geturl()
    store = RedisLimitStore(url, seed=seeds, ttl=TTL, timeout=0.5, prefix=prefix)
    try:
        checks = [slots(limit=5), tokens(10)]
        assert (await reserve(store, *checks, reservation="before")).admitted
        if outage == "cut":
            redis_proxy.cut()  # connections refused, open ones dropped
        else:
            redis_proxy.stall()  # connections open, nothing answered: a hung Redis or a lossy network
        # The generous guard only tells a hang from the store's own timeout (0.5 s per try).
        with pytest.raises(LimitStoreUnavailable):
            await asyncio.wait_for(reserve(store, *checks), 10)
        # Settling and refreshing do not raise: the lease expires and the tokens stay charged.
        await asyncio.wait_for(store.settle("before", checks, used_tokens=1, now=NOW), 10)
        await asyncio.wait_for(store.refresh([("c", "before")], now=NOW), 10)

        if outage == "cut":
            redis_proxy.restore()
        else:
            redis_proxy.resume()
        # The same store reconnects. After a cut nothing was counted twice; a stalled connection may still deliver
        # the commands that timed out once it flows again (a reserve then holds its slot until its lease expires).
        back = await reserve(store, *checks)
        assert back.admitted
        if outage == "cut":
            assert [state.remaining for state in back.states] == [3, 980]
    finally:
        await store.aclose()
        _redis_cleanup(prefix)


# --- Redis connections opened ahead ---------------------------------------------------------------------------


@needs_redis
async def test_warming_opens_the_connection_ahead_and_a_burst_shares_it(seeds: Seeds) -> None:
    """Opened by a burst instead, a busy worker's connects outlasted the timeout and rate limits failed open."""
    prefix = f"test:limit:{uuid.uuid4().hex}:"
    store = RedisLimitStore(REDIS_URL, seed=seeds, ttl=TTL, timeout=2.0, prefix=prefix)
    try:
        assert store._pipe()._connection is None
        await store.warm()
        opened = store._pipe()._connection
        assert opened is not None
        verdicts = await asyncio.gather(*(reserve(store, slots(limit=7)) for _ in range(200)))
        assert [verdict.admitted for verdict in verdicts].count(True) == 7
        assert store._pipe()._connection is opened, "every command of the burst went on the one connection"
    finally:
        await store.aclose()
        _redis_cleanup(prefix)


@needs_redis
async def test_warming_with_redis_out_of_reach_logs_and_does_not_raise(
    redis_proxy: TcpProxy, seeds: Seeds, caplog: pytest.LogCaptureFixture
) -> None:
    redis_proxy.cut()
    url = urlsplit(REDIS_URL)._replace(netloc=f"127.0.0.1:{redis_proxy.port}").geturl()
    store = RedisLimitStore(url, seed=seeds, ttl=TTL, timeout=0.5, prefix=f"test:limit:{uuid.uuid4().hex}:")
    try:
        await asyncio.wait_for(store.warm(), 10)
    finally:
        await store.aclose()
    assert "the connection was not opened ahead: Redis failed:" in caplog.text
