"""The limiter's settling: a round trip to the store only when something changes."""

from __future__ import annotations

import uuid

import pytest

from resource_server.bootstrap import runtime
from resource_server.limits.base import Check, Kind
from resource_server.limits.limiter import LimitReservation

pytestmark = pytest.mark.django_db(transaction=True)

RUN = uuid.uuid4().hex  # counters outlive a test run in a shared Redis


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
