"""The stream relay's store: where a compute function's stream messages wait for the client's handler.

A streamed request that runs as a compute task cannot answer over the task's own channel (Globus Compute
returns one result at the end), so the function on the node pushes each batch of SSE events to
`POST /resource_server/internal/relay/{task_id}` (`services/relay.py` checks and accepts each message) and
the handler holding the client's connection (`dispatch/compute.py`) reads them from a hub:

- `InProcessRelayHub` (embedded default): a queue per task in this process.
- `RedisRelayHub` (`REDIS_URL` set): a Redis Stream per task, read with blocking XREAD, so the POST may
  land on any worker or host.

A message is parsed and checked once, by the relay route (`RelayMessage.parse`); the hub carries the checked
`RelayMessage` (as it is in process, as plain stream fields in Redis), so the reader never parses JSON again.

Each task gets its own random token, valid only for that task's relay path, only until its stream ends
(or `RELAY_MAX_STREAM_SECONDS`), compared in constant time and stored only as a SHA-256 digest.

One attempt per task: the compute function tags its messages with an id of its own run (`attempt`). Globus
Compute may run a task again after a worker or node is lost (`max_retries_on_system_failure`); the retried
run numbers its messages from 0 again, and the hub refuses them (`Delivery.SUPERSEDED`) once another attempt
has delivered, so two answers are never spliced into one stream. The first attempt to deliver is the one.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import secrets
import threading
import time
import weakref
from collections.abc import Awaitable, Iterator
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any, Protocol, cast

import orjson
from django.conf import settings
from django.urls import reverse

from resource_server.errors import ErrorCode, GatewayError, InvalidRequest, ServiceUnavailable

if TYPE_CHECKING:
    import redis.asyncio as redis
    from redis.commands.core import AsyncScript

logger = logging.getLogger(__name__)


class Delivery(Enum):
    ACCEPTED = "accepted"
    GONE = "gone"  # the stream ended (or expired) since the token was checked
    FULL = "full"  # the waiting handler is this many messages behind: the function should back off
    SUPERSEDED = "superseded"  # another attempt of the task is the stream's: this one must stop


@dataclass(frozen=True, slots=True)
class RelayError:
    """A failure the compute function reports in place of the rest of the stream."""

    status: int
    code: str
    message: str
    body: object = None  # with `vllm_rejected`: vLLM's error body, passed on unchanged


@dataclass(frozen=True, slots=True)
class RelayMessage:
    """One checked message of the compute function's relay protocol (see `compute_functions.inference`).

    Exactly one of: `events` (complete SSE events, relayed verbatim), `done`, `error`; `attempt` names the run
    of the task that sent it (absent from functions registered before it existed: one anonymous attempt).
    """

    seq: int
    events: tuple[bytes, ...] = ()
    done: bool = False
    error: RelayError | None = None
    attempt: str = ""

    @classmethod
    def parse(cls, body: bytes) -> RelayMessage:
        """The message a POST carries, or `InvalidRequest` (400) naming what is wrong with it."""
        try:
            message = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise InvalidRequest("The relay message is not valid JSON.", code=ErrorCode.INVALID_JSON) from None
        if not isinstance(message, dict):
            raise InvalidRequest("The relay message must be a JSON object.")
        seq = message.get("seq")
        if type(seq) is not int or seq < 0:
            raise InvalidRequest("The relay message needs a non-negative integer `seq`.", param="seq")
        attempt = message.get("attempt", "")
        if not isinstance(attempt, str) or len(attempt) > _MAX_ATTEMPT_CHARS:
            raise InvalidRequest(
                f"`attempt` must be a string of at most {_MAX_ATTEMPT_CHARS} characters.", param="attempt"
            )
        kinds = [kind for kind in ("events", "done", "error") if kind in message]
        if len(kinds) != 1 or len(message) != 2 + ("attempt" in message):
            raise InvalidRequest(
                "A relay message carries `seq`, an optional `attempt` and exactly one of `events`, `done`, `error`."
            )
        if kinds == ["events"]:
            events = message["events"]
            # Each event is relayed verbatim to the client, so each must be one complete SSE event.
            if not isinstance(events, list) or not events or not all(_is_event(event) for event in events):
                raise InvalidRequest("`events` must be a list of complete SSE events.", param="events")
            return cls(seq, events=tuple(event.encode() for event in events), attempt=attempt)
        if kinds == ["done"]:
            if message["done"] is not True:
                raise InvalidRequest("`done` must be true.", param="done")
            return cls(seq, done=True, attempt=attempt)
        error = message["error"]
        if not (
            isinstance(error, dict)
            and type(error.get("status")) is int
            and isinstance(error.get("code"), str)
            and isinstance(error.get("message"), str)
        ):
            raise InvalidRequest("`error` needs an integer `status`, a `code` and a `message`.", param="error")
        error = RelayError(error["status"], error["code"], error["message"], error.get("body"))
        return cls(seq, error=error, attempt=attempt)


_MAX_ATTEMPT_CHARS = 64


def _is_event(event: object) -> bool:
    return isinstance(event, str) and event.endswith("\n\n") and "\n\n" not in event[:-2]


class RelayChannel(Protocol):
    """The waiting handler's end of one task's relay."""

    task_id: str
    token: str

    async def read(self, wait: float) -> list[RelayMessage]:
        """Messages that arrived, in order; waits up to `wait` s for the first (0: do not wait)."""
        ...

    async def close(self) -> None:
        """Revoke the token and drop what is left; later POSTs get 403. Never raises for a store failure."""
        ...


class RelayHub(Protocol):
    max_pending: int

    async def open(self, *, lifetime: float) -> RelayChannel: ...

    async def authorized(self, task_id: str, token: str) -> bool: ...

    async def append(self, task_id: str, message: RelayMessage) -> Delivery: ...


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).hexdigest().encode()


def _new_task() -> tuple[str, str]:
    return secrets.token_hex(16), secrets.token_urlsafe(32)


# --- in-process ----------------------------------------------------------------------------------


@dataclass(eq=False)
class _Mailbox:
    task_id: str
    token: str
    digest: bytes
    expires_at: float
    hub: InProcessRelayHub
    # The relay POST may be served on another thread's event loop (e.g. a test server): messages are
    # handed to the owner's loop with call_soon_threadsafe.
    loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.get_running_loop)
    queue: asyncio.Queue[RelayMessage] = field(default_factory=asyncio.Queue)
    attempt: str | None = None  # the attempt whose messages this stream takes: the first to deliver

    async def read(self, wait: float) -> list[RelayMessage]:
        if wait > 0 and self.queue.empty():
            try:
                first = await asyncio.wait_for(self.queue.get(), wait)
            except TimeoutError:
                return []
            messages = [first]
        else:
            messages = []
        while not self.queue.empty():
            messages.append(self.queue.get_nowait())
        return messages

    async def close(self) -> None:
        self.hub._forget(self.task_id)


class InProcessRelayHub:
    """Relay within one process: right for the embedded default's single worker."""

    def __init__(self, *, max_pending: int) -> None:
        self.max_pending = max_pending
        self._mailboxes: dict[str, _Mailbox] = {}
        self._lock = threading.Lock()

    async def open(self, *, lifetime: float) -> RelayChannel:
        task_id, token = _new_task()
        now = time.monotonic()
        mailbox = _Mailbox(task_id, token, _digest(token), now + lifetime, self)
        with self._lock:
            # Handlers always close their mailbox; this only guards against one that never could.
            for stale in [key for key, box in self._mailboxes.items() if box.expires_at < now]:
                del self._mailboxes[stale]
            self._mailboxes[task_id] = mailbox
        return mailbox

    def _live(self, task_id: str) -> _Mailbox | None:
        with self._lock:
            mailbox = self._mailboxes.get(task_id)
        if mailbox is None or mailbox.expires_at < time.monotonic():
            return None
        return mailbox

    async def authorized(self, task_id: str, token: str) -> bool:
        mailbox = self._live(task_id)
        return mailbox is not None and hmac.compare_digest(mailbox.digest, _digest(token))

    async def append(self, task_id: str, message: RelayMessage) -> Delivery:
        mailbox = self._live(task_id)
        if mailbox is None:
            return Delivery.GONE
        with self._lock:
            if mailbox.attempt is None:
                mailbox.attempt = message.attempt
            elif mailbox.attempt != message.attempt:
                return Delivery.SUPERSEDED
        if mailbox.queue.qsize() >= self.max_pending:
            return Delivery.FULL
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is mailbox.loop:
            mailbox.queue.put_nowait(message)
        else:
            mailbox.loop.call_soon_threadsafe(mailbox.queue.put_nowait, message)
        return Delivery.ACCEPTED

    def _forget(self, task_id: str) -> None:
        with self._lock:
            self._mailboxes.pop(task_id, None)


# --- Redis ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def _store_errors() -> Iterator[None]:
    from redis.exceptions import RedisError

    try:
        yield
    except RedisError as exc:
        logger.warning("relay store (Redis) failed: %s", type(exc).__name__)
        raise ServiceUnavailable(
            "The gateway's stream relay is unavailable right now. Please retry shortly.",
            retry_after=5,
            code=ErrorCode.RELAY_UNAVAILABLE,
        ) from None


# Append only while the token exists, from the task's first attempt to deliver, and while the reader is not
# too far behind; the stream and the attempt expire with the token.
# ARGV: the backlog bound, the message's attempt, then the entry's fields and values (`_fields`).
_APPEND = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local ttl = math.max(redis.call('PTTL', KEYS[1]), 1)
if redis.call('SET', KEYS[3], ARGV[2], 'NX', 'PX', ttl) == false and redis.call('GET', KEYS[3]) ~= ARGV[2] then
  return 3
end
if redis.call('XLEN', KEYS[2]) >= tonumber(ARGV[1]) then return 2 end
redis.call('XADD', KEYS[2], '*', unpack(ARGV, 3))
redis.call('PEXPIRE', KEYS[2], ttl)
return 1
"""
_APPEND_RESULTS = {0: Delivery.GONE, 1: Delivery.ACCEPTED, 2: Delivery.FULL, 3: Delivery.SUPERSEDED}


def _fields(message: RelayMessage) -> list[bytes | int | str]:
    """A checked message as a stream entry's fields: `s` seq, `a` attempt, then `e` the events end to end with
    `n` their lengths, or `d`, or the error's `es` status, `ec` code, `em` message and `eb` body (JSON, if any).
    Plain fields, so a reader rebuilds the message without parsing JSON (but a refusal's body); lengths,
    because an event may itself end in more newlines."""
    head: list[bytes | int | str] = ["s", message.seq, "a", message.attempt]
    if message.error is not None:
        error = message.error
        fields = [*head, "es", error.status, "ec", error.code, "em", error.message]
        return fields if error.body is None else [*fields, "eb", orjson.dumps(error.body)]
    if message.done:
        return [*head, "d", 1]
    lengths = ",".join(str(len(event)) for event in message.events)
    return [*head, "e", b"".join(message.events), "n", lengths]


def _message(fields: dict[bytes, bytes]) -> RelayMessage:
    """The message `_fields` stored (it was checked before it was stored)."""
    seq, attempt = int(fields[b"s"]), fields[b"a"].decode()
    if b"e" in fields:
        joined, events, start = fields[b"e"], [], 0
        for length in map(int, fields[b"n"].split(b",")):
            events.append(joined[start : start + length])
            start += length
        return RelayMessage(seq, events=tuple(events), attempt=attempt)
    if b"d" in fields:
        return RelayMessage(seq, done=True, attempt=attempt)
    body = orjson.loads(fields[b"eb"]) if b"eb" in fields else None
    error = RelayError(int(fields[b"es"]), fields[b"ec"].decode(), fields[b"em"].decode(), body)
    return RelayMessage(seq, error=error, attempt=attempt)


# redis-py's defaults do not fit the relay, so each is chosen here (redis-py 8: a 5 s socket timeout on every
# read, ten retries with backoff around every connect and command, at most 100 connections per pool).
# - A stream waits in XREAD BLOCK for as long as its own limits allow (RELAY_FIRST_CHUNK_SECONDS: 900 s), so a
#   socket timeout shorter than the block failed every stream silent for 5 s. Reads block for at most
#   _READ_SLICE_SECONDS at a time, on connections whose timeout is that slice plus RELAY_REDIS_TIMEOUT_SECONDS.
# - Every other command is short: RELAY_REDIS_TIMEOUT_SECONDS bounds it and each connect, and one retry (for a
#   connection that died while idle) keeps a dead Redis from holding a request for a minute of retries.
# - Each waiting stream holds one read connection for its whole XREAD, so the read pool is bounded only by how
#   many requests a worker admits; commands share a small pool and queue for a free connection.
_READ_SLICE_SECONDS = 10.0
_MAX_READ_CONNECTIONS = 100_000
_COMMAND_CONNECTIONS = 64


@dataclass(frozen=True, slots=True)
class _Clients:
    commands: redis.Redis
    reads: redis.Redis
    append: AsyncScript


class RedisRelayHub:
    """Relay through Redis Streams, shared by every worker and host.

    Keys (the braces keep both of a task's keys in one Redis Cluster slot):
        gateway:relay:{<task_id>}:token   SHA-256 of the task's token; expires after the lifetime
        gateway:relay:{<task_id>}:stream  the messages (one entry each, see `_fields`); expires with the token.
                                          Entries read are deleted in the next read's round trip, so the backlog
                                          that RELAY_MAX_PENDING_MESSAGES bounds includes the last batch read.
        gateway:relay:{<task_id>}:attempt the attempt whose messages the stream takes; expires with the token.

    When Redis fails, each operation raises `ServiceUnavailable` (`relay_unavailable`) except a channel's
    `close`, which logs and leaves the keys to expire; connections are made afresh once Redis is back.
    """

    prefix = "gateway:relay"

    def __init__(
        self, url: str, *, max_pending: int, timeout: float = 2.0, read_slice: float = _READ_SLICE_SECONDS
    ) -> None:
        self._url = url
        self.max_pending = max_pending
        self.timeout = timeout
        self.read_slice = read_slice
        # redis.asyncio connections belong to one event loop; tests and commands may run several.
        self._clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Clients] = weakref.WeakKeyDictionary()

    def _connection(self) -> _Clients:
        loop = asyncio.get_running_loop()
        clients = self._clients.get(loop)
        if clients is None:
            clients = self._clients[loop] = self._connect()
        return clients

    def _connect(self) -> _Clients:
        # Imported here: gateways without REDIS_URL never load the client (7 MB per worker).
        from redis.asyncio import BlockingConnectionPool, ConnectionPool, Redis
        from redis.asyncio.retry import Retry
        from redis.backoff import ExponentialBackoff
        from redis.exceptions import ConnectionError as RedisConnectionError
        from redis.exceptions import TimeoutError as RedisTimeoutError

        backoff = ExponentialBackoff(cap=0.5, base=0.05)
        commands = Redis.from_pool(
            BlockingConnectionPool.from_url(
                self._url,
                max_connections=_COMMAND_CONNECTIONS,
                timeout=self.timeout,  # the wait for a free connection
                socket_timeout=self.timeout,
                socket_connect_timeout=self.timeout,
                # Retried commands are safe: an append twice is dropped by its `seq`, the others are idempotent.
                retry=Retry(backoff, 1, (RedisConnectionError, RedisTimeoutError)),
            )
        )
        reads = Redis.from_pool(
            ConnectionPool.from_url(
                self._url,
                max_connections=_MAX_READ_CONNECTIONS,
                socket_timeout=self.read_slice + self.timeout,
                socket_connect_timeout=self.timeout,
                # Not after a read timed out: Redis answered nothing for a whole slice plus the margin.
                retry=Retry(backoff, 1, (RedisConnectionError,)),
            )
        )
        return _Clients(commands, reads, commands.register_script(_APPEND))

    def client(self) -> redis.Redis:
        """For short commands."""
        return self._connection().commands

    def reader(self) -> redis.Redis:
        """For blocking reads of at most `read_slice` s."""
        return self._connection().reads

    def keys(self, task_id: str) -> tuple[str, str, str]:
        key = f"{self.prefix}:{{{task_id}}}"
        return f"{key}:token", f"{key}:stream", f"{key}:attempt"

    async def open(self, *, lifetime: float) -> RelayChannel:
        task_id, token = _new_task()
        token_key = self.keys(task_id)[0]
        with _store_errors():
            await self.client().set(token_key, _digest(token), px=max(int(lifetime * 1000), 1), nx=True)
        return _RedisChannel(task_id, token, self)

    async def authorized(self, task_id: str, token: str) -> bool:
        with _store_errors():
            stored = await self.client().get(self.keys(task_id)[0])
        return isinstance(stored, bytes) and hmac.compare_digest(stored, _digest(token))

    async def append(self, task_id: str, message: RelayMessage) -> Delivery:
        script = self._connection().append
        args = [self.max_pending, message.attempt, *_fields(message)]
        with _store_errors():
            result = await cast(Awaitable[int], script(keys=self.keys(task_id), args=args))
        return _APPEND_RESULTS[int(result)]

    async def aclose(self) -> None:
        """Close this loop's connections (tests; a server's loop lives as long as the process)."""
        clients = self._clients.pop(asyncio.get_running_loop(), None)
        if clients is not None:
            await clients.commands.aclose()
            await clients.reads.aclose()


class _RedisChannel:
    def __init__(self, task_id: str, token: str, hub: RedisRelayHub) -> None:
        self.task_id = task_id
        self.token = token
        self._hub = hub
        self._stream = hub.keys(task_id)[1]
        self._last_id = b"0-0"
        self._read_ids: list[bytes] = []

    async def read(self, wait: float) -> list[RelayMessage]:
        # A long wait is a series of XREADs of at most `read_slice` s each (see the read pool's timeout).
        deadline = time.monotonic() + wait
        while True:
            block = min(deadline - time.monotonic(), self._hub.read_slice) if wait > 0 else 0.0
            messages = await self._read_slice(block)
            if messages or deadline - time.monotonic() <= 0 or wait <= 0:
                return messages

    async def _read_slice(self, wait: float) -> list[RelayMessage]:
        # One round trip: drop what was read last time (so XLEN is the backlog), then wait in Redis for more
        # (XREAD BLOCK: it answers as soon as a message is appended).
        with _store_errors():
            async with self._hub.reader().pipeline(transaction=False) as pipe:
                if self._read_ids:
                    pipe.xdel(self._stream, *self._read_ids)
                block = max(int(wait * 1000), 1) if wait > 0 else None
                pipe.xread({self._stream: self._last_id}, count=self._hub.max_pending, block=block)
                replies: list[Any] = await pipe.execute()
        entries = replies[-1][0][1] if replies[-1] else []
        self._read_ids = [entry_id for entry_id, _fields in entries]
        if entries:
            self._last_id = entries[-1][0]
        return [_message(fields) for _entry_id, fields in entries]

    async def close(self) -> None:
        from redis.exceptions import RedisError

        try:
            await self._hub.client().delete(*self._hub.keys(self.task_id))
        except RedisError as exc:
            # Closing runs as a stream ends, often because Redis just failed: it must not turn that end into a
            # reset connection. Both keys expire with the token (RELAY_MAX_STREAM_SECONDS); until then a
            # function still sending fills the stream and gets 429 `relay_full`, and stops after its retries.
            logger.warning("relay store (Redis) failed closing task %s: %s", self.task_id, type(exc).__name__)


# --- the hub this process uses ------------------------------------------------------------------


def relay_hub_from_settings() -> RelayHub:
    """The hub the settings describe (the composition root builds the process's one)."""
    gateway = settings.GATEWAY
    if gateway.REDIS_URL:
        return RedisRelayHub(
            gateway.REDIS_URL,
            max_pending=gateway.RELAY_MAX_PENDING_MESSAGES,
            timeout=gateway.RELAY_REDIS_TIMEOUT_SECONDS,
        )
    return InProcessRelayHub(max_pending=gateway.RELAY_MAX_PENDING_MESSAGES)


def relay_url(task_id: str) -> str:
    """Where the compute function POSTs this task's messages."""
    base = settings.GATEWAY.RELAY_PUBLIC_URL
    if not base:
        raise GatewayError(
            "Streaming from this cluster is not configured on the gateway (RELAY_PUBLIC_URL is unset). "
            "Please tell the administrators; requests without `stream` still work.",
            code=ErrorCode.RELAY_NOT_CONFIGURED,
        )
    return base.rstrip("/") + reverse("resource_server:relay_message", kwargs={"task_id": task_id})
