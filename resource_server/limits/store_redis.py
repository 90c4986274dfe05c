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
import collections
import hashlib
import logging
import math
import weakref
from collections.abc import Sequence
from typing import Any
from urllib.parse import unquote, urlsplit

from resource_server.limits.base import BudgetSeed, Check, CheckState, LimitStoreUnavailable, Verdict
from resource_server.limits.counting import (
    BUDGET_GRACE_SECONDS,
    RESERVATION_MEMORY_SECONDS,
    SEED_ROUNDS,
    budgets_seed,
    checks_validate,
)

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

# Why not redis-py's client: a check is made before every request and settled after it, and redis-py's asyncio
# command path (its blocking pool's lock and condition, hooks, the retry wrapper, a timeout around each read and
# write, arguments packed in Python) cost 370-440 us of CPU per script call on the benchmark machine, twice per
# request; the same call through one pipelined connection, packed and parsed by hiredis (the parser redis-py
# itself uses), cost 130-150 us (docs/performance.md, "Limits on the hot path"). So each event loop keeps one
# connection to Redis: every request's commands are written on it at once and the replies, which Redis sends in
# order, are handed back in order. Each connect and each reply waits at most the store's timeout; a timed-out
# reply is still read, and dropped, when it comes, so the connection stays in step. A broken connection fails the
# commands waiting on it and is made again by the next command. No retry: reserve is idempotent per reservation,
# but a Redis too slow or gone for one try is not asked again while the request waits.


class _Pipe:
    """One connection to Redis, shared by every command of an event loop, replies matched to commands in order."""

    def __init__(self, url: str, timeout: float) -> None:
        import hiredis  # here: gateways without REDIS_URL never load it

        self._hiredis = hiredis
        self._target = urlsplit(url)
        self._timeout = timeout
        self._writer: asyncio.StreamWriter | None = None
        self._waiting: collections.deque[asyncio.Future[Any]] = collections.deque()
        self._connecting: asyncio.Task[None] | None = None

    async def call(self, *args: str | int | float) -> Any:
        """One command's reply; a Redis error reply raises `_RedisError`, a lost or slow Redis `OSError` /
        `TimeoutError`."""
        writer = self._writer
        if writer is None or writer.is_closing():
            await self._connected()
            writer = self._writer
            assert writer is not None
        reply = asyncio.get_running_loop().create_future()
        self._waiting.append(reply)
        writer.write(self._hiredis.pack_command(args))  # type: ignore[arg-type]  # its stub says a 1-tuple
        return await asyncio.wait_for(reply, self._timeout)

    async def _connected(self) -> None:
        if self._connecting is None or self._connecting.done():
            self._connecting = asyncio.get_running_loop().create_task(self._connect())
        await asyncio.wait_for(asyncio.shield(self._connecting), self._timeout)

    async def _connect(self) -> None:
        target = self._target
        reader, writer = await asyncio.open_connection(
            target.hostname or "127.0.0.1", target.port or 6379, ssl=True if target.scheme == "rediss" else None
        )
        parser = self._hiredis.Reader(replyError=_RedisError)
        handshake = []
        if target.password:
            handshake.append(
                ("AUTH", unquote(target.username), unquote(target.password))
                if target.username
                else ("AUTH", unquote(target.password))
            )
        database = target.path.strip("/")
        if database and database != "0":
            handshake.append(("SELECT", database))
        for command in handshake:
            writer.write(self._hiredis.pack_command(command))  # type: ignore[arg-type]  # as above
        for _ in handshake:
            reply = False
            while reply is False:
                parser.feed(await reader.read(65536) or _eof())
                reply = parser.gets()
            if isinstance(reply, _RedisError):
                writer.close()
                raise reply
        self._writer = writer
        asyncio.get_running_loop().create_task(self._read(reader, writer, parser))

    async def _read(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, parser: Any) -> None:
        waiting = self._waiting
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                parser.feed(data)
                while (reply := parser.gets()) is not False:
                    future = waiting.popleft()
                    if not future.done():  # a caller that timed out has gone
                        if isinstance(reply, _RedisError):
                            future.set_exception(reply)
                        else:
                            future.set_result(reply)
        except OSError:
            pass
        finally:
            writer.close()
            if self._writer is writer:
                self._writer = None
            while waiting:
                future = waiting.popleft()
                if not future.done():
                    future.set_exception(ConnectionResetError("Redis closed the connection"))

    async def aclose(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class _RedisError(Exception):
    """An error reply from Redis (NOSCRIPT, WRONGTYPE, OOM, ...)."""


def _eof() -> bytes:
    raise ConnectionResetError("Redis closed the connection")


# Every key of the store starts with this (the relay's and the cache's keys do not).
KEY_PREFIX = "igw:limit:"


class _Script:
    """A Lua script, run by its digest (EVALSHA), sent whole (EVAL) the first time a Redis does not know it."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.digest = hashlib.sha1(source.encode(), usedforsecurity=False).hexdigest()

    async def run(self, pipe: _Pipe, keys: Sequence[str], args: Sequence[str | int | float]) -> Any:
        try:
            return await pipe.call("EVALSHA", self.digest, len(keys), *keys, *args)
        except _RedisError as error:
            if not str(error).startswith("NOSCRIPT"):
                raise
            return await pipe.call("EVAL", self.source, len(keys), *keys, *args)


_RESERVE_SCRIPT, _SETTLE_SCRIPT, _REFRESH_SCRIPT = _Script(_RESERVE), _Script(_SETTLE), _Script(_REFRESH)


class RedisLimitStore:
    """`LimitStore` in Redis, shared by every worker and host. Any Redis error raises `LimitStoreUnavailable`
    (settle logs it instead: its leases expire and its tokens stay charged)."""

    def __init__(self, url: str, *, seed: BudgetSeed, ttl: float, timeout: float, prefix: str = KEY_PREFIX) -> None:
        self._url = url
        self._seed = seed
        self.ttl = ttl
        self.timeout = timeout
        self.prefix = prefix
        # A connection belongs to one event loop; tests and commands may run several.
        self._pipes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Pipe] = weakref.WeakKeyDictionary()

    def _pipe(self) -> _Pipe:
        loop = asyncio.get_running_loop()
        pipe = self._pipes.get(loop)
        if pipe is None:
            pipe = self._pipes[loop] = _Pipe(self._url, self.timeout)
        return pipe

    def counter_key(self, check: Check) -> str:
        return f"{self.prefix}c:{check.key}"

    def reservation_key(self, reservation: str) -> str:
        return f"{self.prefix}r:{reservation}"

    async def reserve(self, reservation: str, checks: Sequence[Check], *, now: float) -> Verdict:
        checks_validate(checks)
        if not checks:
            return Verdict(admitted=True, states=())
        pipe = self._pipe()
        keys = [self.reservation_key(reservation), *map(self.counter_key, checks)]
        args: list[str | float] = [now, self.ttl, reservation, int(RESERVATION_MEMORY_SECONDS * 1000)]
        for check in checks:
            args += [check.kind.value, check.limit, check.amount, check.window, check.period_end]
        for _round in range(SEED_ROUNDS):
            reply = await self._run(pipe, _RESERVE_SCRIPT, keys, args)
            if reply[0] != -1:
                return _verdict(reply)
            missing = [checks[index] for index in reply[1:]]
            used = await budgets_seed(self._seed, missing)
            await self._plant(pipe, missing, used, now)
        raise LimitStoreUnavailable("budget counters vanished as soon as they were seeded (is Redis evicting keys?)")

    async def _plant(self, pipe: _Pipe, budgets: Sequence[Check], used: Sequence[int], now: float) -> None:
        """Each budget's counter, unless another request planted it first (its seed was read as recently)."""
        commands = []
        for check, tokens in zip(budgets, used, strict=True):
            lifetime = max(check.period_end + BUDGET_GRACE_SECONDS - now, 1.0)
            commands.append(pipe.call("SET", self.counter_key(check), tokens, "NX", "PX", math.ceil(lifetime * 1000)))
        try:
            await asyncio.gather(*commands)
        except (_RedisError, OSError, TimeoutError) as exc:
            raise _unavailable(exc) from None

    async def _run(self, pipe: _Pipe, script: _Script, keys: Sequence[str], args: Sequence[str | float]) -> Any:
        try:
            return await script.run(pipe, keys, args)
        except (_RedisError, OSError, TimeoutError) as exc:
            raise _unavailable(exc) from None

    async def settle(self, reservation: str, checks: Sequence[Check], *, used_tokens: int, now: float) -> None:
        if not checks:
            return
        keys = [self.reservation_key(reservation), *map(self.counter_key, checks)]
        args: list[str | float] = [now, used_tokens, reservation]
        for check in checks:
            args += [check.kind.value, check.limit, check.amount, check.window]
        try:
            await self._run(self._pipe(), _SETTLE_SCRIPT, keys, args)
        except LimitStoreUnavailable as exc:
            logger.warning("limit store (Redis) failed settling a reservation: %s", exc)

    async def refresh(self, leases: Sequence[tuple[str, str]], *, now: float) -> None:
        if not leases:
            return
        keys = [f"{self.prefix}c:{key}" for key, _reservation in leases]
        args: list[str | float] = [now, self.ttl, *(reservation for _key, reservation in leases)]
        try:
            await self._run(self._pipe(), _REFRESH_SCRIPT, keys, args)
        except LimitStoreUnavailable as exc:
            logger.warning("limit store (Redis) failed renewing %d leases: %s", len(leases), exc)

    async def warm(self) -> None:
        """Open the connection now, while the worker is idle: opened by the first burst of requests instead, on a
        loop busy with that burst, the connect outlasted the store's timeout on a busy host and the checks were
        decided as if Redis were down (rate limits let through unmetered: issue 14's e2e test saw 53 of 200
        admitted past a concurrency limit of 7)."""
        try:
            await self._pipe().call("PING")
        except (_RedisError, OSError, TimeoutError) as exc:
            logger.warning("limit store (Redis): the connection was not opened ahead: %s", _unavailable(exc))

    async def aclose(self) -> None:
        """Close this loop's connection (a server's loop lives as long as the process)."""
        pipe = self._pipes.pop(asyncio.get_running_loop(), None)
        if pipe is not None:
            await pipe.aclose()


def _verdict(reply: list[Any]) -> Verdict:
    states = tuple(
        CheckState(remaining=int(reply[index]), reset_seconds=reply[index + 1] / 1000)
        for index in range(3, len(reply), 2)
    )
    return Verdict(admitted=reply[0] == 1, states=states, refused=int(reply[1]), retry_after=reply[2] / 1000)


def _unavailable(exc: BaseException) -> LimitStoreUnavailable:
    # The message names the error's type only: redis-py's messages may carry the URL, password included.
    return LimitStoreUnavailable(f"Redis failed: {type(exc).__name__}")
