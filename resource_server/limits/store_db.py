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
waits for a row insert while holding locks, so the common path is a transaction of four statements (lock and
read the counters, count the leases, one INSERT of its leases, one UPDATE of its counters run for each row). A
settle is three: delete its leases, lock and read the counters it moves, update them. On SQLite every
transaction of the gateway starts with BEGIN IMMEDIATE (settings: transaction_mode), which holds the database's
one write lock, so transactions run one at a time across processes and FOR UPDATE is not needed (nor written).

The steps are raw SQL, the same text on SQLite and PostgreSQL (table and column names from the models' _meta,
values always parameters): built by the ORM (bulk_update writes a CASE WHEN per row and field), the same steps
cost ten times the CPU.

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
from django.db.backends.utils import CursorWrapper
from django.db.models import Model

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


# The statements below are written once for SQLite and PostgreSQL: names come from the models, quoted as Django
# quotes them for both; every value is a parameter.
def _quoted(model: type[Model], *fields: str) -> list[str]:
    """A model's table and the columns of these fields, in double quotes."""
    columns = {field.name: field.column for field in model._meta.concrete_fields}
    return [f'"{model._meta.db_table}"', *(f'"{columns[field]}"' for field in fields)]


_COUNTERS, _KEY, _VALUE, _STAMP, _EXPIRES = _quoted(LimitCounter, "key", "value", "stamp", "expires_at")
_LEASES, _LEASE_KEY, _RESERVATION, _LEASE_EXPIRES = _quoted(LimitLease, "key", "reservation", "expires_at")

_COUNTERS_UPDATE = f"UPDATE {_COUNTERS} SET {_VALUE} = %s, {_STAMP} = %s, {_EXPIRES} = %s WHERE {_KEY} = %s"  # noqa: S608 (names from the models)


def _marks(count: int, width: int = 1) -> str:
    """Placeholders for `count` values (`width` 1: "%s, %s") or rows ("(%s, %s), (%s, %s)"). No values: NULL, since
    `IN ()` is not SQL and `IN (NULL)` matches nothing."""
    if count == 0:
        return "NULL"
    one = "%s" if width == 1 else "(" + ", ".join(["%s"] * width) + ")"
    return ", ".join([one] * count)


_Counter = tuple[float, float, float]  # value, stamp, expires_at


def _counters_lock(cursor: CursorWrapper, keys: Sequence[str]) -> dict[str, _Counter]:
    """Lock these counters (those that exist), in key order as every step locks them; read them by key."""
    sql = (
        f"SELECT {_KEY}, {_VALUE}, {_STAMP}, {_EXPIRES} FROM {_COUNTERS} WHERE {_KEY} IN ({_marks(len(keys))})"  # noqa: S608 (names from the models)
        f" ORDER BY {_KEY}"
    )
    if connection.features.has_select_for_update:  # PostgreSQL: SQLite's BEGIN IMMEDIATE holds the one write lock
        sql += " FOR UPDATE"
    cursor.execute(sql, keys)
    return {key: (value, stamp, expires_at) for key, value, stamp, expires_at in cursor.fetchall()}


def _counters_update(cursor: CursorWrapper, rows: Sequence[tuple[float, float, float, str]]) -> None:
    """Write (value, stamp, expires_at, key) of counters this transaction has locked."""
    if rows:
        # One statement run for each row: SQLite prepares it once, psycopg sends the rows in one pipeline.
        cursor.executemany(_COUNTERS_UPDATE, rows)


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
        with transaction.atomic(), connection.cursor() as cursor:
            _commit_without_flush()
            rows = _counters_lock(cursor, [check.key for check in checks])
            if len(rows) < len(checks):
                return [check for check in checks if check.key not in rows]
            # Read after the lock, in a statement of its own: on PostgreSQL it then sees (READ COMMITTED) the leases
            # of the transactions it waited for, which a statement begun before the wait would not.
            slots = [check.key for check in checks if check.kind is Kind.CONCURRENT]
            cursor.execute(
                f"SELECT {_LEASE_KEY}, COUNT(*), MIN({_LEASE_EXPIRES}) FROM {_LEASES} WHERE {_LEASE_EXPIRES} > %s"  # noqa: S608 (names from the models)
                f" AND ({_LEASE_KEY} IN ({_marks(len(slots))}) OR ({_LEASE_KEY} = %s AND {_RESERVATION} = %s))"
                f" GROUP BY {_LEASE_KEY}",
                [now, *slots, _MARKER, reservation],
            )
            held: dict[str, tuple[int, float]] = {key: (count, first) for key, count, first in cursor.fetchall()}
            taken = _MARKER in held  # a retried call: already reserved, count nothing again

            values: list[float] = []
            refused, retry = -1, 0.0
            for index, check in enumerate(checks):
                wait = 0.0
                if check.kind is Kind.CONCURRENT:
                    value: float = held.get(check.key, (0, 0.0))[0]
                    fits = value + check.amount <= check.limit
                elif check.kind is Kind.BUDGET:
                    value = rows[check.key][0]
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
                leases = [(_MARKER, reservation, now + RESERVATION_MEMORY_SECONDS)]
                changed = []
                for index, check in enumerate(checks):
                    if check.kind is Kind.CONCURRENT:
                        leases.append((check.key, reservation, now + self.ttl))
                        values[index] += 1
                        count, first = held.get(check.key, (0, math.inf))
                        held[check.key] = (count + 1, min(first, now + self.ttl))
                    elif check.kind is Kind.BUDGET:
                        values[index] += check.amount
                        _value, stamp, expires_at = rows[check.key]
                        changed.append((values[index], stamp, expires_at, check.key))
                    else:
                        values[index] -= check.amount
                        changed.append((*_bucket(check, values[index], now), check.key))
                cursor.execute(
                    f"INSERT INTO {_LEASES} ({_LEASE_KEY}, {_RESERVATION}, {_LEASE_EXPIRES})"  # noqa: S608 (names from the models)
                    f" VALUES {_marks(len(leases), 3)}",
                    [value for lease in leases for value in lease],
                )
                _counters_update(cursor, changed)

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
    rows: list[tuple[str, float, float, float]] = []  # key, value, stamp, expires_at
    for check in sorted(checks, key=lambda check: check.key):
        if check.kind is Kind.BUDGET:
            rows.append((check.key, seeds[check.key], 0.0, max(check.period_end + BUDGET_GRACE_SECONDS, now + 1)))
        elif check.kind is Kind.CONCURRENT:
            rows.append((check.key, 0.0, 0.0, now + ttl))  # goes when a lease would have
        else:
            rows.append((check.key, check.limit, now, now))  # full: may go
    with transaction.atomic(savepoint=False), connection.cursor() as cursor:  # within a settle's: no savepoint
        cursor.execute(
            f"INSERT INTO {_COUNTERS} ({_KEY}, {_VALUE}, {_STAMP}, {_EXPIRES}) VALUES {_marks(len(rows), 4)}"  # noqa: S608 (names from the models)
            " ON CONFLICT DO NOTHING",
            [value for row in rows for value in row],
        )


# The bucket arithmetic is the Redis script's, operation for operation, so that both stores round alike.
def _rate(check: Check) -> float:
    return check.limit / check.window


def _level(counter: _Counter, check: Check, now: float) -> float:
    """A bucket's level at `now`: refilled at limit/window per second since it was stored, up to the limit."""
    value, stamp, _expires_at = counter
    return min(check.limit, value + max(now - stamp, 0.0) * _rate(check))


def _bucket(check: Check, level: float, now: float) -> _Counter:
    """A bucket's row at this level: value, stamp, and when it is full again (then it may be forgotten)."""
    return level, now, now + (check.limit - level) / _rate(check)


def _ms(seconds: float) -> float:
    """Whole milliseconds rounded up, never below 0, as the Redis store's script answers."""
    return max(math.ceil(seconds * 1000), 0) / 1000


def _settle(reservation: str, checks: Sequence[Check], used: int, now: float) -> None:
    with transaction.atomic(), connection.cursor() as cursor:
        _commit_without_flush()
        # Its slots, and the row that says it was reserved: none for a reservation refused, unknown or settled.
        # Found by key and reservation (the unique index, not a scan): the checks are those given to reserve.
        keys = [_MARKER, *(check.key for check in checks if check.kind is Kind.CONCURRENT)]
        cursor.execute(
            f"DELETE FROM {_LEASES} WHERE {_RESERVATION} = %s AND {_LEASE_KEY} IN ({_marks(len(keys))})",  # noqa: S608 (names from the models)
            [reservation, *keys],
        )
        known = cursor.rowcount > 0
        moved = sorted(
            (check for check in checks if check.kind in _MOVED and check.amount != used), key=lambda check: check.key
        )
        if not known or not moved:
            return
        # A bucket forgotten since it was full again is full: made so when this request takes more than it
        # reserved (given back, tokens would leave it full, as missing). Inserted before any row is locked, in key
        # order, as reserves lock: waiting for another's insert never holds a lock it needs.
        buckets = [check for check in moved if check.kind is Kind.TOKENS and used > check.amount]
        if buckets:
            _create(buckets, {}, now, ttl=0.0)
        found = _counters_lock(cursor, [check.key for check in moved])
        changed = []
        for check in moved:
            counter = found.get(check.key)
            if counter is None:
                # A budget whose counter went: its seed will read this request's usage instead. A bucket: full.
                continue
            if check.kind is Kind.BUDGET:
                value, stamp, expires_at = counter
                changed.append((value + used - check.amount, stamp, expires_at, check.key))
            else:
                level = min(check.limit, _level(counter, check, now) + check.amount - used)
                changed.append((*_bucket(check, level, now), check.key))
        _counters_update(cursor, changed)


def _refresh(leases: Sequence[tuple[str, str]], now: float, ttl: float) -> None:
    # By reservation: a request in flight has every lease it holds renewed, which is what the caller asks for.
    reservations = sorted({reservation for _key, reservation in leases})
    with connection.cursor() as cursor:
        for start in range(0, len(reservations), _REFRESH_BATCH):
            batch = reservations[start : start + _REFRESH_BATCH]
            cursor.execute(
                f"UPDATE {_LEASES} SET {_LEASE_EXPIRES} = %s WHERE {_RESERVATION} IN ({_marks(len(batch))})"  # noqa: S608 (names from the models)
                f" AND {_LEASE_EXPIRES} > %s AND {_LEASE_KEY} <> %s",
                [now + ttl, *batch, now, _MARKER],
            )


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
