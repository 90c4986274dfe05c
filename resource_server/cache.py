"""Caches for credentials: a bounded per-worker LRU, backed by Redis when REDIS_URL is set.

The local LRU answers the hot path without I/O; the shared layer lets a token validated by one worker
be trusted by the others (and by other hosts) without asking Globus again.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections import OrderedDict
from typing import TYPE_CHECKING, Generic, TypeVar

from django.conf import settings

if TYPE_CHECKING:
    import redis.asyncio as aioredis

logger = logging.getLogger(__name__)

V = TypeVar("V")


class LocalTTLCache(Generic[V]):
    """A bounded LRU whose entries expire; safe within one event loop (no awaits inside)."""

    def __init__(self, max_entries: int = 10_000) -> None:
        self._entries: OrderedDict[str, tuple[float, V]] = OrderedDict()
        self._max_entries = max_entries

    def get(self, key: str) -> V | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry[0] <= time.monotonic():
            del self._entries[key]
            return None
        return entry[1]

    def set(self, key: str, value: V, ttl: float) -> None:
        if ttl <= 0:
            return
        self._entries[key] = (time.monotonic() + ttl, value)
        self._entries.move_to_end(key)
        while len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)

    def pop(self, key: str) -> None:
        self._entries.pop(key, None)

    def clear(self) -> None:
        self._entries.clear()


class SharedCache:
    """Redis as a cache of bytes; every operation degrades to a miss if Redis is unreachable."""

    def __init__(self, url: str) -> None:
        self._url = url
        # redis.asyncio connections belong to one event loop.
        self._clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, aioredis.Redis] = (
            weakref.WeakKeyDictionary()
        )

    def _client(self) -> aioredis.Redis:
        loop = asyncio.get_running_loop()
        client = self._clients.get(loop)
        if client is None:
            # Imported here: gateways without REDIS_URL never load the client (7 MB per worker).
            from redis.asyncio import Redis

            client = Redis.from_url(self._url, socket_timeout=1.0, socket_connect_timeout=1.0)
            self._clients[loop] = client
        return client

    async def get(self, key: str) -> bytes | None:
        from redis.exceptions import RedisError

        try:
            value = await self._client().get(key)
        except RedisError as exc:
            logger.warning("shared cache unavailable (%s); treating %s as a miss", type(exc).__name__, key[:24])
            return None
        return value.encode() if isinstance(value, str) else value

    async def set(self, key: str, value: bytes, ttl: float) -> None:
        if ttl < 1:
            return  # Redis expiry is in whole seconds; a sub-second entry is not worth sharing
        from redis.exceptions import RedisError

        try:
            await self._client().set(key, value, ex=int(ttl))
        except RedisError as exc:
            logger.warning("shared cache unavailable (%s); not storing %s", type(exc).__name__, key[:24])

    async def delete(self, key: str) -> None:
        from redis.exceptions import RedisError

        try:
            await self._client().delete(key)
        except RedisError as exc:
            logger.warning("shared cache unavailable (%s); not deleting %s", type(exc).__name__, key[:24])


def shared_cache() -> SharedCache | None:
    """The shared cache, or None in the embedded default (one process, the local LRU is enough)."""
    global _shared
    if _shared is None and settings.GATEWAY.REDIS_URL:
        _shared = SharedCache(settings.GATEWAY.REDIS_URL)
    return _shared


_shared: SharedCache | None = None
