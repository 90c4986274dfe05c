"""python -m benchmarks.chaos [--quick] [--rate 30] [--label NAME] [--out DIR]   (`make chaos`)

Faults injected into the gateway as deployed: gunicorn with 2 uvicorn workers on PostgreSQL and Redis, each
reached through a TCP proxy the run can cut, and the fake model server. Under steady load (plain chat, streamed
chat on the direct backend, streamed chat through the compute path and its Redis relay) it injects in turn, with
recovery between: a PostgreSQL cut, a Redis cut, a worker SIGKILL, a SIGTERM of the gateway with streams open
(then starts it again) and the model server killed mid-stream (then restarted). Per fault it prints the requests
sent, how they were answered, the usage rows expected and found in the database, and the seconds to recover; it
writes <out>/<label>.json and .md. See docs/reliability.md.

It makes its own PostgreSQL database (chaos_<pid>) on the server DATABASE_URL names and claims an empty Redis
database on the server REDIS_URL names; it drops the one and empties the other at the end, whatever happens.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import SplitResult, urlsplit, urlunsplit

import httptools
import orjson
import psycopg
import redis
from psycopg import sql

from benchmarks import loadgen, procfs
from benchmarks.stack import (
    _MAKE_KEYS,
    HPC_MODEL,
    MODEL,
    REPO,
    _manage,
    _process,
    _wait_until_up,
    free_port,
    source_revision,
)
from tests.tcp_proxy import TcpProxy

now = time.monotonic
GRACEFUL_TIMEOUT = 30.0  # deploy/gunicorn.conf.py: how long a SIGTERMed gateway may take to stop
PROMPT = [{"role": "user", "content": "Tell me about fault injection."}]
TABLE = "resource_server_requestlog"


def log(message: str) -> None:
    print(f"[chaos {datetime.now(UTC):%H:%M:%S}] {message}", file=sys.stderr, flush=True)


# --- what is sent ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Kind:
    """One kind of request of the mix."""

    name: str
    body: dict[str, Any]
    timeout: float  # the client gives up after this long, whatever the gateway does

    @property
    def stream(self) -> bool:
        return bool(self.body.get("stream"))


def _stream_body(model: str, tokens: int, per_second: float) -> dict[str, Any]:
    # The fake model server paces the stream, so that streams are open when a fault strikes; ignore_eos makes
    # it send exactly `tokens`, so that a stream cut short but closed with [DONE] is noticed.
    fault = {"tokens_per_second": per_second}
    body = {"model": model, "messages": PROMPT, "max_tokens": tokens, "ignore_eos": True, "stream": True}
    return body | {"fake_vllm": fault}


def kinds(timeout: float) -> dict[str, Kind]:
    return {
        kind.name: kind
        for kind in (
            Kind("chat", {"model": MODEL, "messages": PROMPT, "max_tokens": 8}, timeout),
            # With an API key no worker has cached: the request path itself must reach the database.
            Kind("cold-key chat", {"model": MODEL, "messages": PROMPT, "max_tokens": 8}, timeout),
            Kind("stream", _stream_body(MODEL, 30, 20.0), timeout),  # 1.5 s
            Kind("relay", _stream_body(HPC_MODEL, 30, 20.0), timeout),  # the compute path, through Redis
            # Opened just before the SIGTERM: still open when gunicorn's graceful_timeout runs out.
            Kind("long-stream", _stream_body(MODEL, 200, 2.0), 150.0),
            Kind("long-relay", _stream_body(HPC_MODEL, 200, 2.0), 150.0),
        )
    }


MIX = ("chat", "stream", "relay", "chat", "stream", "cold-key chat", "chat", "relay", "chat", "stream")
# Cold keys are used in turn; a key comes round again after longer than API_KEY_CACHE_SECONDS (30 s) at 3 per s.
COLD_KEYS = 200

# --- what came back ------------------------------------------------------------------------------

OK = "200 ok"
ERROR_EVENT = "200 error event"  # a stream that ended with an error event and [DONE]: the failure was told
CUT = "200 cut"  # a stream that stopped before [DONE]: reset, or silent until the client timeout
OUTCOMES = (OK, ERROR_EVENT, CUT, "4xx", "502", "503", "5xx", "timeout", "reset", "refused")
UNANSWERED = frozenset(("timeout", "reset", "refused"))  # no status line: no request id, no row owed
# Refusals before the caller is known (no user to charge) or before any work: no row is owed for them.
BEFORE_AUTH = frozenset(("auth_unavailable", "auth_busy", "globus_unavailable", "gateway_overloaded"))


@dataclass(slots=True)
class Shot:
    """One request and what the client saw of it. Times are seconds of time.monotonic()."""

    index: int
    kind: str
    client_id: str  # sent as X-Request-ID; unique in the run
    sent: float
    stream: bool = False
    finished: float | None = None
    status: int = 0
    request_id: str = ""  # the X-Request-ID the gateway answered with
    error: str = ""  # "timeout", "reset" or "refused" when the exchange did not complete
    outcome: str = ""
    code: str = ""  # the error code of an error answer or error event

    @property
    def ok(self) -> bool:
        return self.outcome == OK


def outcome_of(status: int, stream: bool, body: bytes, error: str, tokens: int = 0) -> tuple[str, str]:
    """The outcome class of one exchange and its error code, from what the client received; a stream
    must end with [DONE] after `tokens` tokens."""
    if status == 0:
        return (error or "reset"), ""
    if status == 200:
        if not stream:
            return (CUT if error else OK), ""
        events = [event for event in body.split(b"\n\n") if event.startswith(b"data: ")]
        code = ""
        for event in events:
            if event.startswith(b'data: {"error"'):
                code = _error_code(event[6:]) or "?"
        if error or not events or not events[-1].startswith(b"data: [DONE]"):
            return CUT, code
        if code:
            return ERROR_EVENT, code
        if sum(1 for event in events if b'"delta":{"content":' in event) < tokens:
            return CUT, "short"  # ended as if complete, yet short of its tokens: worse than an error event
        return OK, code
    code = _error_code(body)
    if 400 <= status < 500:
        return "4xx", code
    if status in (502, 503):
        return str(status), code
    return "5xx", code


def _error_code(payload: bytes) -> str:
    try:
        error = orjson.loads(payload).get("error") or {}
    except (orjson.JSONDecodeError, AttributeError):
        return ""
    return str(error.get("code") or error.get("type") or "") if isinstance(error, dict) else ""


class _Connection(loadgen.Connection):
    """The load generator's HTTP/1.1 connection, keeping the X-Request-ID header and the body."""

    MAX_BODY = 256 * 1024

    def __init__(self) -> None:
        super().__init__()
        self.request_id = ""
        self.body = bytearray()

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"x-request-id":
            self.request_id = value.decode("latin1")

    def on_body(self, body: bytes) -> None:
        if len(self.body) < self.MAX_BODY:
            self.body += body


class Load:
    """Open-loop load: requests of the mix sent at `rate` per second whatever the answers, one connection each."""

    def __init__(self, port: int, key: str, cold_keys: list[str], rate: float, timeout: float, tag: str) -> None:
        self.port = port
        self.key = key
        self.cold_keys = cold_keys
        self._cold_turn = 0
        self.rate = rate
        self.kinds = kinds(timeout)
        self.tag = tag
        self.shots: list[Shot] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._pacer: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._pacer = asyncio.get_running_loop().create_task(self._pace())

    async def stop(self) -> None:
        """Stop sending; wait for the requests in flight, which all end by their client timeout."""
        if self._pacer is not None:
            self._pacer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pacer
        if self._tasks:
            longest = max(kind.timeout for kind in self.kinds.values())
            await asyncio.wait(self._tasks, timeout=longest + 5)

    async def _pace(self) -> None:
        started, sent = now(), 0
        for turn in itertools.count():
            due = started + sent / self.rate
            if now() - due > 1.0:  # the harness was held up: carry on at the rate rather than burst
                started, sent = now(), 0
                due = started
            await asyncio.sleep(max(0.0, due - now()))
            self.fire(MIX[turn % len(MIX)])
            sent += 1

    def fire(self, kind: str) -> Shot:
        shot = Shot(len(self.shots), kind, f"{self.tag}-{len(self.shots):06d}", now(), self.kinds[kind].stream)
        self.shots.append(shot)
        task = asyncio.get_running_loop().create_task(self._exchange(shot))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return shot

    def _request(self, shot: Shot) -> bytes:
        body = orjson.dumps(self.kinds[shot.kind].body)
        key = self.key
        if shot.kind == "cold-key chat":
            key = self.cold_keys[self._cold_turn % len(self.cold_keys)]
            self._cold_turn += 1
        head = (
            f"POST /resource_server/v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n"
            f"Content-Type: application/json\r\nAuthorization: Bearer {key}\r\n"
            f"X-Request-ID: {shot.client_id}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        )
        return head.encode() + body

    async def _exchange(self, shot: Shot) -> None:
        loop = asyncio.get_running_loop()
        connection: _Connection | None = None
        exchange = loadgen.Exchange(stream=False)  # _Connection keeps the body; no token bookkeeping needed
        try:
            async with asyncio.timeout(self.kinds[shot.kind].timeout):
                try:
                    _, connection = await loop.create_connection(_Connection, "127.0.0.1", self.port)
                except OSError:
                    shot.error = "refused"
                    return
                await connection.send(self._request(shot), exchange)
        except TimeoutError:
            shot.error = "timeout"
        except (OSError, httptools.HttpParserError):
            shot.error = "reset"
        finally:
            shot.finished = now()
            body = b""
            if connection is not None:
                connection.abort()
                shot.request_id, body = connection.request_id, bytes(connection.body)
            shot.status = exchange.status
            tokens = int(self.kinds[shot.kind].body["max_tokens"]) if shot.stream else 0
            shot.outcome, shot.code = outcome_of(shot.status, shot.stream, body, shot.error, tokens)

    def open_streams(self) -> int:
        """Streams sent and not ended yet."""
        return sum(1 for shot in self.shots if shot.stream and shot.finished is None)


# --- recovery and tabulation (pure) ----------------------------------------------------------------


def healthy_since(shots: Sequence[Shot], lifted: float, at: float, settle: float) -> float | None:
    """The send time from which every request sent after `lifted` succeeded, judged at time `at`.

    None while the last judged request failed, or before any succeeded. A request still open `settle` s after
    it was sent counts as failing (it hangs); younger open ones are not judged yet.
    """
    since: float | None = None
    for shot in sorted((s for s in shots if s.sent >= lifted), key=lambda s: s.sent):
        if shot.finished is None and at - shot.sent <= settle:
            continue
        good = shot.finished is not None and shot.ok
        since = (shot.sent if since is None else since) if good else None
    return since


def first_success(shots: Sequence[Shot], lifted: float) -> float | None:
    """When the first request sent after `lifted` that succeeded was answered."""
    answered = [s.finished for s in shots if s.sent >= lifted and s.ok and s.finished is not None]
    return min(answered) if answered else None


def rows_again(samples: Sequence[tuple[float, int]], lifted: float) -> float | None:
    """The first sample after `lifted` with more usage rows than at `lifted`: rows are being written again."""
    before = [count for at, count in samples if at <= lifted]
    baseline = before[-1] if before else 0
    for at, count in samples:
        if at > lifted and count > baseline:
            return at
    return None


@dataclass(slots=True)
class Tally:
    """What one phase's requests got, and the usage rows found for them in the database."""

    sent: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)
    before_auth: int = 0  # answered with a refusal before authentication (BEFORE_AUTH): no row owed
    rows_expected: int = 0  # the other answered requests: each must have exactly one row
    rows_found: int = 0  # answered requests with at least one row
    missing: int = 0
    missing_by: dict[str, int] = field(default_factory=dict)  # "503 auth_unavailable" -> requests without a row
    duplicates: int = 0  # rows beyond the first for one request
    unanswered_with_row: int = 0  # a timeout or reset that the gateway did record
    by_kind: dict[str, dict[str, int]] = field(default_factory=dict)  # kind -> outcome -> requests


def tabulate(shots: Sequence[Shot], rows: Mapping[str, int]) -> Tally:
    """Count outcomes and match usage rows (`rows`: rows per client request id) for one phase's requests."""
    tally = Tally(sent=len(shots))
    outcomes: Counter[str] = Counter(shot.outcome for shot in shots)
    missing_by: Counter[str] = Counter()
    by_kind: dict[str, Counter[str]] = {}
    for shot in shots:
        by_kind.setdefault(shot.kind, Counter())[shot.outcome] += 1
        found = rows.get(shot.client_id, 0)
        tally.duplicates += max(0, found - 1)
        if shot.outcome in UNANSWERED:
            tally.unanswered_with_row += found > 0
            continue
        if shot.code in BEFORE_AUTH:
            tally.before_auth += 1
            continue
        tally.rows_expected += 1
        if found:
            tally.rows_found += 1
        else:
            tally.missing += 1
            missing_by[f"{shot.outcome} {shot.code}".strip()] += 1
    tally.outcomes = {name: outcomes[name] for name in OUTCOMES if outcomes[name]}
    tally.missing_by = dict(missing_by.most_common())
    tally.by_kind = {kind: dict(counts.most_common()) for kind, counts in sorted(by_kind.items())}
    return tally


# --- the usage rows ------------------------------------------------------------------------------


def usage_rows(connection: psycopg.Connection[Any]) -> tuple[Counter[str], int]:
    """Usage rows per request, keyed by the id this harness sent as X-Request-ID; and all rows in the database.

    The gateway keys each row by its own id and keeps the caller's X-Request-ID beside it in
    client_request_id, so a client that reuses an id cannot merge requests: counting by the sent id finds
    every row a request left, duplicates included.
    """
    query = sql.SQL("SELECT client_request_id, count(*) FROM {table} GROUP BY client_request_id").format(
        table=sql.Identifier(TABLE)
    )
    per_request: Counter[str] = Counter({str(key): int(count) for key, count in connection.execute(query)})
    total = connection.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(TABLE))).fetchone()
    return per_request, int(total[0]) if total else 0


# --- the services under test -----------------------------------------------------------------------


@contextmanager
def postgres_database(server_url: str) -> Iterator[str]:
    """A new database chaos_<pid> on the server of `server_url`; dropped on exit. Yields its URL."""
    parts = urlsplit(server_url)
    name = f"chaos_{os.getpid()}"
    admin = urlunsplit(parts._replace(path="/postgres"))
    with psycopg.connect(admin, autocommit=True, connect_timeout=10) as connection:
        _drop_leftovers(connection)
        connection.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield urlunsplit(parts._replace(path=f"/{name}"))
    finally:
        with psycopg.connect(admin, autocommit=True, connect_timeout=10) as connection:
            # FORCE: a gateway process that outlived its group kill must not keep the database.
            connection.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        log(f"dropped database {name}")


def _drop_leftovers(connection: psycopg.Connection[Any]) -> None:
    """Drop the databases of earlier runs that were killed outright (their process is gone)."""
    for (name,) in connection.execute("SELECT datname FROM pg_database WHERE datname ~ '^chaos_[0-9]+$'"):
        if not Path(f"/proc/{name.removeprefix('chaos_')}").exists():
            connection.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
            log(f"dropped {name}, left by a run that was killed")


CLAIM = "chaos:claimed-by"


@contextmanager
def redis_database(server_url: str, number: int | None) -> Iterator[str]:
    """An empty Redis database on the server of `server_url` (`number`, or the highest empty one), claimed
    with a key so that another run does not take it too; emptied on exit. Yields its URL."""
    parts = urlsplit(server_url)

    def url(index: int) -> str:
        return urlunsplit(parts._replace(path=f"/{index}"))

    def connect(index: int) -> redis.Redis:
        return redis.Redis.from_url(url(index), socket_timeout=5, socket_connect_timeout=5)

    probe = connect(0)
    try:
        count = int(str(probe.config_get("databases")["databases"]))
    except (redis.RedisError, KeyError, ValueError):
        count = 16  # CONFIG may be disabled; 16 is Redis's default
    finally:
        probe.close()
    for index in [number] if number is not None else range(count - 1, -1, -1):
        client = connect(index)
        owner = client.get(CLAIM)
        if owner is not None and not Path(f"/proc/{int(owner)}").exists():
            client.flushdb()  # left by a run that was killed outright
            log(f"emptied Redis database {index}, left by a run that was killed")
        if client.set(CLAIM, str(os.getpid()), nx=True):
            if client.dbsize() == 1:
                break
            client.delete(CLAIM)
        client.close()
    else:
        where = f"database {number}" if number is not None else "database"
        raise RuntimeError(f"no empty Redis {where} at {parts.netloc}; pass --redis-db N of an empty one")
    try:
        yield url(index)
    finally:
        client.flushdb()
        client.close()
        log(f"emptied Redis database {index}")


def _via(url: str, port: int) -> str:
    """`url` with its host and port replaced by 127.0.0.1:`port` (a proxy), credentials kept."""
    parts = urlsplit(url)
    userinfo, at, _ = parts.netloc.rpartition("@")
    return urlunsplit(parts._replace(netloc=f"{userinfo}{at}127.0.0.1:{port}"))


def _proxy(stack: ExitStack, url: str, default_port: int) -> TcpProxy:
    parts: SplitResult = urlsplit(url)
    proxy = TcpProxy((parts.hostname or "127.0.0.1", parts.port or default_port))
    proxy.restore()
    stack.callback(proxy.cut)
    return proxy


class Service:
    """A server process that the run may kill and start again; `stop()` ends it (and may be called twice)."""

    def __init__(
        self, args: list[str], *, env: dict[str, str], log: Path, health: str, session: bool, stop_timeout: float
    ) -> None:
        self.args, self.env, self.log, self.health = args, env, log, health
        self.session, self.stop_timeout = session, stop_timeout
        self._stack: ExitStack | None = None
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def process(self) -> subprocess.Popen[bytes]:
        assert self._process is not None, "not started"
        return self._process

    def start(self) -> None:
        self.stop()
        stack = ExitStack()
        self._stack = stack
        self._process = stack.enter_context(
            _process(
                self.args,
                cwd=REPO,
                env=self.env,
                cpus=None,
                log=self.log,
                session=self.session,
                stop_timeout=self.stop_timeout,
            )
        )
        _wait_until_up(self.health, self._process, self.log)  # raises after 60 s, and stop() still applies

    def stop(self) -> None:
        if self._stack is not None:
            stack, self._stack = self._stack, None
            stack.close()


# --- the campaign ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Timing:
    baseline: float = 10.0  # steady load before the first fault
    lead_in: float = 5.0  # steady load before each fault
    db_cut: float = 60.0
    redis_cut: float = 30.0
    model_down: float = 5.0
    recovery_max: float = 20.0  # no normal service this long after a fault is lifted: restart the gateway
    stable: float = 5.0  # every request succeeding for this long: recovered
    warmup_max: float = 60.0
    settle_max: float = 60.0  # waiting for the last usage rows after the load stops


FULL = Timing()
QUICK = Timing(baseline=5.0, lead_in=3.0, db_cut=10.0, redis_cut=10.0, model_down=2.0, recovery_max=15.0, stable=3.0)
SETTLE = 6.0  # a request of the mix open this long hangs (streams take about 1.5 s)


@dataclass(slots=True)
class Phase:
    """One stretch of the run: steady load, then a fault and the recovery from it."""

    name: str
    started: float
    fault: str = ""
    injected: float | None = None
    lifted: float | None = None
    ended: float = 0.0
    streams_open: int | None = None
    recovered: bool | None = None
    restarted: float | None = None  # when the harness restarted a gateway that had not recovered
    notes: list[str] = field(default_factory=list)
    tally: Tally | None = None
    first_ok_s: float | None = None
    all_ok_s: float | None = None
    rows_again_s: float | None = None


@dataclass
class Rig:
    gateway: Service
    fake: Service
    postgres_proxy: TcpProxy
    redis_proxy: TcpProxy
    load: Load
    timing: Timing
    database_url: str  # direct, not through the proxy: the harness counts rows while the gateway cannot
    samples: list[tuple[float, int]] = field(default_factory=list)  # (time, usage rows in the database)
    aborted: str = ""  # why the run stopped before the last fault, if it did


async def _sample_rows(url: str, samples: list[tuple[float, int]]) -> None:
    """Count the usage rows every half second, for when rows are written again after a fault."""
    connection: psycopg.AsyncConnection[Any] | None = None
    query = sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(TABLE))
    try:
        while True:
            try:
                async with asyncio.timeout(5):
                    if connection is None:
                        connection = await psycopg.AsyncConnection.connect(url, autocommit=True)
                    row = await (await connection.execute(query)).fetchone()
                samples.append((now(), int(row[0]) if row else 0))
            except (TimeoutError, psycopg.Error) as exc:
                log(f"counting usage rows failed ({type(exc).__name__}); trying again")
                if connection is not None:
                    await connection.close()
                connection = None
            await asyncio.sleep(0.5)
    finally:
        if connection is not None:
            await connection.close()


def _strike(rig: Rig, phase: Phase) -> None:
    phase.injected = now()
    phase.streams_open = rig.load.open_streams()
    log(f"{phase.name}: {phase.fault} ({phase.streams_open} streams open)")


async def _stop_gateway(rig: Rig, phase: Phase) -> None:
    """SIGTERM the gunicorn master, as systemd would, and wait (bounded) for it to exit."""
    process = rig.gateway.process
    began = now()
    process.send_signal(signal.SIGTERM)
    try:
        code: int | None = await asyncio.to_thread(process.wait, GRACEFUL_TIMEOUT + 15)
    except subprocess.TimeoutExpired:
        code = None
    took = now() - began
    await asyncio.to_thread(rig.gateway.stop)  # kills what is left of its process group
    phase.notes.append(
        f"the gateway took {took:.1f} s to stop after SIGTERM (exit code {code})"
        if code is not None
        else f"the gateway had not stopped {took:.0f} s after SIGTERM: the harness killed it"
    )


async def _start_gateway(rig: Rig) -> None:
    await asyncio.to_thread(rig.gateway.start)


async def cut_postgres(rig: Rig, phase: Phase) -> None:
    _strike(rig, phase)
    rig.postgres_proxy.cut()
    await asyncio.sleep(rig.timing.db_cut)
    rig.postgres_proxy.restore()
    phase.lifted = now()


async def cut_redis(rig: Rig, phase: Phase) -> None:
    _strike(rig, phase)
    rig.redis_proxy.cut()
    await asyncio.sleep(rig.timing.redis_cut)
    rig.redis_proxy.restore()
    phase.lifted = now()


async def kill_worker(rig: Rig, phase: Phase) -> None:
    workers = sorted(procfs.children(rig.gateway.process.pid))
    victim = workers[0]
    _strike(rig, phase)
    os.kill(victim, signal.SIGKILL)
    phase.lifted = now()  # gunicorn starts a new worker by itself
    phase.notes.append(f"killed worker {victim} of {len(workers)}; gunicorn started another")


async def sigterm_gateway(rig: Rig, phase: Phase) -> None:
    for kind in ("long-stream", "long-stream", "long-relay", "long-relay"):
        rig.load.fire(kind)
    await asyncio.sleep(2.0)  # their first tokens are out: they are open when the signal comes
    _strike(rig, phase)
    await _stop_gateway(rig, phase)
    phase.lifted = now()  # the operator starts it again
    await _start_gateway(rig)
    phase.notes.append("4 streams of 100 s were open, to outlast graceful_timeout")


async def kill_model_server(rig: Rig, phase: Phase) -> None:
    _strike(rig, phase)
    rig.fake.process.kill()
    await asyncio.to_thread(rig.fake.stop)
    await asyncio.sleep(rig.timing.model_down)
    phase.lifted = now()
    await asyncio.to_thread(rig.fake.start)


def faults(timing: Timing) -> list[tuple[str, str, Any]]:
    return [
        (f"PostgreSQL cut {timing.db_cut:.0f} s", "PostgreSQL unreachable (TCP proxy cut)", cut_postgres),
        (f"Redis cut {timing.redis_cut:.0f} s", "Redis unreachable (TCP proxy cut)", cut_redis),
        ("worker SIGKILL", "one gunicorn worker killed with SIGKILL", kill_worker),
        ("gateway SIGTERM", "SIGTERM to the gunicorn master with streams open, then started again", sigterm_gateway),
        (
            "model server killed",
            f"the model server killed with SIGKILL mid-stream, restarted {timing.model_down:.0f} s later",
            kill_model_server,
        ),
    ]


async def _recover(rig: Rig, phase: Phase) -> None:
    """Wait until every request succeeds for `stable` s; restart the gateway if it does not, so the next
    fault starts from a serving gateway (and say so)."""
    assert phase.lifted is not None
    timing = rig.timing
    for attempt in range(2):
        deadline = now() + timing.recovery_max
        while now() < deadline:
            await asyncio.sleep(0.5)
            since = healthy_since(rig.load.shots, phase.lifted, now(), SETTLE)
            if since is not None and now() - since >= timing.stable:
                phase.recovered = attempt == 0
                return
        if attempt == 0:
            phase.restarted = now()
            log(f"{phase.name}: not serving normally {timing.recovery_max:.0f} s after the fault; restarting")
            phase.notes.append(
                f"not serving normally {timing.recovery_max:.0f} s after the fault was lifted: "
                "the harness restarted the gateway"
            )
            await _stop_gateway(rig, phase)
            await _start_gateway(rig)
    phase.recovered = False
    phase.notes.append(f"still failing {timing.recovery_max:.0f} s after that restart")


async def _warm_up(rig: Rig) -> Phase:
    """Load until each kind of the mix has succeeded once (the compute path starts its process pools)."""
    phase = Phase("warm-up", now())
    deadline = now() + rig.timing.warmup_max
    wanted = set(MIX)
    while now() < deadline:
        served = {shot.kind for shot in rig.load.shots if shot.ok}
        if wanted <= served:
            phase.ended = now()
            return phase
        await asyncio.sleep(0.5)
    missing = ", ".join(sorted(wanted - {shot.kind for shot in rig.load.shots if shot.ok}))
    raise RuntimeError(f"the gateway served no {missing} request in {rig.timing.warmup_max:.0f} s; see its log")


async def _settle(url: str, timing: Timing) -> int:
    """Wait until the usage row count holds still for 5 s (bounded); return it."""
    query = sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(TABLE))
    deadline = now() + timing.settle_max
    last, since = -1, now()
    async with await psycopg.AsyncConnection.connect(url, autocommit=True, connect_timeout=10) as connection:
        while now() < deadline:
            async with asyncio.timeout(10):
                row = await (await connection.execute(query)).fetchone()
            count = int(row[0]) if row else 0
            if count != last:
                last, since = count, now()
            elif now() - since >= 5.0:
                break
            await asyncio.sleep(0.5)
    return last


async def campaign(rig: Rig) -> list[Phase]:
    """Steady load, then each fault in turn with recovery between; the phases, timed."""
    sampler = asyncio.get_running_loop().create_task(_sample_rows(rig.database_url, rig.samples))
    rig.load.start()
    phases: list[Phase] = []
    try:
        try:
            log("warming up")
            phases.append(await _warm_up(rig))
            phase = Phase("steady load", now())
            log(f"steady load for {rig.timing.baseline:.0f} s")
            await asyncio.sleep(rig.timing.baseline)
            phase.ended = now()
            phases.append(phase)
            for name, description, inject in faults(rig.timing):
                phase = Phase(name, now(), fault=description)
                phases.append(phase)
                await asyncio.sleep(rig.timing.lead_in)
                await inject(rig, phase)
                await _recover(rig, phase)
                phase.ended = now()
                log(f"{name}: {'recovered' if phase.recovered else 'did not recover by itself'}")
        except Exception as exc:
            # Report what was seen up to here: the requests sent and the rows written are still the truth.
            rig.aborted = f"{type(exc).__name__}: {exc}"
            log(f"the run stops early: {rig.aborted}")
        log("stopping the load; waiting for the requests in flight")
        await rig.load.stop()
        if phases:
            phases[-1].ended = now()
        log("waiting for the last usage rows")
        await _settle(rig.database_url, rig.timing)
    finally:
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler
    return phases


def score(phases: list[Phase], shots: Sequence[Shot], rows: Mapping[str, int], samples: Sequence[Any]) -> None:
    """Fill in each phase's tally and recovery times: its requests are those sent while it ran."""
    for phase in phases:
        mine = [shot for shot in shots if phase.started <= shot.sent < phase.ended]
        phase.tally = tabulate(mine, rows)
        if phase.lifted is None:
            continue
        # How the gateway recovered by itself: what came after a restart by the harness does not count.
        lifted, horizon = phase.lifted, phase.restarted or float("inf")
        unaided = [shot for shot in mine if shot.sent < horizon]
        first = first_success(unaided, lifted)
        since = healthy_since(unaided, lifted, float("inf"), SETTLE)
        again = rows_again([sample for sample in samples if sample[0] < horizon], lifted)
        phase.first_ok_s = None if first is None else round(first - lifted, 2)
        phase.all_ok_s = None if since is None else round(max(0.0, since - lifted), 2)
        phase.rows_again_s = None if again is None else round(again - lifted, 2)


# --- the report ----------------------------------------------------------------------------------

_LOG_LEVEL = re.compile(r"\b(WARNING|ERROR|CRITICAL)\b|Traceback")
_LOG_PREFIX = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ |\[[^]]*\] \[\d+\] )")
_LOG_VARYING = re.compile(r"[0-9a-f]{8,}|\d+")


def log_summary(text: str, top: int = 15) -> list[tuple[str, int]]:
    """The most frequent warning and error lines of a log, with numbers and ids blanked out."""
    counts: Counter[str] = Counter()
    for line in text.splitlines():
        if _LOG_LEVEL.search(line):
            counts[_LOG_VARYING.sub("#", _LOG_PREFIX.sub("", line))[:160]] += 1
    return counts.most_common(top)


def _cell(value: float | int | None, unit: str = "") -> str:
    if value is None:
        return "never"
    return f"{value:.1f}{unit}" if isinstance(value, float) else str(value)


def markdown(run: dict[str, Any]) -> str:
    lines = [
        f"Chaos run `{run['label']}`: gateway {run['revision']}, {run['started']}, {run['duration_s']:.0f} s; "
        f"{run['rate']:.0f} requests/s ({run['mix']}), client timeout {run['timeout']:.0f} s; "
        f"2 uvicorn workers on PostgreSQL and Redis (each behind a cuttable TCP proxy); {run['machine']['cores']} "
        f"cores, load average at the end {run['load_average_after'][0]:.1f}.",
        "",
        *([f"**The run stopped early**: {run['aborted']}", ""] if run["aborted"] else []),
        "| phase | sent | 200 ok | 200 error event | 200 cut | 4xx | 502 | 503 | other 5xx | timeout | reset/refused "
        "| refused before auth | rows owed | rows found | missing | duplicate rows | first ok (s) | all ok from (s) "
        "| rows again (s) |",
        "|---|" + "---:|" * 18,
    ]
    for phase in run["phases"]:
        tally, outcomes = phase["tally"], phase["tally"]["outcomes"]
        cells = [
            phase["name"],
            tally["sent"],
            *(outcomes.get(name, 0) for name in (OK, ERROR_EVENT, CUT, "4xx", "502", "503", "5xx", "timeout")),
            outcomes.get("reset", 0) + outcomes.get("refused", 0),
            tally["before_auth"],
            tally["rows_expected"],
            tally["rows_found"],
            tally["missing"],
            tally["duplicates"],
        ]
        if phase["lifted"] is None:
            cells += ["", "", ""]
        else:
            cells += [_cell(phase["first_ok_s"]), _cell(phase["all_ok_s"]), _cell(phase["rows_again_s"])]
        lines.append("| " + " | ".join(str(cell) for cell in cells) + " |")
    lines += [
        "",
        "Recovery is counted from the moment the fault was lifted (proxy restored, worker killed, gateway or model "
        "server started again). *first ok*: the first request sent after it answered in full; *all ok from*: the "
        "send time from which every request succeeded; *rows again*: the first new usage row in the database; "
        "*never*: not before the run moved on (or restarted the gateway). *200 cut*: a stream that stopped before "
        "`[DONE]`. *Refused before auth*: 503 `auth_unavailable`, `auth_busy` or `gateway_overloaded`, which name "
        "no user to charge, so no row is owed; every other answer owes exactly one row.",
        "",
    ]
    for phase in run["phases"]:
        details = list(phase["notes"])
        if phase["fault"]:
            details.insert(0, f"{phase['fault']}; {phase['streams_open']} streams open at that moment")
        tally = phase["tally"]
        failing = {
            kind: ", ".join(f"{outcome} x{n}" for outcome, n in outcomes.items() if outcome != OK)
            for kind, outcomes in tally["by_kind"].items()
            if set(outcomes) - {OK}
        }
        if failing:
            details.append("by kind: " + "; ".join(f"{kind}: {text}" for kind, text in failing.items()))
        if tally["missing_by"]:
            details.append(
                "answered without a usage row: " + ", ".join(f"{key} x{n}" for key, n in tally["missing_by"].items())
            )
        if tally["unanswered_with_row"]:
            details.append(f"{tally['unanswered_with_row']} requests without an answer have a row all the same")
        if details:
            lines.append(f"- **{phase['name']}**: " + "; ".join(details) + ".")
    totals = run["totals"]
    lines += [
        "",
        f"Usage rows in the database: {totals['rows_in_database']}; belonging to the run's requests: "
        f"{totals['rows_matched']}; others: {totals['rows_unmatched']}. The gateway echoed the sent X-Request-ID "
        f"on {totals['echoed']} of {totals['answered']} answers.",
        "",
        "Most frequent warnings and errors in the gateway's log (numbers blanked):",
        "",
        "```",
        *(f"{count:6d}  {line}" for line, count in run["gateway_log"]),
        "```",
        "",
    ]
    return "\n".join(lines)


# --- main ------------------------------------------------------------------------------------------


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    assert __doc__ is not None
    parser = argparse.ArgumentParser(prog="python -m benchmarks.chaos", description=__doc__.split("\n\n")[1])
    parser.add_argument("--quick", action="store_true", help="10 s cuts and shorter waits (about 3 minutes)")
    parser.add_argument("--rate", type=float, default=30.0, help="requests per second (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=20.0, help="client timeout, s (default: %(default)s)")
    parser.add_argument(
        "--postgres",
        default=os.environ.get("DATABASE_URL") or "postgres://postgres@127.0.0.1:5432/postgres",
        help="a URL of the PostgreSQL server to make the run's database on (default: $DATABASE_URL's server)",
    )
    parser.add_argument(
        "--redis",
        default=os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/0",
        help="a URL of the Redis server (default: $REDIS_URL's server); the run claims an empty database on it",
    )
    parser.add_argument("--redis-db", type=int, help="the Redis database to use (must be empty; default: the highest)")
    parser.add_argument("--label", help="name of the result files (default: chaos or chaos-quick, and the time)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--keep-logs", action="store_true", help="copy the gateway's and model server's logs to --out")
    options = parser.parse_args(argv)
    if not options.postgres.startswith(("postgres://", "postgresql://")):
        parser.error("--postgres (or DATABASE_URL) must be a postgres:// URL")
    if options.rate <= 0 or options.timeout <= 0:
        parser.error("--rate and --timeout must be positive")
    return options


def _run(stack: ExitStack, options: argparse.Namespace, timing: Timing, label: str) -> dict[str, Any]:
    workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="gateway-chaos-")))
    if options.keep_logs:
        stack.callback(_keep_logs, workdir, options.out, label)
    database_url = stack.enter_context(postgres_database(options.postgres))
    redis_url = stack.enter_context(redis_database(options.redis, options.redis_db))
    postgres_proxy = _proxy(stack, database_url, 5432)
    redis_proxy = _proxy(stack, redis_url, 6379)
    env = {"DATABASE_URL": database_url, "REDIS_URL": redis_url, "DATA_DIR": str(workdir / "data")}
    fake_port, gateway_port = free_port(), free_port()
    log(f"database {urlsplit(database_url).path[1:]}, Redis database {urlsplit(redis_url).path[1:]}; seeding")
    _manage(REPO, env, "migrate", "--verbosity", "0")
    _manage(REPO, env, "seed_demo", "--model-url", f"http://127.0.0.1:{fake_port}/v1", "--model", MODEL)
    key = _manage(REPO, env, "create_api_key", "--user", "chaos@example.org", "--name", "chaos").strip()
    cold_keys = _manage(REPO, env, "shell", "--no-imports", "-c", _MAKE_KEYS.format(count=COLD_KEYS)).split()

    # Both model names: the compute function asks the model server for the model by its endpoint's name.
    models = ["--model", MODEL, "--model", HPC_MODEL]
    fake = Service(
        [sys.executable, "-m", "fakes.model_server", "--port", str(fake_port), *models],
        env={},
        log=workdir / "model-server.log",
        health=f"http://127.0.0.1:{fake_port}/health",
        session=False,
        stop_timeout=10.0,
    )
    stack.callback(fake.stop)
    fake.start()
    gateway_env = env | {
        "DATABASE_URL": _via(database_url, postgres_proxy.port),
        "REDIS_URL": _via(redis_url, redis_proxy.port),
        "GATEWAY_WORKERS": "2",
        "RELAY_PUBLIC_URL": f"http://127.0.0.1:{gateway_port}",  # where the compute function posts its chunks
    }
    gunicorn = str(Path(sys.executable).with_name("gunicorn"))
    gateway = Service(
        [gunicorn, "-c", "deploy/gunicorn.conf.py", "--chdir", str(REPO), "--bind", f"127.0.0.1:{gateway_port}"],
        env=gateway_env,
        log=workdir / "gateway.log",
        health=f"http://127.0.0.1:{gateway_port}/resource_server/health",
        session=True,
        stop_timeout=GRACEFUL_TIMEOUT + 5,
    )
    stack.callback(gateway.stop)
    gateway.start()
    log(f"gateway on port {gateway_port} (log {workdir / 'gateway.log'}), model server on port {fake_port}")

    load = Load(gateway_port, key, cold_keys, options.rate, options.timeout, f"chaos-{os.getpid()}")
    rig = Rig(gateway, fake, postgres_proxy, redis_proxy, load, timing, database_url)
    phases = asyncio.run(campaign(rig))

    with psycopg.connect(database_url, connect_timeout=10) as connection:
        rows, in_database = usage_rows(connection)
    score(phases, load.shots, rows, rig.samples)
    if options.keep_logs:
        options.out.mkdir(parents=True, exist_ok=True)
        with (options.out / f"{label}-requests.jsonl").open("wb") as requests:
            for shot in load.shots:
                requests.write(orjson.dumps({**asdict(shot), "rows": rows.get(shot.client_id, 0)}) + b"\n")
    answered = [shot for shot in load.shots if shot.outcome not in UNANSWERED]
    return {
        "aborted": rig.aborted,
        "phases": [asdict(phase) for phase in phases],
        "totals": {
            "sent": len(load.shots),
            "answered": len(answered),
            "echoed": sum(shot.request_id == shot.client_id for shot in answered),
            "rows_in_database": in_database,
            "rows_matched": sum(rows.get(shot.client_id, 0) for shot in load.shots),
            "rows_unmatched": in_database - sum(rows.get(shot.client_id, 0) for shot in load.shots),
        },
        "gateway_log": log_summary((workdir / "gateway.log").read_text(errors="replace")),
    }


def _keep_logs(workdir: Path, out: Path, label: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name in ("gateway.log", "model-server.log"):
        if (workdir / name).exists():
            (out / f"{label}-{name}").write_bytes((workdir / name).read_bytes())


def _relative(phases: list[dict[str, Any]], origin: float) -> None:
    """Phase times as seconds since the run began, which a reader can follow."""
    for phase in phases:
        for name in ("started", "injected", "lifted", "restarted", "ended"):
            if phase[name] is not None:
                phase[name] = round(phase[name] - origin, 2)


def main(argv: list[str] | None = None) -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stopped with SIGTERM, still clean up
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with SIGINT ignored (`cmd &`)
    options = _arguments(argv)
    timing = QUICK if options.quick else FULL
    label = options.label or f"{'chaos-quick' if options.quick else 'chaos'}-{datetime.now(UTC):%Y%m%dT%H%M%SZ}"
    began = now()
    run: dict[str, Any] = {
        "label": label,
        "command": shlex.join(["python", "-m", "benchmarks.chaos", *(argv if argv is not None else sys.argv[1:])]),
        "started": f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        "revision": source_revision(REPO),
        "rate": options.rate,
        "timeout": options.timeout,
        "mix": ", ".join(f"{count} in {len(MIX)} {name}" for name, count in Counter(MIX).items()),
        "timing": asdict(timing),
        "machine": {"cores": os.cpu_count(), "load_average_before": os.getloadavg()},
    }
    with ExitStack() as stack:
        try:
            run |= _run(stack, options, timing, label)
        finally:
            # The clean-up below is bounded; a second Ctrl-C or a SIGTERM must not cut it short.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            log("cleaning up")
    signal.signal(signal.SIGINT, signal.default_int_handler)
    _relative(run["phases"], began)
    run |= {"duration_s": now() - began, "load_average_after": os.getloadavg()}
    options.out.mkdir(parents=True, exist_ok=True)
    (options.out / f"{label}.json").write_bytes(orjson.dumps(run, option=orjson.OPT_INDENT_2))
    text = markdown(run)
    (options.out / f"{label}.md").write_text(text)
    print(text)
    log(f"wrote {options.out / label}.json and .md")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        log("interrupted; everything it started is stopped and removed")
        sys.exit(130)
