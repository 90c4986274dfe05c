"""The limit counters in Redis: every check of a request judged and reserved in one round trip (a Lua script).

Keys (all under one prefix, apart from the relay's `gateway:relay:` and the cache's `gateway:` keys):

    <prefix>c:<check key>     CONCURRENT: a sorted set, member a reservation, score its lease's expiry
                              REQUESTS, TOKENS: a hash, `l` the bucket's level, `t` when it was computed
                              BUDGET: a string, the tokens used in the period
    <prefix>r:<reservation>   the reservation was taken and not yet settled (see RESERVATION_MEMORY_SECONDS)

Every key expires on its own: a bucket when it would be full again, a concurrency set when its last lease has
expired, a budget a day after its period ends. A script names all its keys in KEYS, but a request's checks live
on different scopes, so they cannot share a Redis Cluster hash slot: the store needs one Redis (or a primary with
replicas, Sentinel), not a Cluster.

Times are the caller's clock (`now`, epoch seconds), never Redis's TIME, so the database store and this one
agree in tests that move the clock; gateway hosts keep theirs in step (NTP). Only keys' own expiry (PEXPIRE,
relative) follows Redis's clock, and it only forgets what is no longer needed.
"""

from __future__ import annotations

import asyncio
import logging
import math
import weakref
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from resource_server.limits.base import BudgetSeed, Check, CheckState, LimitStoreUnavailable, Verdict
from resource_server.limits.counting import (
    BUDGET_GRACE_SECONDS,
    RESERVATION_MEMORY_SECONDS,
    SEED_ROUNDS,
    budgets_seed,
    checks_validate,
)

if TYPE_CHECKING:
    import redis.asyncio as redis
    from redis.commands.core import AsyncScript

logger = logging.getLogger(__name__)

# KEYS[1]: the reservation's key; KEYS[1 + i]: check i's counter.
# ARGV: now, lease TTL (s), reservation, reservation memory (ms), then per check: kind, limit, amount, window,
# period end.
# Returns {-1, i, ...} when the budgets i (0-based) have no counter (nothing was changed: seed them and call
# again); else {admitted 1 or 0, refused check (0-based, -1 if none), retry-after (ms), then per check its
# remaining and its reset (ms)}. A reservation already taken (a retried call) is admitted again without
# counting twice. Integers only: Redis truncates Lua numbers, so times are whole milliseconds rounded up.
_RESERVE = """
local now, ttl, rid = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
local n = #KEYS - 1
local kind, limit, amount, rate, period_end = {}, {}, {}, {}, {}
local missing = {-1}
for i = 1, n do
  local a = 4 + (i - 1) * 5
  kind[i], limit[i], amount[i] = ARGV[a + 1], tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3])
  rate[i], period_end[i] = limit[i] / tonumber(ARGV[a + 4]), tonumber(ARGV[a + 5])
  if kind[i] == 'budget' and redis.call('EXISTS', KEYS[i + 1]) == 0 then missing[#missing + 1] = i - 1 end
end
if #missing > 1 then return missing end

local held = redis.call('EXISTS', KEYS[1]) == 1
local value = {}
local refused, retry = -1, 0
for i = 1, n do
  local key, fits = KEYS[i + 1], true
  if kind[i] == 'concurrent' then
    redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
    value[i] = redis.call('ZCARD', key)
    fits = value[i] + amount[i] <= limit[i]
  elseif kind[i] == 'budget' then
    value[i] = tonumber(redis.call('GET', key))
    fits = value[i] + amount[i] <= limit[i]
    if not fits and refused < 0 and amount[i] <= limit[i] then retry = period_end[i] - now end
  else
    local stored = redis.call('HMGET', key, 'l', 't')
    value[i] = limit[i]
    if stored[1] then
      value[i] = math.min(limit[i], tonumber(stored[1]) + math.max(now - tonumber(stored[2]), 0) * rate[i])
    end
    fits = value[i] >= amount[i]
    if not fits and refused < 0 and amount[i] <= limit[i] then retry = (amount[i] - value[i]) / rate[i] end
  end
  if not fits and refused < 0 then refused = i - 1 end
end
local admitted = held or refused < 0
if admitted then refused, retry = -1, 0 end

if admitted and not held then
  for i = 1, n do
    local key = KEYS[i + 1]
    if kind[i] == 'concurrent' then
      redis.call('ZADD', key, now + ttl, rid)
      if redis.call('PTTL', key) < ttl * 1000 then redis.call('PEXPIRE', key, math.ceil(ttl * 1000)) end
      value[i] = value[i] + 1
    elseif kind[i] == 'budget' then
      value[i] = redis.call('INCRBY', key, amount[i])
    else
      value[i] = value[i] - amount[i]
      redis.call('HSET', key, 'l', string.format('%.17g', value[i]), 't', ARGV[1])
      redis.call('PEXPIRE', key, math.max(math.ceil((limit[i] - value[i]) / rate[i] * 1000), 1))
    end
  end
  redis.call('SET', KEYS[1], '1', 'PX', ARGV[4])
end

local out = {admitted and 1 or 0, refused, math.ceil(retry * 1000)}
for i = 1, n do
  local remaining, reset = 0, 0
  if kind[i] == 'concurrent' then
    remaining = limit[i] - value[i]
    if remaining <= 0 then
      local first = redis.call('ZRANGE', KEYS[i + 1], 0, 0, 'WITHSCORES')
      if first[2] then reset = tonumber(first[2]) - now end
    end
  elseif kind[i] == 'budget' then
    remaining, reset = limit[i] - value[i], period_end[i] - now
  else
    remaining, reset = math.floor(value[i]), (limit[i] - value[i]) / rate[i]
  end
  out[#out + 1] = math.max(remaining, 0)
  out[#out + 1] = math.max(math.ceil(reset * 1000), 0)
end
return out
"""

# KEYS[1]: the reservation's key; KEYS[1 + i]: check i's counter. ARGV: now, used tokens, reservation, then per
# check: kind, limit, amount, window. Slots are released whatever the reservation's state; tokens move only
# for a reservation taken and not yet settled (so a settle repeated, or of a reservation refused, changes nothing).
_SETTLE = """
local now, used, rid = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
local known = redis.call('DEL', KEYS[1]) == 1
for i = 1, #KEYS - 1 do
  local a = 3 + (i - 1) * 4
  local key, kind, limit, amount = KEYS[i + 1], ARGV[a + 1], tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3])
  if kind == 'concurrent' then
    redis.call('ZREM', key, rid)
  elseif known and kind == 'budget' and used ~= amount then
    if redis.call('EXISTS', key) == 1 then redis.call('INCRBY', key, used - amount) end
  elseif known and kind == 'tokens' and used ~= amount then
    local window = tonumber(ARGV[a + 4])
    local rate = limit / window
    local stored = redis.call('HMGET', key, 'l', 't')
    local level = limit
    if stored[1] then level = math.min(limit, tonumber(stored[1]) + math.max(now - tonumber(stored[2]), 0) * rate) end
    level = math.min(limit, level + amount - used)
    if level < limit then
      redis.call('HSET', key, 'l', string.format('%.17g', level), 't', ARGV[1])
      redis.call('PEXPIRE', key, math.max(math.ceil((limit - level) / rate * 1000), 1))
    else
      redis.call('DEL', key)
    end
  end
end
return 1
"""

# KEYS: lease counters; ARGV: now, lease TTL (s), then each lease's reservation. Only live leases are renewed:
# an expired one may have had its slot taken already.
_REFRESH = """
local now, ttl = tonumber(ARGV[1]), tonumber(ARGV[2])
for i = 1, #KEYS do
  local expiry = redis.call('ZSCORE', KEYS[i], ARGV[i + 2])
  if expiry and tonumber(expiry) > now then
    redis.call('ZADD', KEYS[i], 'XX', now + ttl, ARGV[i + 2])
    if redis.call('PTTL', KEYS[i]) < ttl * 1000 then redis.call('PEXPIRE', KEYS[i], math.ceil(ttl * 1000)) end
  end
end
return 1
"""

# redis-py's defaults do not fit a check made before every request (redis-py 8: a 5 s socket and connect timeout,
# 10 retries with backoff around every command, 100 connections per pool and a new one made past that, no
# health check). Each connect and each reply waits at most the store's timeout; a pool of _CONNECTIONS queues
# requests for a free connection, for at most the timeout too. One retry, only after a connection error (a
# connection Redis closed while idle, found out on use): reserve is idempotent per reservation, settle and
# refresh too, so a script that ran before its connection broke is not counted twice. No retry after a timeout:
# a Redis too slow for one try is not asked again while the request waits.
_CONNECTIONS = 64

# Every key of the store starts with this (the relay's and the cache's keys do not).
KEY_PREFIX = "igw:limit:"


@dataclass(frozen=True, slots=True)
class _Scripts:
    client: redis.Redis
    reserve: AsyncScript
    settle: AsyncScript
    refresh: AsyncScript


class RedisLimitStore:
    """`LimitStore` in Redis, shared by every worker and host. Any Redis error raises `LimitStoreUnavailable`
    (settle logs it instead: its leases expire and its tokens stay charged)."""

    def __init__(self, url: str, *, seed: BudgetSeed, ttl: float, timeout: float, prefix: str = KEY_PREFIX) -> None:
        self._url = url
        self._seed = seed
        self.ttl = ttl
        self.timeout = timeout
        self.prefix = prefix
        # redis.asyncio connections belong to one event loop; tests and commands may run several.
        self._scripts: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Scripts] = weakref.WeakKeyDictionary()

    def _connection(self) -> _Scripts:
        loop = asyncio.get_running_loop()
        scripts = self._scripts.get(loop)
        if scripts is None:
            scripts = self._scripts[loop] = self._connect()
        return scripts

    def _connect(self) -> _Scripts:
        # Imported here: gateways without REDIS_URL never load the client.
        from redis.asyncio import BlockingConnectionPool, Redis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff
        from redis.exceptions import ConnectionError as RedisConnectionError

        client = Redis.from_pool(
            BlockingConnectionPool.from_url(
                self._url,
                max_connections=_CONNECTIONS,
                timeout=self.timeout,  # the wait for a free connection
                socket_timeout=self.timeout,
                socket_connect_timeout=self.timeout,
                retry=Retry(NoBackoff(), 1, (RedisConnectionError,)),
            )
        )
        return _Scripts(
            client, client.register_script(_RESERVE), client.register_script(_SETTLE), client.register_script(_REFRESH)
        )

    def counter_key(self, check: Check) -> str:
        return f"{self.prefix}c:{check.key}"

    def reservation_key(self, reservation: str) -> str:
        return f"{self.prefix}r:{reservation}"

    async def reserve(self, reservation: str, checks: Sequence[Check], *, now: float) -> Verdict:
        checks_validate(checks)
        if not checks:
            return Verdict(admitted=True, states=())
        scripts = self._connection()
        keys = [self.reservation_key(reservation), *map(self.counter_key, checks)]
        args: list[str | float] = [now, self.ttl, reservation, int(RESERVATION_MEMORY_SECONDS * 1000)]
        for check in checks:
            args += [check.kind.value, check.limit, check.amount, check.window, check.period_end]
        for _round in range(SEED_ROUNDS):
            reply = await self._run(scripts.reserve, keys, args)
            if reply[0] != -1:
                return _verdict(reply)
            missing = [checks[index] for index in reply[1:]]
            used = await budgets_seed(self._seed, missing)
            await self._plant(scripts.client, missing, used, now)
        raise LimitStoreUnavailable("budget counters vanished as soon as they were seeded (is Redis evicting keys?)")

    async def _plant(self, client: redis.Redis, budgets: Sequence[Check], used: Sequence[int], now: float) -> None:
        """Each budget's counter, unless another request planted it first (its seed was read as recently)."""
        from redis.exceptions import RedisError

        try:
            async with client.pipeline(transaction=False) as pipe:
                for check, tokens in zip(budgets, used, strict=True):
                    lifetime = max(check.period_end + BUDGET_GRACE_SECONDS - now, 1.0)
                    pipe.set(self.counter_key(check), tokens, nx=True, px=math.ceil(lifetime * 1000))
                await pipe.execute()
        except (RedisError, OSError) as exc:
            raise _unavailable(exc) from None

    async def _run(self, script: AsyncScript, keys: Sequence[str], args: Sequence[str | float]) -> list[int]:
        from redis.exceptions import RedisError

        try:
            return await cast(Awaitable[list[int]], script(keys=keys, args=args))
        except (RedisError, OSError) as exc:
            raise _unavailable(exc) from None

    async def settle(self, reservation: str, checks: Sequence[Check], *, used_tokens: int, now: float) -> None:
        if not checks:
            return
        keys = [self.reservation_key(reservation), *map(self.counter_key, checks)]
        args: list[str | float] = [now, used_tokens, reservation]
        for check in checks:
            args += [check.kind.value, check.limit, check.amount, check.window]
        try:
            await self._run(self._connection().settle, keys, args)
        except LimitStoreUnavailable as exc:
            logger.warning("limit store (Redis) failed settling a reservation: %s", exc)

    async def refresh(self, leases: Sequence[tuple[str, str]], *, now: float) -> None:
        if not leases:
            return
        keys = [f"{self.prefix}c:{key}" for key, _reservation in leases]
        args: list[str | float] = [now, self.ttl, *(reservation for _key, reservation in leases)]
        try:
            await self._run(self._connection().refresh, keys, args)
        except LimitStoreUnavailable as exc:
            logger.warning("limit store (Redis) failed renewing %d leases: %s", len(leases), exc)

    async def warm(self) -> None:
        """Open the pool's connections now, while the worker is idle. Opened on the request path instead, by the
        first burst of requests (up to _CONNECTIONS at once, each connect a few turns of a loop busy with that
        burst), connects took longer than the store's timeout on a busy host, and the checks were decided as if
        Redis were down: rate limits let through unmetered (issue 14's e2e test: 53 of 200 admitted past a
        concurrency limit of 7)."""
        client = self._connection().client
        # As many pings at once as the pool holds connections: none is free before all have been asked for.
        pings = await asyncio.gather(*(client.ping() for _ in range(_CONNECTIONS)), return_exceptions=True)
        failed = [outcome for outcome in pings if isinstance(outcome, BaseException)]
        if failed:
            logger.warning(
                "limit store (Redis): %d of %d connections not opened ahead: %s",
                len(failed),
                _CONNECTIONS,
                _unavailable(failed[0]),
            )

    async def aclose(self) -> None:
        """Close this loop's connections (a server's loop lives as long as the process)."""
        scripts = self._scripts.pop(asyncio.get_running_loop(), None)
        if scripts is not None:
            await scripts.client.aclose()


def _verdict(reply: list[Any]) -> Verdict:
    states = tuple(
        CheckState(remaining=int(reply[index]), reset_seconds=reply[index + 1] / 1000)
        for index in range(3, len(reply), 2)
    )
    return Verdict(admitted=reply[0] == 1, states=states, refused=int(reply[1]), retry_after=reply[2] / 1000)


def _unavailable(exc: BaseException) -> LimitStoreUnavailable:
    # The message names the error's type only: redis-py's messages may carry the URL, password included.
    return LimitStoreUnavailable(f"Redis failed: {type(exc).__name__}")
