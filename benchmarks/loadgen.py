"""The load generator: a lean HTTP/1.1 keep-alive client that runs one job at a time.

The harness starts it as its own process, pinned to the client core, writes one JSON job per line on its
stdin and reads one JSON result per line from its stdout. Responses are parsed by httptools (uvicorn's C
parser, installed with uvicorn[standard]) on uvloop when present, so a request costs this process a small
fraction of what it costs the servers it measures. Each job reports the CPU time that this process, the
model server and the gateway worker spent in the measured window, which is how the harness tells when the
client side rather than the gateway was the bottleneck.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
import itertools
import math
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, cast

import httptools
import orjson

from benchmarks.procfs import cpu_seconds, memory_kb

now = time.perf_counter
_WALL_OFFSET = time.time() - now()  # to stamp stall bursts with wall-clock time, comparable with server logs


# --- one request and its response --------------------------------------------------------------


@dataclass(slots=True)
class Exchange:
    """One request, and what the client saw of its response."""

    stream: bool
    started: float = 0.0
    finished: float = 0.0
    status: int = 0
    # Streams: arrival time of every token event, and what the stream looked like as a whole.
    token_times: list[float] = field(default_factory=list)
    pending: bytes = b""
    done: bool = False
    events_after_done: int = 0
    usage_tokens: int | None = None
    error_event: bool = False
    events: int = 0


class Connection(asyncio.Protocol):
    """One keep-alive connection carrying one exchange at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.exchange: Exchange | None = None
        self.waiter: asyncio.Future[Exchange] | None = None
        self.closed = False
        self.keep_alive = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass asyncio's

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail(ConnectionError("connection closed by the server"))

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(exc)
            self.close()

    def _fail(self, exc: Exception) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(exc)
        self.waiter = None

    # httptools callbacks

    def on_headers_complete(self) -> None:
        # Read here: once the message is complete the parser has reset and always says "close".
        self.keep_alive = self.parser.should_keep_alive()
        if self.exchange is not None:
            self.exchange.status = self.parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        exchange = self.exchange
        if exchange is None or not exchange.stream:
            return
        arrived = now()
        data = exchange.pending + body if exchange.pending else body
        *events, exchange.pending = data.split(b"\n\n")
        for event in events:
            _classify(exchange, event, arrived)

    def on_message_complete(self) -> None:
        exchange, waiter = self.exchange, self.waiter
        self.exchange = self.waiter = None
        if exchange is not None:
            exchange.finished = now()
        if waiter is not None and exchange is not None and not waiter.done():
            waiter.set_result(exchange)
        if not self.keep_alive:
            self.close()

    async def send(self, raw: bytes, exchange: Exchange) -> Exchange:
        if self.closed or self.transport is None:
            raise ConnectionError("connection already closed")
        self.exchange = exchange
        self.waiter = asyncio.get_running_loop().create_future()
        exchange.started = now()
        self.transport.write(raw)
        return await self.waiter

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()


def _classify(exchange: Exchange, event: bytes, arrived: float) -> None:
    """Sort one SSE event of an OpenAI stream with byte tests; only the usage chunk is parsed."""
    if not event:
        return
    exchange.events += 1
    if exchange.done:
        exchange.events_after_done += 1
    elif event.startswith(b"data: [DONE]"):
        exchange.done = True
    elif b'"choices":[]' in event:
        usage = orjson.loads(event[6:]).get("usage") or {}
        exchange.usage_tokens = usage.get("completion_tokens")
    elif event.startswith(b'data: {"error"'):
        exchange.error_event = True
    elif b'"role":"assistant"' not in event:
        exchange.token_times.append(arrived)


async def connect(host: str, port: int) -> Connection:
    _, protocol = await asyncio.get_running_loop().create_connection(Connection, host, port)
    return protocol


# --- jobs -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Target:
    host: str
    port: int
    path: str
    body: bytes
    authorizations: tuple[str, ...]  # one per request in turn; a single one for the warm path

    def request(self, index: int) -> bytes:
        authorization = self.authorizations[index % len(self.authorizations)]
        head = (
            f"POST {self.path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Type: application/json\r\n"
            f"Authorization: {authorization}\r\nContent-Length: {len(self.body)}\r\n\r\n"
        )
        return head.encode() + self.body


def _target(job: dict[str, Any]) -> Target:
    authorizations = tuple(job.get("authorizations") or ["Bearer none"])
    return Target(job["host"], job["port"], job["path"], orjson.dumps(job["body"]), authorizations)


class Watch:
    """CPU time and memory of the processes under test, over one measured window."""

    def __init__(self, pids: dict[str, int], rss_pid: int | None) -> None:
        self.pids = {**pids, "loadgen": os.getpid()}
        self.rss_pid = rss_pid
        self.rss_max_kb = 0
        self._cpu: dict[str, float] = {}
        self._started = 0.0
        self.window = 0.0
        self._sampler: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._started = now()
        self._cpu = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        if self.rss_pid is not None:
            self._sampler = asyncio.ensure_future(self._sample_rss(self.rss_pid))

    async def _sample_rss(self, pid: int) -> None:
        while True:
            self.rss_max_kb = max(self.rss_max_kb, memory_kb(pid))
            await asyncio.sleep(0.25)

    def stop(self) -> dict[str, Any]:
        self.window = now() - self._started
        cpu = {name: cpu_seconds(pid) - self._cpu[name] for name, pid in self.pids.items()}
        if self._sampler is not None:
            self._sampler.cancel()
            self.rss_max_kb = max(self.rss_max_kb, memory_kb(self.rss_pid or 0))
        return {"window_s": self.window, "cpu_s": cpu, "rss_max_kb": self.rss_max_kb or None}


def percentiles(values: list[float]) -> dict[str, float | int | None]:
    """p50/p90/p99/max/mean of `values` (nearest rank), in the unit they came in."""
    if not values:
        return {"n": 0, "p50": None, "p90": None, "p99": None, "max": None, "mean": None}
    ordered = sorted(values)

    def rank(q: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]

    return {
        "n": len(ordered),
        "p50": rank(0.50),
        "p90": rank(0.90),
        "p99": rank(0.99),
        "max": ordered[-1],
        "mean": sum(ordered) / len(ordered),
    }


class Tally:
    """What a job saw: statuses, latencies and, for streams, timing and parity of every stream."""

    def __init__(self, job: dict[str, Any]) -> None:
        self.stream = bool(job.get("stream"))
        self.expect_tokens = int(job.get("expect_tokens") or 0)
        self.expect_usage = bool(job.get("expect_usage"))
        self.stall_gap = float(job.get("stall_gap") or math.inf)
        self.statuses: Counter[int] = Counter()
        self.errors: Counter[str] = Counter()
        self.latencies: list[float] = []
        self.ttfts: list[float] = []
        self.gaps: list[float] = []
        self.stalls = 0
        self.stall_times: list[float] = []
        self.stalled_streams = 0
        self.parity_failures: Counter[str] = Counter()
        self.events = 0

    def add(self, exchange: Exchange) -> None:
        self.statuses[exchange.status] += 1
        self.latencies.append(exchange.finished - exchange.started)
        if not self.stream or exchange.status != 200:
            return
        self.events += exchange.events
        times = exchange.token_times
        if times:
            self.ttfts.append(times[0] - exchange.started)
        gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
        self.gaps.extend(gaps)
        late = [arrived for gap, arrived in zip(gaps, times[1:], strict=True) if gap > self.stall_gap]
        stalls = len(late)
        self.stall_times += late
        self.stalls += stalls
        self.stalled_streams += stalls > 0
        for problem in self._parity(exchange):
            self.parity_failures[problem] += 1

    def _parity(self, exchange: Exchange) -> list[str]:
        problems = []
        if len(exchange.token_times) != self.expect_tokens:
            problems.append("token_count")
        if not exchange.done or exchange.events_after_done:
            problems.append("done_not_last")
        if exchange.error_event:
            problems.append("error_event")
        if self.expect_usage and exchange.usage_tokens != self.expect_tokens:
            problems.append("usage_chunk")
        if not self.expect_usage and exchange.usage_tokens is not None:
            problems.append("unrequested_usage_chunk")
        return problems

    def result(self) -> dict[str, Any]:
        ms = 1000.0
        out: dict[str, Any] = {
            "statuses": {str(code): count for code, count in sorted(self.statuses.items())},
            "errors": dict(self.errors),
            "latency_ms": percentiles([value * ms for value in self.latencies]),
        }
        if self.stream:
            out |= {
                "ttft_ms": percentiles([value * ms for value in self.ttfts]),
                "gap_ms": percentiles([value * ms for value in self.gaps]),
                "stalls": self.stalls,
                "stall_bursts": _bursts(self.stall_times),
                "stalled_streams": self.stalled_streams,
                "parity_failures": dict(self.parity_failures),
                "events": self.events,
            }
        return out


def _bursts(instants: list[float], apart: float = 0.1) -> list[dict[str, Any]]:
    """Stalls grouped into bursts (late tokens less than `apart` s after the previous one), each with its
    wall-clock start and size. One pause of the gateway, of the model server or of the machine delays the
    next token of every open stream at once: many stalls, one burst."""
    bursts: list[dict[str, Any]] = []
    previous = -math.inf
    for instant in sorted(instants):
        if instant - previous > apart:
            bursts.append({"at": round(instant + _WALL_OFFSET, 3), "stalls": 0})
        bursts[-1]["stalls"] += 1
        previous = instant
    return bursts


async def closed_loop(job: dict[str, Any]) -> dict[str, Any]:
    """`concurrency` clients, each sending its next request as soon as the last one is answered.

    Timed jobs measure the requests completed within [warmup, warmup + duration]; counted jobs first run
    `warmup` requests per client, then measure `per_client` requests per client. Clients start `stagger`
    seconds apart in all, so that streams are spread out as they would be in steady state.
    """
    target = _target(job)
    concurrency = int(job["concurrency"])
    timed = "duration" in job
    tally = Tally(job)
    watch = Watch(job.get("pids", {}), job.get("rss_pid"))
    connections = await asyncio.gather(*(connect(target.host, target.port) for _ in range(concurrency)))
    counter = iter(range(10**9))
    loop = asyncio.get_running_loop()

    async def exchange(connection: Connection) -> Exchange | None:
        try:
            return await connection.send(target.request(next(counter)), Exchange(stream=tally.stream))
        except (ConnectionError, httptools.HttpParserError) as exc:
            tally.errors[type(exc).__name__] += 1
            return None

    async def reconnect_if_closed(index: int) -> Connection:
        if connections[index].closed:
            connections[index] = await connect(target.host, target.port)
        return connections[index]

    if timed:
        warmup, duration = float(job.get("warmup", 1.0)), float(job["duration"])
        begin = now() + warmup
        end = begin + duration
        results: list[dict[str, Any]] = []
        loop.call_at(loop.time() + warmup, watch.start)
        stop_watch = loop.call_at(loop.time() + warmup + duration, lambda: results.append(watch.stop()))

        async def timed_client(index: int) -> None:
            while now() < end:
                done = await exchange(await reconnect_if_closed(index))
                if done is not None and begin <= done.finished <= end:
                    tally.add(done)

        await asyncio.gather(*(timed_client(index) for index in range(concurrency)))
        if not results:  # the last exchange ended before the window did
            stop_watch.cancel()
            results.append(watch.stop())
        window = results[0]
    else:
        warmups, per_client = int(job.get("warmup", 0)), int(job["per_client"])
        stagger = float(job.get("stagger", 0.0))

        async def counted_client(index: int, count: int, record: bool) -> None:
            if record and stagger:
                await asyncio.sleep(stagger * index / concurrency)
            for _ in range(count):
                done = await exchange(await reconnect_if_closed(index))
                if record and done is not None:
                    tally.add(done)

        if warmups:
            await asyncio.gather(*(counted_client(index, warmups, False) for index in range(concurrency)))
        watch.start()
        await asyncio.gather(*(counted_client(index, per_client, True) for index in range(concurrency)))
        window = watch.stop()
    for connection in connections:
        connection.close()
    completed = sum(tally.statuses.values())
    return {**tally.result(), **window, "completed": completed, "per_second": completed / window["window_s"]}


async def open_loop(job: dict[str, Any]) -> dict[str, Any]:
    """Requests sent at a fixed `rate` whatever the answers, by a population of keep-alive clients.

    Like wrk2: `connections` connections are opened first; a request takes an idle one or waits for one,
    and its latency counts from when it was due, so time spent waiting for the server to free a
    connection counts too. It times out `timeout` seconds after it was due (and its connection is
    replaced). After `duration` the load stops and probes, one every 50 ms on fresh connections, tell
    how long the server takes to answer normally again.
    """
    target = _target(job)
    rate, duration, timeout = float(job["rate"]), float(job["duration"]), float(job["timeout"])
    size = int(job.get("connections", 1024))
    tally = Tally(job)
    watch = Watch(job.get("pids", {}), job.get("rss_pid"))
    idle = list(await asyncio.gather(*(connect(target.host, target.port) for _ in range(size))))
    waiting: collections.deque[asyncio.Future[Connection]] = collections.deque()
    peak_busy = 0
    loop = asyncio.get_running_loop()

    async def take() -> Connection:
        """An idle connection; first come, first served, so that no request waits behind later ones."""
        nonlocal peak_busy
        if idle and not waiting:
            connection = idle.pop()
        else:
            waiter: asyncio.Future[Connection] = loop.create_future()
            waiting.append(waiter)
            try:
                connection = await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():  # handed over just as the request timed out
                    give_back(waiter.result())
                raise
        peak_busy = max(peak_busy, size - len(idle))
        if connection.closed:  # closed by the server or after a timeout: replace it
            try:
                connection = await connect(target.host, target.port)
            except BaseException:
                give_back(connection)
                raise
        return connection

    def give_back(connection: Connection) -> None:
        while waiting:
            waiter = waiting.popleft()
            if not waiter.done():  # not timed out meanwhile
                waiter.set_result(connection)
                return
        idle.append(connection)

    timeline: list[Counter[str]] = [Counter() for _ in range(math.ceil(duration))]

    async def one(index: int, due: float) -> None:
        connection: Connection | None = None
        second = timeline[min(len(timeline) - 1, int(due - start))]
        try:
            async with asyncio.timeout_at(loop.time() + (due + timeout - now())):
                connection = await take()
                done = await connection.send(target.request(index), Exchange(stream=False))
            done.started = due  # latency from when the request was due: time waiting for a connection counts
            tally.add(done)
            second[str(done.status)] += 1
        except TimeoutError:
            tally.errors["timeout"] += 1
            second["timeout"] += 1
            if connection is not None:
                connection.abort()
        except (OSError, httptools.HttpParserError) as exc:
            tally.errors[type(exc).__name__] += 1
            second["error"] += 1
        finally:
            if connection is not None:
                give_back(connection)

    tasks: set[asyncio.Task[None]] = set()
    watch.start()
    start = now()
    sent = 0
    while (elapsed := now() - start) < duration:
        while sent <= elapsed * rate:
            task = asyncio.ensure_future(one(sent, start + sent / rate))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            sent += 1
        await asyncio.sleep(0.001)
    stopped = now()
    window = watch.stop()
    probes = await _probe(target, stopped, float(job.get("probe_ok_ms", 50.0)))
    await asyncio.gather(*tasks)
    for connection in idle:
        connection.close()
    return {
        **tally.result(),
        **window,
        "offered_per_second": sent / duration,
        "sent": sent,
        "connections": size,
        "peak_busy_connections": peak_busy,
        "timeline": [dict(counts) for counts in timeline],  # outcomes by the second the request was due
        **probes,
    }


async def _probe(target: Target, stopped: float, ok_ms: float, seconds: float = 5.0) -> dict[str, Any]:
    """Recovery: the first moment after which every probe is answered 200 within `ok_ms`."""
    outcomes: list[tuple[float, bool]] = []

    async def probe(index: int) -> None:
        due = now()
        good = False
        connection: Connection | None = None
        with contextlib.suppress(OSError, TimeoutError, httptools.HttpParserError):
            async with asyncio.timeout(seconds):
                connection = await connect(target.host, target.port)
                done = await connection.send(target.request(index), Exchange(stream=False))
                good = done.status == 200 and (done.finished - due) * 1000 <= ok_ms
        if connection is not None:
            connection.abort()
        outcomes.append((due, good))

    probes: list[asyncio.Future[None]] = []
    while now() - stopped < seconds:
        probes.append(asyncio.ensure_future(probe(len(probes))))
        await asyncio.sleep(0.05)
    await asyncio.gather(*probes)
    outcomes.sort()
    recovered_at: float | None = None
    for due, good in outcomes:
        if not good:
            recovered_at = None
        elif recovered_at is None:
            recovered_at = due
    return {
        "probes": len(outcomes),
        "probes_ok": sum(good for _, good in outcomes),
        "recovery_s": None if recovered_at is None else max(0.0, recovered_at - stopped),
    }


JOBS = {"closed": closed_loop, "open": open_loop}


async def serve() -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := await reader.readline():
        job = orjson.loads(line)
        # A collection of the older generations pauses the loop for long enough to look like a stall of
        # the server under test: collect between jobs only.
        gc.disable()
        try:
            async with asyncio.timeout(float(job.get("deadline", 600))):
                result = await JOBS[job["kind"]](job)
        except TimeoutError:
            result = {"failed": "the job did not finish before its deadline"}
        finally:
            gc.enable()
            gc.collect()
        sys.stdout.buffer.write(orjson.dumps(result) + b"\n")
        sys.stdout.buffer.flush()


def main() -> None:
    try:
        import uvloop  # the same loop the servers under test run on
    except ImportError:
        asyncio.run(serve())
    else:
        uvloop.run(serve())


if __name__ == "__main__":
    main()
