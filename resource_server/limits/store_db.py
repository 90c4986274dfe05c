"""The limit counters in the database, for gateways without Redis: exact across workers, one transaction a step.

Rows (resource_server.models):

    LimitCounter(key=<check key>)   REQUESTS, TOKENS: `value` the bucket's level, `stamp` when it was computed
                                    BUDGET: `value` the tokens used in the period
                                    CONCURRENT: no count (its leases are), only the row each reserve locks
    LimitLease(key, reservation)    a CONCURRENT slot held until `expires_at` unless refreshed
    LimitLease(key="", reservation) the reservation was taken and not yet settled (RESERVATION_MEMORY_SECONDS)

A reserve locks the counter rows of all its checks before it reads them: on PostgreSQL with SELECT ... FOR
UPDATE in key order, so two requests sharing counters queue on the first one rather than deadlock. A counter
that does not exist yet (a limit's first request, or one forgotten since) is made outside the transaction, with
INSERT ... ON CONFLICT DO NOTHING (a budget's from its seed), and the reserve runs again: a transaction never
waits for a row insert while holding locks, so the common path is a transaction of four statements. On SQLite
every transaction of the gateway starts with BEGIN IMMEDIATE (settings: transaction_mode), which holds the
database's one write lock, so transactions run one at a time across processes and FOR UPDATE is not needed
(Django leaves it out there).

On PostgreSQL these transactions commit without waiting for their WAL to reach the disk (synchronous_commit
off, for them alone): a reserve then costs no disk flush. A PostgreSQL crash may lose the last fraction of a
second of counter moves (never corrupts them): budgets are then briefly under-counted, rates briefly refilled;
the usage rows, which are the record, are written with the usual guarantees.

Each step runs in the worker's ORM thread (db_run): a worker's limit checks queue there one after another, and
behind the other workers' holding the same counters. Times are the caller's clock (`now`), as in the Redis store.
Rows past their expiry are deleted now and then (`_tidy`), never while a reserve holds them.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable, Sequence
from typing import ParamSpec, TypeVar

from django.db import DatabaseError, connection, transaction
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
_MOVED = (Kind.TOKENS, Kind.BUDGET)  # what a settle moves by (used - amount)
# Expired rows are deleted at most this often by each store, in batches of at most _TIDY_BATCH rows.
_TIDY_SECONDS = 60.0
_TIDY_BATCH = 1000
# Rows of one refresh per statement: SQLite allows 32,766 parameters in one statement.
_REFRESH_BATCH = 1000


class DatabaseLimitStore:
    """`LimitStore` in the gateway's database. Database errors raise `LimitStoreUnavailable` (settle and refresh
    log them instead)."""

    settles_in_order = False  # a settle runs in the ORM thread: seen by others once committed

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
            budgets = [check for check in outcome if check.kind is Kind.BUDGET]
            used = await budgets_seed(self._seed, budgets)
            seeds = {check.key: tokens for check, tokens in zip(budgets, used, strict=True)}
            await _db(_create, outcome, seeds, now, ttl=self.ttl)
        raise LimitStoreUnavailable("limit counters vanished as soon as they were made")

    def _reserve(self, reservation: str, checks: Sequence[Check], now: float) -> Verdict | list[Check]:
        """The verdict, or the checks that have no counter yet (then nothing was changed)."""
        with transaction.atomic():
            _commit_without_flush()
            rows = {
                row.key: row
                for row in LimitCounter.objects.select_for_update()
                .filter(key__in=[check.key for check in checks])
                .order_by("key")
            }
            if len(rows) < len(checks):
                return [check for check in checks if check.key not in rows]
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
                    row = rows[check.key]
                    if check.kind is Kind.CONCURRENT:
                        leases.append(LimitLease(key=check.key, reservation=reservation, expires_at=now + self.ttl))
                        values[index] += 1
                        count, first = held.get(check.key, (0, math.inf))
                        held[check.key] = (count + 1, min(first, now + self.ttl))
                    elif check.kind is Kind.BUDGET:
                        row.value = values[index] = row.value + check.amount
                        changed.append(row)
                    else:
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

    def settle(
        self, reservation: str, checks: Sequence[Check], *, used_tokens: int, now: float
    ) -> asyncio.Future[None]:
        """Done once its transaction has committed."""
        return asyncio.get_running_loop().create_task(self._settle(reservation, checks, used_tokens, now))

    async def _settle(self, reservation: str, checks: Sequence[Check], used_tokens: int, now: float) -> None:
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


def _commit_without_flush() -> None:
    """This transaction's commit does not wait for the disk (PostgreSQL; see the module's docstring)."""
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SET LOCAL synchronous_commit = off")


def _create(checks: Sequence[Check], seeds: dict[str, int], now: float, *, ttl: float) -> None:
    """The counters of these checks, unless another request made them first: a bucket full, a budget at its
    seed (`seeds`: used tokens by key), a concurrency limit's row to lock."""
    rows = []
    for check in sorted(checks, key=lambda check: check.key):
        if check.kind is Kind.BUDGET:
            expires_at = max(check.period_end + BUDGET_GRACE_SECONDS, now + 1)
            rows.append(LimitCounter(key=check.key, value=seeds[check.key], expires_at=expires_at))
        elif check.kind is Kind.CONCURRENT:
            rows.append(LimitCounter(key=check.key, expires_at=now + ttl))  # goes when a lease would have
        else:
            rows.append(LimitCounter(key=check.key, value=check.limit, stamp=now, expires_at=now))  # full: may go
    LimitCounter.objects.bulk_create(rows, ignore_conflicts=True)


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


def _settle(reservation: str, checks: Sequence[Check], used: int, now: float) -> None:
    with transaction.atomic():
        _commit_without_flush()
        # Its slots, and the row that says it was reserved: none for a reservation refused, unknown or settled.
        known = LimitLease.objects.filter(reservation=reservation).delete()[0] > 0
        moved = sorted(
            (check for check in checks if check.kind in _MOVED and check.amount != used), key=lambda check: check.key
        )
        if not known or not moved:
            return
        # A bucket forgotten since it was full again is full: made so, then moved. (Inserted before any row is
        # locked, in key order, as reserves lock: waiting for another's insert never holds a lock it needs.)
        buckets = [check for check in moved if check.kind is Kind.TOKENS]
        if buckets:
            _create(buckets, {}, now, ttl=0.0)
        rows = LimitCounter.objects.select_for_update().filter(key__in=[check.key for check in moved]).order_by("key")
        found = {row.key: row for row in rows}
        changed = []
        for check in moved:
            row = found.get(check.key)
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
