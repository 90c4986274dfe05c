"""python -m benchmarks.limit_store_cost [--runs N]: what a limit check adds to a request, per counter store.

Times reserve + settle of one request meeting three limits (concurrent requests, tokens per minute, a daily token
budget), one request after another in one event loop: the latency a request pays, not the store's throughput.
Runs each store the environment provides: Redis (REDIS_URL), and the database store on the gateway's database
(DATABASE_URL: PostgreSQL; unset: SQLite in DATA_DIR, which must be migrated). Also counts the round trips of one
pair: Redis commands, and database statements (each transaction's BEGIN and COMMIT included). The limits are high
enough that every request is admitted; counters and rows use a prefix of the run's own and are deleted after.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from resource_server.limits.base import Check, LimitStore

RUNS = 10_000


def _checks(prefix: str, now: float) -> list[Check]:
    from resource_server.limits.base import Check, Kind

    return [
        Check(key=f"{prefix}:c", kind=Kind.CONCURRENT, limit=10**9, amount=1),
        Check(key=f"{prefix}:t", kind=Kind.TOKENS, limit=10**12, amount=1000),
        Check(key=f"{prefix}:b", kind=Kind.BUDGET, limit=10**15, amount=1000, period_end=now + 86_400),
    ]


async def _pair(store: LimitStore, checks: list[Check]) -> None:
    reservation, now = uuid.uuid4().hex, time.time()
    verdict = await store.reserve(reservation, checks, now=now)
    assert verdict.admitted
    await store.settle(reservation, checks, used_tokens=500, now=now)


async def _time(store: LimitStore, checks: list[Check], runs: int) -> str:
    """Wall and CPU time (this process's: the gateway's share) per reserve + settle, after a first pair that
    connects, makes the counters and seeds the budget."""
    await _pair(store, checks)
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(runs):
        await _pair(store, checks)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return f"{wall / runs * 1e6:.0f} us per reserve + settle ({cpu / runs * 1e6:.0f} us of this process's CPU)"


async def _seed(check: Check) -> int:
    return 0


async def _redis(url: str, runs: int) -> None:
    from redis.asyncio import Redis

    from resource_server.limits.store_redis import RedisLimitStore, _Connection

    prefix = f"bench:limit:{uuid.uuid4().hex}:"
    store = RedisLimitStore(url, seed=_seed, ttl=60, timeout=0.5, prefix=prefix)
    checks = _checks("bench", time.time())
    timing = await _time(store, checks, runs)

    # Commands of one more pair, each written on the store's one connection (the settle's reply is not waited for).
    sends = 0
    send = _Connection.send

    def counted(self: _Connection, args: Sequence[str | int | float]) -> asyncio.Future[Any]:
        nonlocal sends
        sends += 1
        return send(self, args)

    _Connection.send = counted  # type: ignore[method-assign]  # this process only, to count
    await _pair(store, checks)
    _Connection.send = send  # type: ignore[method-assign]

    client = Redis.from_url(url)
    keys = [key async for key in client.scan_iter(match=f"{prefix}*")]
    if keys:
        await client.delete(*keys)
    await client.aclose()
    await store.aclose()
    print(f"redis: {timing}, {sends} commands")


async def _database(runs: int) -> None:
    from django.db import connection

    from resource_server.db import db_run
    from resource_server.limits.store_db import DatabaseLimitStore
    from resource_server.models import LimitCounter, LimitLease

    prefix = f"bench:{uuid.uuid4().hex}"
    store = DatabaseLimitStore(seed=_seed, ttl=60)
    checks = _checks(prefix, time.time())
    timing = await _time(store, checks, runs)

    # Statements of one more pair, seen on the connection of the thread that runs the store's queries.
    statements: list[str] = []

    def count(execute, sql, params, many, context):  # type: ignore[no-untyped-def]  # Django's wrapper protocol
        statements.append(sql)
        return execute(sql, params, many, context)

    # `connection` is per thread: looked up in db_run's thread, not here.
    await db_run(lambda: connection.execute_wrappers.append(count))
    await _pair(store, checks)
    await db_run(lambda: connection.execute_wrappers.remove(count))
    # Two transactions (reserve, settle). PostgreSQL: psycopg sends each BEGIN and COMMIT on its own; SQLite runs
    # in the process (no round trips), and its COMMIT is the one statement not seen.
    trips = len(statements) + (4 if connection.vendor == "postgresql" else 2)

    def clean() -> None:
        LimitCounter.objects.filter(key__startswith=prefix).delete()
        LimitLease.objects.filter(key__startswith=prefix).delete()

    await db_run(clean)
    print(f"database ({connection.vendor}): {timing}, {trips} statements")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=RUNS)
    runs = parser.parse_args().runs
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "gateway.settings")
    import django

    django.setup()
    if url := os.environ.get("REDIS_URL"):
        asyncio.run(_redis(url, runs))
    asyncio.run(_database(runs))


if __name__ == "__main__":
    main()
