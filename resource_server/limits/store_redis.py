"""The limit counters in Redis: every check of a request judged and reserved in one round trip (a Lua script).

Keys (all under one prefix, apart from the relay's `gateway:relay:` and the cache's `gateway:` keys):

    <prefix>c:<check key>     CONCURRENT: a sorted set, member a reservation, score its lease's expiry
                              REQUESTS, TOKENS: a string, "<the bucket's level> <when it was computed>"
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
from typing import Any, cast
from urllib.parse import unquote, urlsplit

from resource_server.limits.base import BudgetSeed, Check, CheckState, Kind, LimitStoreUnavailable, Verdict
from resource_server.limits.counting import (
    BUDGET_GRACE_SECONDS,
    RESERVATION_MEMORY_SECONDS,
    SEED_ROUNDS,
    budgets_seed,
    checks_validate,
)

logger = logging.getLogger(__name__)

# KEYS[1]: the reservation's key; KEYS[1 + i]: check i's counter.
# ARGV: now, lease TTL (s), reservation, reservation memory (ms), then per check: kind, limit, amount, and its
# window (s; requests and tokens), its period's end (budget) or 0 (concurrent).
# Returns {-1, i, ...} when the budgets i (0-based) have no counter (nothing was changed: seed them and call
# again); else {admitted 1 or 0, refused check (0-based, -1 if none), retry-after (ms), then per check its
# remaining and its reset (ms)}. A reservation already taken (a retried call) is admitted again without
# counting twice. Integers only: Redis truncates Lua numbers, so times are whole milliseconds rounded up.
# Its cost is Redis's per call and per number parsed (each about half a microsecond): a bucket is one string,
# "level stamp", read and written whole; expired leases are not removed here but by the refresh script.
_RESERVE = """
local now, ttl, rid = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
local n = #KEYS - 1
local kind, limit, amount, extra, value = {}, {}, {}, {}, {}
local missing = {-1}
for i = 1, n do
  local a = 4 * i
  kind[i], limit[i], amount[i] = ARGV[a + 1], tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3])
  if kind[i] ~= 'concurrent' then extra[i] = tonumber(ARGV[a + 4]) end
  if kind[i] == 'budget' then
    value[i] = redis.call('GET', KEYS[i + 1])
    if value[i] then value[i] = tonumber(value[i]) else missing[#missing + 1] = i - 1 end
  end
end
if #missing > 1 then return missing end

local held = not redis.call('SET', KEYS[1], '1', 'NX', 'PX', ARGV[4])
local refused, retry = -1, 0
for i = 1, n do
  local key, fits = KEYS[i + 1], true
  if kind[i] == 'concurrent' then
    value[i] = redis.call('ZCOUNT', key, '(' .. ARGV[1], '+inf')
    fits = value[i] + amount[i] <= limit[i]
  elseif kind[i] == 'budget' then
    fits = value[i] + amount[i] <= limit[i]
    if not fits and refused < 0 and amount[i] <= limit[i] then retry = extra[i] - now end
  else
    local rate, stored = limit[i] / extra[i], redis.call('GET', key)
    value[i] = limit[i]
    if stored then
      local level, stamp = string.match(stored, '(%S+) (%S+)')
      value[i] = math.min(limit[i], tonumber(level) + math.max(now - tonumber(stamp), 0) * rate)
    end
    fits = value[i] >= amount[i]
    if not fits and refused < 0 and amount[i] <= limit[i] then retry = (amount[i] - value[i]) / rate end
  end
  if not fits and refused < 0 then refused = i - 1 end
end
local admitted = held or refused < 0
if admitted then refused, retry = -1, 0 else redis.call('DEL', KEYS[1]) end

if admitted and not held then
  for i = 1, n do
    local key = KEYS[i + 1]
    if kind[i] == 'concurrent' then
      redis.call('ZADD', key, now + ttl, rid)
      redis.call('PEXPIRE', key, math.ceil(ttl * 1000))
      value[i] = value[i] + 1
    elseif kind[i] == 'budget' then
      value[i] = redis.call('INCRBY', key, amount[i])
    else
      value[i] = value[i] - amount[i]
      local refill = math.max(math.ceil((limit[i] - value[i]) * extra[i] / limit[i] * 1000), 1)
      redis.call('SET', key, string.format('%.17g %s', value[i], ARGV[1]), 'PX', refill)
    end
  end
end

local out = {admitted and 1 or 0, refused, math.ceil(retry * 1000)}
for i = 1, n do
  local remaining, reset = 0, 0
  if kind[i] == 'concurrent' then
    remaining = limit[i] - value[i]
    if remaining <= 0 then
      local first = redis.call('ZRANGEBYSCORE', KEYS[i + 1], '(' .. ARGV[1], '+inf', 'WITHSCORES', 'LIMIT', 0, 1)
      if first[2] then reset = tonumber(first[2]) - now end
    end
  elseif kind[i] == 'budget' then
    remaining, reset = limit[i] - value[i], extra[i] - now
  else
    remaining, reset = math.floor(value[i]), (limit[i] - value[i]) * extra[i] / limit[i]
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
  local a = 4 * i
  local key, kind = KEYS[i + 1], ARGV[a]
  if kind == 'concurrent' then
    redis.call('ZREM', key, rid)
  elseif known and (kind == 'budget' or kind == 'tokens') then
    local amount = tonumber(ARGV[a + 2])
    if used ~= amount and kind == 'budget' then
      if redis.call('EXISTS', key) == 1 then redis.call('INCRBY', key, used - amount) end
    elseif used ~= amount then
      local limit, window = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 3])
      local stored, level = redis.call('GET', key), limit
      if stored then
        local was, stamp = string.match(stored, '(%S+) (%S+)')
        level = math.min(limit, tonumber(was) + math.max(now - tonumber(stamp), 0) * limit / window)
      end
      level = math.min(limit, level + amount - used)
      if level < limit then
        local refill = math.max(math.ceil((limit - level) * window / limit * 1000), 1)
        redis.call('SET', key, string.format('%.17g %s', level, ARGV[1]), 'PX', refill)
      else
        redis.call('DEL', key)
      end
    end
  end
end
return 1
"""

# KEYS: lease counters; ARGV: now, lease TTL (s), then each lease's reservation. Only live leases are renewed:
# an expired one may have had its slot taken already. Expired leases (a crashed worker's) are removed here, off
# the request path (reserve counts only the live ones).
_REFRESH = """
local now, ttl = tonumber(ARGV[1]), tonumber(ARGV[2])
for i = 1, #KEYS do
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now)
  if redis.call('ZSCORE', KEYS[i], ARGV[i + 2]) then
    redis.call('ZADD', KEYS[i], 'XX', now + ttl, ARGV[i + 2])
    redis.call('PEXPIRE', KEYS[i], math.ceil(ttl * 1000))
  end
end
return 1
"""

# Why not redis-py's client: a check is made before every request and settled after it, and redis-py's asyncio
# command path (its blocking pool's lock and condition, hooks, the retry wrapper, a timeout around each read and
# write, arguments packed in Python) cost 370-440 us of CPU per script call on the benchmark machine, twice per
# request (docs/performance.md, "Limits on the hot path"). So each event loop keeps one connection to Redis, a
# protocol fed by the loop itself: every request's commands are written on it at once, packed by hiredis, and the
# replies, which Redis sends in order, are parsed by hiredis (the parser redis-py itself uses) and handed back in
# order. A connect waits at most the store's timeout, and so does each reply: a timed-out reply is still read,
# and dropped, when it comes, so the connection stays in step. A broken connection fails the commands waiting on
# it and is made again by the next command. No retry: reserve is idempotent per reservation, but a Redis too slow
# or gone for one try is not asked again while the request waits.


class _RedisError(Exception):
    """An error reply from Redis (NOSCRIPT, WRONGTYPE, OOM, ...)."""


class _Connection(asyncio.Protocol):
    """One TCP connection to Redis: commands written in order, replies handed to their futures in order."""

    def __init__(self, hiredis: Any, timeout: float) -> None:
        self._pack = hiredis.pack_command
        self._parser = hiredis.Reader(replyError=_RedisError)
        self._timeout = timeout
        self._transport: asyncio.Transport | None = None
        # Futures of the commands sent and not yet answered, oldest first, with their deadlines (loop time).
        self._waiting: collections.deque[tuple[asyncio.Future[Any], float]] = collections.deque()
        self._watchdog: asyncio.TimerHandle | None = None

    @property
    def open(self) -> bool:
        return self._transport is not None and not self._transport.is_closing()

    def send(self, args: Sequence[str | int | float]) -> asyncio.Future[Any]:
        """Write one command now; the future of its reply (a Redis error reply: `_RedisError`; no reply within
        the timeout: `TimeoutError`; the connection lost: `ConnectionResetError`)."""
        transport = self._transport
        assert transport is not None
        loop = asyncio.get_running_loop()
        reply = loop.create_future()
        deadline = loop.time() + self._timeout
        self._waiting.append((reply, deadline))
        transport.write(self._pack(tuple(args)))
        if self._watchdog is None:
            self._watchdog = loop.call_at(deadline, self._expire)
        return reply

    def _expire(self) -> None:
        """Fail the replies that are late (one timer per connection, set for the oldest one waiting)."""
        self._watchdog = None
        now = asyncio.get_running_loop().time()
        for reply, deadline in self._waiting:
            if deadline > now:
                self._watchdog = asyncio.get_running_loop().call_at(deadline, self._expire)
                return
            if not reply.done():
                reply.set_exception(TimeoutError("Redis did not answer in time"))

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass asyncio's

    def data_received(self, data: bytes) -> None:
        parser, waiting = self._parser, self._waiting
        parser.feed(data)
        try:
            while (reply := parser.gets()) is not False:
                future = waiting.popleft()[0]
                if future.done():  # its caller timed out and has gone
                    continue
                if isinstance(reply, _RedisError):
                    future.set_exception(reply)
                else:
                    future.set_result(reply)
        except Exception:  # hiredis.ProtocolError, or a reply nobody asked for: the stream is out of step
            assert self._transport is not None
            self._transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        while self._waiting:
            reply = self._waiting.popleft()[0]
            if not reply.done():
                reply.set_exception(ConnectionResetError("Redis closed the connection"))

    async def drained(self) -> None:
        """Every reply waited for has come, or timed out."""
        if self._waiting:
            await asyncio.wait([self._waiting[-1][0]])

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()


class _Pipe:
    """The connection of one event loop to Redis, made again when lost. Each new connection first authenticates,
    selects the URL's database and loads the store's scripts, so that a script sent by its digest is known."""

    def __init__(self, url: str, timeout: float, scripts: Sequence[_Script]) -> None:
        import hiredis  # here: gateways without REDIS_URL never load it

        self._hiredis = hiredis
        self._target = urlsplit(url)
        self._timeout = timeout
        self._scripts = scripts
        self._connection: _Connection | None = None
        self._connecting: asyncio.Task[_Connection] | None = None

    def send_now(self, *args: str | int | float) -> asyncio.Future[Any] | None:
        """Write one command at once if the connection is open: the future of its reply; else None."""
        connection = self._connection
        if connection is None or not connection.open:
            return None
        return connection.send(args)

    async def call(self, *args: str | int | float) -> Any:
        """One command's reply; a Redis error reply raises `_RedisError`, a lost or slow Redis `OSError` /
        `TimeoutError`."""
        reply = self.send_now(*args)
        if reply is None:
            reply = (await self._connected()).send(args)
        return await reply

    async def _connected(self) -> _Connection:
        if self._connecting is None or self._connecting.done():
            self._connecting = asyncio.get_running_loop().create_task(self._connect())
        return await asyncio.wait_for(asyncio.shield(self._connecting), self._timeout)

    async def _connect(self) -> _Connection:
        target = self._target
        _transport, connection = await asyncio.get_running_loop().create_connection(
            lambda: _Connection(self._hiredis, self._timeout),
            target.hostname or "127.0.0.1",
            target.port or 6379,
            ssl=True if target.scheme == "rediss" else None,
        )
        handshake: list[tuple[str, ...]] = []
        if target.password:
            handshake.append(
                ("AUTH", unquote(target.username), unquote(target.password))
                if target.username
                else ("AUTH", unquote(target.password))
            )
        database = target.path.strip("/")
        if database and database != "0":
            handshake.append(("SELECT", database))
        handshake += [("SCRIPT", "LOAD", script.source) for script in self._scripts]
        try:
            await asyncio.gather(*(connection.send(command) for command in handshake))
        except BaseException:
            connection.close()
            raise
        self._connection = connection
        return connection

    async def aclose(self) -> None:
        """Close the connection once the replies on their way (settles sent without waiting) have come."""
        connection, self._connection = self._connection, None
        if connection is not None:
            await connection.drained()
            connection.close()


class _Script:
    """A Lua script, run by its digest (EVALSHA), sent whole (EVAL) when Redis does not know it (its scripts were
    flushed since the connection loaded them)."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.digest = hashlib.sha1(source.encode(), usedforsecurity=False).hexdigest()

    async def run(self, pipe: _Pipe, keys: Sequence[str], args: Sequence[str | int | float]) -> Any:
        try:
            return await pipe.call("EVALSHA", self.digest, len(keys), *keys, *args)
        except _RedisError as error:
            if not _unknown_script(error):
                raise
            return await pipe.call("EVAL", self.source, len(keys), *keys, *args)


def _unknown_script(error: BaseException) -> bool:
    return isinstance(error, _RedisError) and str(error).startswith("NOSCRIPT")


# Every key of the store starts with this (the relay's and the cache's keys do not).
KEY_PREFIX = "igw:limit:"

_RESERVE_SCRIPT, _SETTLE_SCRIPT, _REFRESH_SCRIPT = _Script(_RESERVE), _Script(_SETTLE), _Script(_REFRESH)
_SCRIPTS = (_RESERVE_SCRIPT, _SETTLE_SCRIPT, _REFRESH_SCRIPT)


class RedisLimitStore:
    """`LimitStore` in Redis, shared by every worker and host. Any Redis error raises `LimitStoreUnavailable`
    (settle logs it instead: its leases expire and its tokens stay charged)."""

    # A settle is written on the worker's one connection before `settle` returns: Redis runs that connection's
    # commands in order, so this worker's later reserves see it, and another worker's reserve, sent after the
    # caller has had its answer, all but always reaches Redis after it (loopback and networks do not promise
    # order between two connections, so a reservation that a stale counter would refuse still waits).
    settles_in_order = True

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
            pipe = self._pipes[loop] = _Pipe(self._url, self.timeout, _SCRIPTS)
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
        args: list[str | float] = [f"{now:.6f}", _whole(self.ttl), reservation, _RESERVATION_MEMORY_MS]
        for check in checks:
            kind = check.kind
            extra = 0 if kind is Kind.CONCURRENT else _whole(check.period_end if kind is Kind.BUDGET else check.window)
            args += (kind.value, check.limit, check.amount, extra)
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

    def settle(
        self, reservation: str, checks: Sequence[Check], *, used_tokens: int, now: float
    ) -> asyncio.Future[None]:
        """Written on the loop's connection at once when it is open (`settles_in_order`); the future is done when
        Redis has answered (a failure is logged)."""
        loop = asyncio.get_running_loop()
        applied: asyncio.Future[None] = loop.create_future()
        if not checks:
            applied.set_result(None)
            return applied
        keys = [self.reservation_key(reservation), *map(self.counter_key, checks)]
        args: list[str | float] = [f"{now:.6f}", used_tokens, reservation]
        for check in checks:
            args += (check.kind.value, check.limit, check.amount, _whole(check.window))
        pipe = self._pipe()
        reply = pipe.send_now("EVALSHA", _SETTLE_SCRIPT.digest, len(keys), *keys, *args)
        if reply is None:  # not connected yet (or any more): connect, then settle
            return loop.create_task(self._settle(pipe, keys, args))
        reply.add_done_callback(lambda answered: self._settle_answered(answered, applied, pipe, keys, args))
        return applied

    def _settle_answered(
        self,
        reply: asyncio.Future[Any],
        applied: asyncio.Future[None],
        pipe: _Pipe,
        keys: Sequence[str],
        args: Sequence[str | float],
    ) -> None:
        error = reply.exception()
        if error is not None and _unknown_script(error):  # Redis's scripts were flushed: send it whole
            task = asyncio.get_running_loop().create_task(self._settle(pipe, keys, args))
            task.add_done_callback(lambda _task: applied.set_result(None))
            return
        if error is not None:
            logger.warning("limit store (Redis) failed settling a reservation: %s", _unavailable(error))
        applied.set_result(None)

    async def _settle(self, pipe: _Pipe, keys: Sequence[str], args: Sequence[str | float]) -> None:
        try:
            await self._run(pipe, _SETTLE_SCRIPT, keys, args)
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


_RESERVATION_MEMORY_MS = int(RESERVATION_MEMORY_SECONDS * 1000)


def _whole(number: float) -> int | float:
    """A whole number as an int: hiredis writes a float through repr(), several times slower."""
    whole = int(number)
    return whole if whole == number else number


def _verdict(reply: list[Any]) -> Verdict:
    """The reserve script's reply: admitted, refused, retry-after (ms), then each check's remaining and reset (ms)."""
    pairs = iter(reply[3:])
    states = tuple(CheckState(remaining, reset / 1000) for remaining, reset in zip(pairs, pairs, strict=True))
    return Verdict(reply[0] == 1, states, reply[1], reply[2] / 1000)


def _unavailable(exc: BaseException) -> LimitStoreUnavailable:
    # The message names the error's type only: redis-py's messages may carry the URL, password included.
    return LimitStoreUnavailable(f"Redis failed: {type(exc).__name__}")
