"""The limiter's settling: a round trip to the store only when something changes."""

from __future__ import annotations

import asyncio
import os
import uuid

import pytest

from resource_server.bootstrap import runtime
from resource_server.limits.base import Check, Kind
from resource_server.limits.limiter import Limiter, LimitReservation
from resource_server.limits.store_redis import RedisLimitStore

pytestmark = pytest.mark.django_db(transaction=True)

RUN = uuid.uuid4().hex  # counters outlive a test run in a shared Redis
REDIS_URL = os.environ.get("REDIS_URL", "")


async def reserved(check: Check) -> LimitReservation:
    reservation = await runtime().limiter.reserve([check], {})
    assert isinstance(reservation, LimitReservation)
    return reservation


async def test_a_reservation_of_requests_only_or_used_as_reserved_is_not_settled() -> None:
    requests_only = await reserved(Check(f"r:{RUN}a", Kind.REQUESTS, 10, 1))
    exact = await reserved(Check(f"t:{RUN}b", Kind.TOKENS, 100, 30))
    fewer = await reserved(Check(f"t:{RUN}c", Kind.TOKENS, 100, 30))
    slot = await reserved(Check(f"c:{RUN}d", Kind.CONCURRENT, 1, 1))
    for reservation, used in ((requests_only, 5), (exact, 30), (fewer, 12), (slot, 0)):
        reservation.settle(used)
        await reservation.settled()
    assert [r._settled is not None for r in (requests_only, exact, fewer, slot)] == [False, False, True, True]
    assert isinstance(await runtime().limiter.reserve([slot.checks[0]], {}), LimitReservation), "the slot is back"


@pytest.mark.skipif(not REDIS_URL, reason="needs REDIS_URL pointing at Redis")
async def test_with_redis_only_a_tight_reservation_waits_for_its_settle_and_the_next_request_then_sees_it() -> None:
    """A JSON answer waits in `settled()`. With Redis the settle is sent before it, and waited for only when the
    caller's next request would not fit without it; that request may be reserved at once by another worker."""
    prefix = f"test:limit:{uuid.uuid4().hex}:"
    stores = [RedisLimitStore(REDIS_URL, seed=_no_seed, ttl=60, timeout=2.0, prefix=prefix) for _ in range(2)]
    this_worker, other_worker = Limiter(stores[0]), Limiter(stores[1])
    try:
        for rounds, (limit, tight) in enumerate(((1, True), (1_000, False)) * 50):
            slot = Check(f"c:{RUN}:{limit}", Kind.CONCURRENT, limit, 1)
            held = await this_worker.reserve([slot], {})
            assert isinstance(held, LimitReservation)
            assert held.tight is tight
            held.settle(0)
            settling = held._settled
            assert settling is not None
            await held.settled()
            assert settling.done() is tight, "only a tight reservation waits for the reply"
            following = await other_worker.reserve([slot], {})
            assert isinstance(following, LimitReservation), f"round {rounds}: the slot is back"
            following.settle(0)
            await asyncio.shield(following._settled)  # type: ignore[arg-type]  # set by settle
    finally:
        await this_worker.aclose()
        await other_worker.aclose()


async def _no_seed(check: Check) -> int:
    return 0
