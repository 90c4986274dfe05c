"""The limit counters in the database, for gateways without Redis: exact across workers, one transaction a step.

Rows (resource_server.models):

    LimitCounter(key=<check key>)   REQUESTS, TOKENS: `value` the bucket's level, `stamp` when it was computed
                                    BUDGET: `value` the tokens used in the period
                                    CONCURRENT: no count (its leases are), only the row each reserve locks
    LimitLease(key, reservation)    a CONCURRENT slot held until `expires_at` unless refreshed
    LimitLease(key="", reservation) the reservation was taken and not yet settled (RESERVATION_MEMORY_SECONDS)

A reserve locks the counter rows of all its checks before it reads them: on PostgreSQL it inserts the missing
ones (INSERT ... ON CONFLICT DO NOTHING), then takes them with SELECT ... FOR UPDATE, both in key order, so two
requests sharing counters queue on the first one rather than deadlock. On SQLite every transaction of the
gateway starts with BEGIN IMMEDIATE (settings: transaction_mode), which holds the database's one write lock, so
transactions run one at a time across processes and FOR UPDATE is not needed (Django leaves it out there).

Each step runs in the worker's ORM thread (db_run): a worker's limit checks queue there one after another, and
behind the other workers' holding the same counters. Times are the caller's clock (`now`), as in the Redis store.
Rows past their expiry are deleted now and then (`_tidy`), never while a reserve holds them.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import ParamSpec, TypeVar

from django.db import DatabaseError, transaction
from django.db.models import Count, Min, Q

from resource_server.db import db_run
from resource_server.limits.base import BudgetSeed, Check, CheckState, Kind, LimitStoreUnavailable, Verdict
from resource_server.limits.counting import (
    BUDGET_GRACE_SECONDS,
    RESERVATION_MEMORY_SECONDS,
    SEED_ROUNDS,
    budgets_seed,
    checks_validate,
)
from resource_server.models import LimitCounter, LimitLease

logger = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")

_MARKER = ""  # LimitLease.key of a reservation's own row: no check has an empty key
_BUCKETS = (Kind.REQUESTS, Kind.TOKENS)
# Expired rows are deleted at most this often by each store, in batches of at most _TIDY_BATCH rows.
_TIDY_SECONDS = 60.0
_TIDY_BATCH = 1000
# Rows of one refresh per statement: SQLite allows 32,766 parameters in one statement.
_REFRESH_BATCH = 1000


class DatabaseLimitStore:
    """`LimitStore` in the gateway's database. Database errors raise `LimitStoreUnavailable` (settle and refresh
    log them instead)."""

    def __init__(self, *, seed: BudgetSeed, ttl: float) -> None:
        self._seed = seed
        self.ttl = ttl
        self._tidy_after = 0.0

    async def reserve(self, reservation: str, checks: Sequence[Check], *, now: float) -> Verdict:
        checks_validate(checks)
        if not checks:
            return Verdict(admitted=True, states=())
        for _round in range(SEED_ROUNDS):
            outcome = await _db(self._reserve, reservation, checks, now)
            if isinstance(outcome, Verdict):
                if now >= self._tidy_after:
                    self._tidy_after = now + _TIDY_SECONDS
                    await _db(_tidy, now)
                return outcome
            missing = [checks[index] for index in outcome]
            used = await budgets_seed(self._seed, missing)
            await _db(_plant, missing, used, now)
        raise LimitStoreUnavailable("budget counters vanished as soon as they were seeded")

    def _reserve(self, reservation: str, checks: Sequence[Check], now: float) -> Verdict | list[int]:
        """The verdict, or the indexes of the budgets that have no counter (then nothing was changed)."""
        with transaction.atomic():
            rows = _lock(checks, now, ttl=self.ttl)
            missing = [i for i, check in enumerate(checks) if check.kind is Kind.BUDGET and check.key not in rows]
            if missing:
                return missing
            slots = [check.key for check in checks if check.kind is Kind.CONCURRENT]
            held: dict[str, tuple[int, float]] = {
                key: (count, first)
                for key, count, first in LimitLease.objects.filter(expires_at__gt=now)
                .filter(Q(key__in=slots) | Q(key=_MARKER, reservation=reservation))
                .values("key")
                .annotate(count=Count("id"), first=Min("expires_at"))
                .values_list("key", "count", "first")
            }
            taken = _MARKER in held  # a retried call: already reserved, count nothing again

            values: list[float] = []
            refused, retry = -1, 0.0
            for index, check in enumerate(checks):
                wait = 0.0
                if check.kind is Kind.CONCURRENT:
                    value: float = held.get(check.key, (0, 0.0))[0]
                    fits = value + check.amount <= check.limit
                elif check.kind is Kind.BUDGET:
                    value = rows[check.key].value
                    fits = value + check.amount <= check.limit
                    wait = check.period_end - now
                else:
                    value = _level(rows[check.key], check, now)
                    fits = value >= check.amount
                    wait = (check.amount - value) / _rate(check)
                values.append(value)
                if not fits and refused < 0:
                    refused = index
                    if check.kind is not Kind.CONCURRENT and check.amount <= check.limit:
                        retry = wait
            admitted = taken or refused < 0

            if admitted and not taken:
                leases = [LimitLease(key=_MARKER, reservation=reservation, expires_at=now + RESERVATION_MEMORY_SECONDS)]
                changed = []
                for index, check in enumerate(checks):
                    row = rows.get(check.key)
                    if check.kind is Kind.CONCURRENT:
                        leases.append(LimitLease(key=check.key, reservation=reservation, expires_at=now + self.ttl))
                        values[index] += 1
                        count, first = held.get(check.key, (0, math.inf))
                        held[check.key] = (count + 1, min(first, now + self.ttl))
                    elif check.kind is Kind.BUDGET:
                        assert row is not None
                        row.value = values[index] = row.value + check.amount
                        changed.append(row)
                    else:
                        assert row is not None
                        values[index] -= check.amount
                        _bucket_store(row, check, values[index], now)
                        changed.append(row)
                LimitLease.objects.bulk_create(leases)
                if changed:
                    LimitCounter.objects.bulk_update(changed, ["value", "stamp", "expires_at"])

        states = []
        for check, value in zip(checks, values, strict=True):
            if check.kind is Kind.CONCURRENT:
                remaining, reset = check.limit - value, 0.0
                if remaining <= 0 and check.key in held:
                    reset = held[check.key][1] - now
            elif check.kind is Kind.BUDGET:
                remaining, reset = check.limit - value, check.period_end - now
            else:
                remaining, reset = math.floor(value), (check.limit - value) / _rate(check)
            states.append(CheckState(remaining=max(int(remaining), 0), reset_seconds=_ms(reset)))
        if admitted:
            return Verdict(admitted=True, states=tuple(states))
        return Verdict(admitted=False, states=tuple(states), refused=refused, retry_after=_ms(retry))

    async def settle(self, reservation: str, checks: Sequence[Check], *, used_tokens: int, now: float) -> None:
        try:
            await _db(_settle, reservation, checks, used_tokens, now)
        except LimitStoreUnavailable as exc:
            logger.warning("limit store (database) failed settling a reservation: %s", exc)

    async def refresh(self, leases: Sequence[tuple[str, str]], *, now: float) -> None:
        try:
            await _db(_refresh, leases, now, self.ttl)
        except LimitStoreUnavailable as exc:
            logger.warning("limit store (database) failed renewing %d leases: %s", len(leases), exc)

    async def warm(self) -> None:
        """Nothing to open: the connections are the ORM thread's."""

    async def aclose(self) -> None:
        """Nothing to close: the connections are the ORM thread's."""


async def _db(function: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
    try:
        return await db_run(function, *args, **kwargs)
    except DatabaseError as exc:
        raise LimitStoreUnavailable(f"the database failed: {type(exc).__name__}") from exc


def _lock(checks: Sequence[Check], now: float, *, ttl: float) -> dict[str, LimitCounter]:
    """The counter rows of these checks, locked until the transaction ends, the missing ones made first (but
    budgets': they need a seed). A row deleted between the insert and the lock (it had expired) is made again."""
    made = sorted((check for check in checks if check.kind is not Kind.BUDGET), key=lambda check: check.key)
    for _attempt in range(3):
        if made:
            LimitCounter.objects.bulk_create(
                [
                    # A bucket starts full, so it may go at once; a lock row goes when a lease would have.
                    LimitCounter(key=check.key, value=check.limit, stamp=now, expires_at=now)
                    if check.kind in _BUCKETS
                    else LimitCounter(key=check.key, expires_at=now + ttl)
                    for check in made
                ],
                ignore_conflicts=True,
            )
        rows = {
            row.key: row
            for row in LimitCounter.objects.select_for_update()
            .filter(key__in=[check.key for check in checks])
            .order_by("key")
        }
        if all(check.key in rows for check in made):
            return rows
    raise LimitStoreUnavailable("limit counters vanished as soon as they were made")


# The bucket arithmetic is the Redis script's, operation for operation, so that both stores round alike.
def _rate(check: Check) -> float:
    return check.limit / check.window


def _level(row: LimitCounter, check: Check, now: float) -> float:
    """A bucket's level at `now`: refilled at limit/window per second since it was stored, up to the limit."""
    return min(check.limit, row.value + max(now - row.stamp, 0.0) * _rate(check))


def _bucket_store(row: LimitCounter, check: Check, level: float, now: float) -> None:
    row.value, row.stamp = level, now
    row.expires_at = now + (check.limit - level) / _rate(check)  # when it is full again


def _ms(seconds: float) -> float:
    """Whole milliseconds rounded up, never below 0, as the Redis store's script answers."""
    return max(math.ceil(seconds * 1000), 0) / 1000


def _plant(budgets: Sequence[Check], used: Sequence[int], now: float) -> None:
    """Each budget's counter, unless another request planted it first (its seed was read as recently)."""
    LimitCounter.objects.bulk_create(
        [
            LimitCounter(key=check.key, value=tokens, expires_at=max(check.period_end + BUDGET_GRACE_SECONDS, now + 1))
            for check, tokens in zip(budgets, used, strict=True)
        ],
        ignore_conflicts=True,
    )


def _settle(reservation: str, checks: Sequence[Check], used: int, now: float) -> None:
    with transaction.atomic():
        known = LimitLease.objects.filter(key=_MARKER, reservation=reservation, expires_at__gt=now).delete()[0] > 0
        LimitLease.objects.filter(reservation=reservation).delete()
        moved = [check for check in checks if check.kind in (Kind.TOKENS, Kind.BUDGET) and check.amount != used]
        if not known or not moved:
            return
        rows = _lock(moved, now, ttl=0.0)
        changed = []
        for check in moved:
            row = rows.get(check.key)
            if row is None:
                continue  # a budget whose counter went: its seed will read this request's usage instead
            if check.kind is Kind.BUDGET:
                row.value += used - check.amount
            else:
                _bucket_store(row, check, min(check.limit, _level(row, check, now) + check.amount - used), now)
            changed.append(row)
        if changed:
            LimitCounter.objects.bulk_update(changed, ["value", "stamp", "expires_at"])


def _refresh(leases: Sequence[tuple[str, str]], now: float, ttl: float) -> None:
    # By reservation: a request in flight has every lease it holds renewed, which is what the caller asks for.
    reservations = sorted({reservation for _key, reservation in leases})
    for start in range(0, len(reservations), _REFRESH_BATCH):
        LimitLease.objects.filter(
            reservation__in=reservations[start : start + _REFRESH_BATCH], expires_at__gt=now
        ).exclude(key=_MARKER).update(expires_at=now + ttl)


def _tidy(now: float) -> None:
    """Delete expired counters and leases. Rows a transaction holds are skipped (SKIP LOCKED), so this never waits
    for a reserve, nor deadlocks with one; the next round gets them."""
    with transaction.atomic():
        keys = list(
            LimitCounter.objects.select_for_update(skip_locked=True)
            .filter(expires_at__gt=0, expires_at__lt=now)
            .values_list("key", flat=True)[:_TIDY_BATCH]
        )
        if keys:
            LimitCounter.objects.filter(key__in=keys).delete()
    with transaction.atomic():
        ids = list(
            LimitLease.objects.select_for_update(skip_locked=True)
            .filter(expires_at__lte=now)
            .values_list("id", flat=True)[:_TIDY_BATCH]
        )
        if ids:
            LimitLease.objects.filter(id__in=ids).delete()
