"""A process racing the others for the same limit counters (tests/resource_server/limits/test_stores.py).

Started with multiprocessing's spawn method: each process sets Django up itself and builds its own store, with
its own connections, as a gateway worker does. Each round, all the processes pass one barrier, then each sends
its share of the round's reserves at once, and reports how many were admitted.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from multiprocessing.queues import Queue
    from multiprocessing.synchronize import Barrier

    from resource_server.limits.base import Check, LimitStore


@dataclass(frozen=True)
class Race:
    store: str  # "redis" or "database"
    kind: str  # "concurrent" or "budget"
    rounds: int
    requests: int  # this process's share of each round
    limit: int
    amount: int
    seed: int  # a budget's used tokens before the round (what its seed reads)
    now: float
    redis_url: str = ""
    redis_prefix: str = ""
    database: str = ""  # the test database's NAME


def race(spec: Race, barrier: Barrier, results: Queue[Any]) -> None:
    try:
        admitted = asyncio.run(_race(spec, barrier))
    except BaseException as exc:
        barrier.abort()  # the others must not wait for this one
        results.put(f"{type(exc).__name__}: {exc}")
        raise
    results.put(admitted)


async def _race(spec: Race, barrier: Barrier) -> list[int]:
    store = _store(spec)
    try:
        # Connections are made before the race, so that every process races with the same start.
        await store.reserve(uuid.uuid4().hex, [_check(spec, "warm-up")], now=spec.now)
        admitted = []
        for round_ in range(spec.rounds):
            checks = [_check(spec, f"round-{round_}")]
            await asyncio.to_thread(barrier.wait, 60)
            verdicts = await asyncio.gather(
                *(store.reserve(uuid.uuid4().hex, checks, now=spec.now) for _ in range(spec.requests))
            )
            admitted.append(sum(verdict.admitted for verdict in verdicts))
        return admitted
    finally:
        await store.aclose()


def _check(spec: Race, name: str) -> Check:
    from resource_server.limits.base import Check, Kind

    kind = Kind(spec.kind)
    return Check(key=f"race:{name}", kind=kind, limit=spec.limit, amount=spec.amount, period_end=spec.now + 3600)


def _store(spec: Race) -> LimitStore:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "gateway.settings")
    from django.conf import settings

    if spec.database:
        settings.DATABASES["default"]["NAME"] = spec.database
    import django

    django.setup()
    from resource_server.limits.store_db import DatabaseLimitStore
    from resource_server.limits.store_redis import RedisLimitStore

    async def seed(check: Check) -> int:
        return spec.seed

    if spec.store == "redis":
        return RedisLimitStore(spec.redis_url, seed=seed, ttl=60, timeout=5, prefix=spec.redis_prefix)
    return DatabaseLimitStore(seed=seed, ttl=60)
