"""What both counter stores share: the checks they accept, how long they remember things, and budget seeding.

The arithmetic of each `Kind` lives twice, in Python (store_db.py) and in Lua (store_redis.py), because the Redis
store must run it inside Redis to stay one round trip; the same contract tests hold both to the same answers.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from django.db import DatabaseError

from resource_server.limits.base import BudgetSeed, Check, Kind, LimitStoreUnavailable

# A reservation is remembered this long for its settle (a request running longer gets no tokens back: it stays
# charged its worst case). It makes settle apply once, and never for a reservation the store did not take.
RESERVATION_MEMORY_SECONDS = 86_400.0
# A budget's counter outlives its period by this much, so a request settling just after the period ended still
# finds it; then it goes (the daily rollup keeps the totals).
BUDGET_GRACE_SECONDS = 86_400.0
# How often one store asks for a budget's seed and finds the counter gone again before giving up: a counter
# outlives its period by a day, so only a clock a day off, or Redis evicting keys, ever takes a second round.
SEED_ROUNDS = 3


def checks_validate(checks: Sequence[Check]) -> None:
    """Refuse checks that no store could count: a programming error in the policy, never a client's."""
    keys = set()
    for check in checks:
        if not check.key:
            raise ValueError("a limit check needs a key")
        if check.key in keys:
            # Two checks on one counter would both be judged against its level before either took its amount.
            raise ValueError(f"two checks of one request share the counter {check.key!r}")
        keys.add(check.key)
        # A limit of 0 admits nothing that takes anything: an allocation outside its period.
        if check.limit < 0 or check.amount < 0:
            raise ValueError(f"limit check {check.key!r}: the limit and the amount must be >= 0")
        if check.kind in (Kind.REQUESTS, Kind.TOKENS) and not check.window > 0:
            raise ValueError(f"limit check {check.key!r}: a rate needs a window > 0")


async def budgets_seed(seed: BudgetSeed, checks: Sequence[Check]) -> list[int]:
    """The used tokens of each of these budgets, from `seed` (the usage rollup), all at once."""
    try:
        return list(await asyncio.gather(*(seed(check) for check in checks)))
    except DatabaseError as exc:
        # The rollup is in the database: without it a budget cannot be counted, whichever store holds it.
        raise LimitStoreUnavailable(f"cannot read used tokens to seed a budget: {type(exc).__name__}") from exc
