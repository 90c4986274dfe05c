"""What only the database store does: its counters are rows, and a row may be forgotten while a request runs."""

from __future__ import annotations

import pytest

from resource_server.limits.base import Check, Kind
from resource_server.limits.store_db import DatabaseLimitStore
from resource_server.models import LimitCounter

NOW = 1_800_000_000.0

# The store runs its queries in the ORM thread, outside any transaction of the test's: rows must be committed.
pytestmark = pytest.mark.django_db(transaction=True)


async def _no_seed(check: Check) -> int:
    return 0


def tokens(amount: int) -> Check:
    return Check(key="t", kind=Kind.TOKENS, limit=1000, amount=amount, window=60.0)


async def test_a_bucket_forgotten_while_its_request_ran_is_charged_what_the_request_took_beyond_its_reservation() -> (
    None
):
    store = DatabaseLimitStore(seed=_no_seed, ttl=60.0)
    assert (await store.reserve("one", [tokens(100)], now=NOW)).admitted
    # A minute later the bucket is full again, and the tidy may delete its row.
    await LimitCounter.objects.filter(key="t").adelete()
    await store.settle("one", [tokens(100)], used_tokens=700, now=NOW + 60)
    # Full (1000), less the 600 taken beyond the 100 reserved.
    assert not (await store.reserve("big", [tokens(401)], now=NOW + 60)).admitted
    assert (await store.reserve("fits", [tokens(400)], now=NOW + 60)).admitted


async def test_tokens_given_back_to_a_forgotten_bucket_leave_it_full() -> None:
    store = DatabaseLimitStore(seed=_no_seed, ttl=60.0)
    assert (await store.reserve("one", [tokens(100)], now=NOW)).admitted
    await LimitCounter.objects.filter(key="t").adelete()
    await store.settle("one", [tokens(100)], used_tokens=10, now=NOW + 60)
    verdict = await store.reserve("all", [tokens(1000)], now=NOW + 60)
    assert verdict.admitted
    assert verdict.states[0].remaining == 0
