"""Requests in flight per endpoint, as this gateway counts them: the route stage's "least loaded".

Each worker counts its own requests (the meter stage: one more when a request goes to an endpoint, one less
when it ends, whatever the outcome). Without Redis that is the whole count: exact for a gateway of one
worker, per worker otherwise.

With REDIS_URL (`SharedInFlight`), every worker also publishes its counts every ROUTE_LOAD_SHARE_SECONDS
into one Redis hash, a field per worker stamped with the time, and reads every field in the same round trip.
The route stage adds the other workers' last published counts to its own live ones: a local snapshot, never a
Redis round trip on the request path. A worker that dies stops refreshing its field: the others ignore it
once it is 3 periods old and delete it, and the hash expires 3 periods after the last worker's publication.
If Redis cannot be reached, the snapshot is kept for 3 periods, then each worker counts only its own again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING

import orjson
from django.conf import settings

if TYPE_CHECKING:
    import redis.asyncio as aioredis

logger = logging.getLogger(__name__)

# A worker's published counts are trusted for this many periods (so one late publication costs nothing).
_PERIODS_TRUSTED = 3
_REDIS_TIMEOUT_SECONDS = 1.0
REDIS_KEY = "gateway:inflight"


class InFlight:
    """This worker's requests in flight per endpoint (all on the event loop: no lock)."""

    __slots__ = ("_mine", "_others")

    def __init__(self) -> None:
        self._mine: dict[int, int] = {}
        self._others: dict[int, int] = {}  # the other workers' counts, as last read (SharedInFlight)

    def begin(self, endpoint_id: int) -> None:
        mine = self._mine
        mine[endpoint_id] = mine.get(endpoint_id, 0) + 1

    def end(self, endpoint_id: int) -> None:
        mine = self._mine
        left = mine.get(endpoint_id, 0) - 1
        if left > 0:
            mine[endpoint_id] = left
        else:
            mine.pop(endpoint_id, None)

    def load(self, endpoint_id: int) -> int:
        """Requests in flight on the endpoint: this worker's now, the others' as last read."""
        return self._mine.get(endpoint_id, 0) + self._others.get(endpoint_id, 0)

    def mine(self) -> dict[int, int]:
        """This worker's counts (a copy)."""
        return dict(self._mine)

    def start(self) -> None:
        """Nothing to share without Redis."""

    async def stop(self) -> None:
        return None


class SharedInFlight(InFlight):
    """`InFlight` whose counts every worker (and host) shares through Redis, in the background."""

    __slots__ = ("_client", "_clock", "_key", "_last_read", "_outage_logged", "_period", "_task", "_url", "worker")

    def __init__(
        self,
        url: str,
        *,
        period: float,
        key: str = REDIS_KEY,
        worker: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__()
        self._url = url
        self._period = period
        self._key = key
        # Unique across hosts and restarts (a pid may be reused by a later worker).
        self.worker = worker or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._clock = clock  # wall clock: workers on several hosts compare each other's stamps
        self._client: aioredis.Redis | None = None
        self._task: asyncio.Task[None] | None = None
        self._last_read = float("-inf")
        self._outage_logged = False

    @property
    def _trusted_seconds(self) -> float:
        return self._period * _PERIODS_TRUSTED

    def _redis(self) -> aioredis.Redis:
        if self._client is None:
            # Imported here: gateways without REDIS_URL never load the client.
            from redis.asyncio import Redis

            self._client = Redis.from_url(
                self._url, socket_timeout=_REDIS_TIMEOUT_SECONDS, socket_connect_timeout=_REDIS_TIMEOUT_SECONDS
            )
        return self._client

    def start(self) -> None:
        if self._period > 0 and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="inflight-share")

    async def stop(self) -> None:
        """Stop sharing and take this worker's counts out at once (else they would count until they age)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        client, self._client = self._client, None
        if client is None:
            return
        from redis.exceptions import RedisError

        try:
            await client.hdel(self._key, self.worker)
        except (RedisError, OSError):
            pass  # it ages out
        finally:
            await client.aclose()

    async def _run(self) -> None:
        while True:
            await self.share()
            await asyncio.sleep(self._period)

    async def share(self) -> None:
        """One round trip: publish this worker's counts, read everyone's; drop the fields of dead workers."""
        from redis.exceptions import RedisError

        now = self._clock()
        ttl_ms = max(int(self._trusted_seconds * 1000), 1)
        mine = orjson.dumps({"at": now, "n": self._mine}, option=orjson.OPT_NON_STR_KEYS)
        try:
            client = self._redis()
            async with client.pipeline(transaction=False) as pipe:
                pipe.hset(self._key, self.worker, mine)
                pipe.pexpire(self._key, ttl_ms)
                pipe.hgetall(self._key)
                *_, everyone = await pipe.execute()
            others, dead = _others_of(everyone, self.worker.encode(), now - self._trusted_seconds)
            if dead:
                await client.hdel(self._key, *dead)
        except (RedisError, OSError) as exc:
            if not self._outage_logged:
                self._outage_logged = True
                logger.warning("cannot share in-flight counts through Redis (%s)", type(exc).__name__)
            if now - self._last_read > self._trusted_seconds:
                self._others = {}  # too old to trust: count this worker's own requests only
            return
        if self._outage_logged:
            self._outage_logged = False
            logger.info("sharing in-flight counts through Redis again")
        self._others = others
        self._last_read = now


def _others_of(fields: dict[bytes, bytes], me: bytes, oldest: float) -> tuple[dict[int, int], list[bytes]]:
    """The other workers' counts summed per endpoint, and the fields too old or unreadable to keep."""
    others: dict[int, int] = {}
    dead: list[bytes] = []
    for worker, raw in fields.items():
        if worker == me:
            continue
        try:
            published = orjson.loads(raw)
            at = float(published["at"])
            counts = {int(endpoint): int(count) for endpoint, count in published["n"].items()}
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
            dead.append(worker)
            continue
        if at < oldest:
            dead.append(worker)
            continue
        for endpoint, count in counts.items():
            others[endpoint] = others.get(endpoint, 0) + count
    return others, dead


def in_flight_from_settings() -> InFlight:
    """Shared through Redis when REDIS_URL is set (and ROUTE_LOAD_SHARE_SECONDS > 0), else this worker's own."""
    gateway = settings.GATEWAY
    if gateway.REDIS_URL and gateway.ROUTE_LOAD_SHARE_SECONDS > 0:
        return SharedInFlight(gateway.REDIS_URL, period=gateway.ROUTE_LOAD_SHARE_SECONDS)
    return InFlight()
