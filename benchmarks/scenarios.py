"""Scenarios S1-S8: each run direct (client -> model server) and through the gateway, alternating in rounds.

A round runs both sides back to back, direct first in even rounds and gateway first in odd ones, so that
drift in the machine's state weighs on both alike. With `--limits`, S1 (warm key) and S2 have a third side,
"gateway+limits": the same gateway, called with a key whose user has a limit of every kind, each set so high
that none refuses. It runs last in even rounds and first in odd ones, so gateway and gateway+limits swap order
every round too. A scenario's figures are medians over rounds of each round's figure (the median of round
medians). Every job reports the CPU time of the gateway worker, the model server and the load generator in its
window; `flags` says when the client core, not the gateway, was saturated.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from benchmarks.stack import HPC_MODEL, HPC_WORKERS, MODEL, Stack

SIDES = ("direct", "gateway")
LIMITS = "gateway+limits"  # the gateway, with a key whose every request is reserved and settled (see stack.py)
PROMPT = [{"role": "user", "content": "Hello there, tell me something about supercomputers."}]
# A side whose CPU use reaches these shares of its window was (close to) saturated.
SATURATED = 0.85
CLIENT_CORE_SATURATED = 0.90
GATEWAY_SATURATED = 0.90


@dataclass(frozen=True, slots=True)
class Plan:
    rounds: int
    quick: bool
    only: frozenset[str]
    limits: bool = False  # S1 (warm key) and S2 also run the gateway+limits side

    def wants(self, scenario: str) -> bool:
        return scenario in self.only

    @property
    def limit_sides(self) -> tuple[str, ...]:
        """The sides of the scenarios that measure the cost of limits."""
        return (*SIDES, LIMITS) if self.limits else SIDES


@dataclass
class Level:
    """One setting of a scenario (a concurrency), with every round's raw results and the summary."""

    label: str
    params: dict[str, Any]
    rounds: list[dict[str, dict[str, Any]]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    flags: list[str] = field(default_factory=list)


@dataclass
class Scenario:
    id: str
    title: str
    levels: list[Level] = field(default_factory=list)
    error: str | None = None  # why the scenario stopped early, if it did


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- running jobs -----------------------------------------------------------------------------


def _job(stack: Stack, side: str, body: dict[str, Any], **extra: Any) -> dict[str, Any]:
    direct = side == "direct"
    key = stack.warm_key
    if side == LIMITS:
        if stack.limits_key is None:
            raise RuntimeError("the gateway+limits side needs a stack started with limits")
        key = stack.limits_key
    return {
        "kind": "open" if "rate" in extra else "closed",
        "host": "127.0.0.1",
        "port": stack.fake_port if direct else stack.gateway_port,
        "path": "/v1/chat/completions" if direct else "/resource_server/v1/chat/completions",
        "body": body,
        "authorizations": [f"Bearer {key}"],
        "pids": stack.pids(),
        "rss_pid": stack.gateway_worker_pid,
        **extra,
    }


def _maker(stack: Stack, body: dict[str, Any], **extra: Any) -> Callable[[str, int], dict[str, Any]]:
    """The job of either side of every round: same body, same settings."""

    def make(side: str, _round: int) -> dict[str, Any]:
        return _job(stack, side, body, **extra)

    return make


def _rounds(
    stack: Stack,
    plan_rounds: int,
    level: Level,
    make_job: Callable[[str, int], dict[str, Any]],
    describe: str,
    sides: tuple[str, ...] = SIDES,
) -> None:
    for index in range(plan_rounds):
        order = sides if index % 2 == 0 else sides[::-1]
        outcome: dict[str, dict[str, Any]] = {}
        for side in order:
            idle_rss_kb = stack.worker_memory_kb()  # the baseline of memory per open stream
            outcome[side] = {**stack.loadgen.run(make_job(side, index)), "idle_rss_kb": idle_rss_kb}
        level.rounds.append(outcome)
        log(f"  {level.label} round {index + 1}/{plan_rounds}: " + _progress(outcome, describe))
    level.flags = _flags(level)


def _sides(level: Level) -> tuple[str, ...]:
    """The sides a level ran, in the report's order (a round's dict is in the order they ran)."""
    return tuple(side for side in (*SIDES, LIMITS) if level.rounds and side in level.rounds[0])


def _progress(outcome: dict[str, dict[str, Any]], describe: str) -> str:
    parts = []
    for side in (side for side in (*SIDES, LIMITS) if side in outcome):
        result = outcome[side]
        if describe == "latency":
            latency = result["latency_ms"]
            parts.append(f"{side} p50 {_ms(latency['p50'])} p99 {_ms(latency['p99'])}")
        elif describe == "throughput":
            parts.append(f"{side} {result['per_second']:.0f} req/s p99 {_ms(result['latency_ms']['p99'])}")
        elif describe == "stream":
            bursts = len(result.get("stall_bursts", ()))
            parts.append(
                f"{side} ttft p50 {_ms(result['ttft_ms']['p50'])} stalls {result['stalls']} in {bursts} bursts"
            )
        else:
            parts.append(f"{side} {result['statuses']} {result['errors']} recovery {result['recovery_s']}")
    return "; ".join(parts)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} ms"


def _utilisation(result: dict[str, Any]) -> dict[str, float]:
    window = result["window_s"] or 1.0
    return {name: seconds / window for name, seconds in result["cpu_s"].items()}


def _flags(level: Level) -> list[str]:
    """Where something other than the gateway limited the measurement, with the worst round's figure.

    Sequential jobs (concurrency 1) are left out: there the client and the model server take turns on the
    client core, which is busy by construction without limiting anything; so are windows under a second,
    which the 10 ms CPU clock cannot resolve.
    """
    if level.params.get("concurrency") == 1:
        return []
    worst: dict[str, float] = {}
    for outcome in level.rounds:
        for side, result in outcome.items():
            if result["window_s"] < 1.0:
                continue
            use = _utilisation(result)
            client = use["loadgen"] + use["fake"]
            checks = {
                f"{side}: load generator saturated": use["loadgen"] >= SATURATED,
                f"{side}: model server saturated": use["fake"] >= SATURATED,
                f"{side}: client core saturated": client >= CLIENT_CORE_SATURATED
                and (side == "direct" or use["gateway"] < GATEWAY_SATURATED),
            }
            shares = {"load generator": use["loadgen"], "model server": use["fake"], "client core": client}
            for text, hit in checks.items():
                if hit:
                    share = next(value for name, value in shares.items() if name in text)
                    worst[text] = max(worst.get(text, 0.0), share)
    notes = {
        "direct": "the direct figures are a floor for what the model server can do",
        "gateway": "the gateway was not the bottleneck",
    }
    return [
        f"{text} ({share:.0%} of a core): {notes['direct' if text.startswith('direct:') else 'gateway']}"
        for text, share in sorted(worst.items())
    ]


# --- summaries --------------------------------------------------------------------------------


def _median(values: Iterable[float | None]) -> float | None:
    present = [value for value in values if value is not None]
    return statistics.median(present) if present else None


def _each(level: Level, side: str, *path: str) -> list[Any]:
    values = []
    for outcome in level.rounds:
        value: Any = outcome[side]
        for key in path:
            value = value[key]
        values.append(value)
    return values


def _side_median(level: Level, *path: str) -> dict[str, float | None]:
    return {side: _median(_each(level, side, *path)) for side in _sides(level)}


def _added(level: Level, *path: str, side: str = "gateway", base: str = "direct") -> float | None:
    """Median over rounds of (side - base) for one figure: by default gateway - direct."""
    return _median(
        None if g is None or d is None else g - d
        for g, d in zip(_each(level, side, *path), _each(level, base, *path), strict=True)
    )


def _ratio(level: Level, *path: str, side: str = "gateway", base: str = "direct") -> float | None:
    """Median over rounds of side / base for one figure: by default gateway / direct."""
    return _median(
        None if not d or g is None else g / d
        for g, d in zip(_each(level, side, *path), _each(level, base, *path), strict=True)
    )


def _refusals(level: Level, side: str) -> dict[str, int]:
    """Every non-200 answer and client-side error over all rounds, by status or error name."""
    counted: dict[str, int] = {}
    for outcome in level.rounds:
        result = outcome[side]
        for status, count in result["statuses"].items():
            if status != "200":
                counted[status] = counted.get(status, 0) + count
        for name, count in result["errors"].items():
            counted[name] = counted.get(name, 0) + count
    return counted


def _cpu_each(level: Level, unit: str, side: str = "gateway") -> list[float | None]:
    """Gateway CPU microseconds per completed request or per relayed event of a gateway side, each round."""
    values = []
    for outcome in level.rounds:
        result = outcome[side]
        count = result["events"] if unit == "event" else result["completed"]
        values.append(result["cpu_s"]["gateway"] * 1e6 / count if count else None)
    return values


def _cpu_per(level: Level, unit: str, side: str = "gateway") -> float | None:
    """Gateway CPU microseconds per completed request or per relayed event, median over rounds."""
    return _median(_cpu_each(level, unit, side))


def _utilisations(level: Level) -> dict[str, dict[str, float | None]]:
    return {
        side: {
            name: _median(_utilisation(o[side])[name] for o in level.rounds) for name in ("gateway", "fake", "loadgen")
        }
        for side in _sides(level)
    }


def _limits_cost(level: Level) -> dict[str, Any]:
    """What limits added, gateway+limits against gateway in the same rounds (empty without that side)."""
    if LIMITS not in _sides(level):
        return {}
    cpu = _median(
        None if with_limits is None or without is None else with_limits - without
        for with_limits, without in zip(_cpu_each(level, "request", LIMITS), _cpu_each(level, "request"), strict=True)
    )
    return {
        "added_p50_ms": _added(level, "latency_ms", "p50", side=LIMITS, base="gateway"),
        "added_p99_ms": _added(level, "latency_ms", "p99", side=LIMITS, base="gateway"),
        "throughput_ratio": _ratio(level, "per_second", side=LIMITS, base="gateway"),
        "cpu_us_per_request": _cpu_per(level, "request", LIMITS),
        "added_cpu_us_per_request": cpu,
    }


def summarise_latency(level: Level) -> None:
    level.summary = {
        "p50_ms": _side_median(level, "latency_ms", "p50"),
        "p99_ms": _side_median(level, "latency_ms", "p99"),
        "added_p50_ms": _added(level, "latency_ms", "p50"),
        "added_p99_ms": _added(level, "latency_ms", "p99"),
        "gateway_cpu_us_per_request": _cpu_per(level, "request"),
        "refusals": {side: _refusals(level, side) for side in _sides(level)},
        "utilisation": _utilisations(level),
        "limits": _limits_cost(level),
    }


def summarise_throughput(level: Level) -> None:
    level.summary = {
        "per_second": _side_median(level, "per_second"),
        "throughput_ratio": _ratio(level, "per_second"),
        "p50_ms": _side_median(level, "latency_ms", "p50"),
        "p99_ms": _side_median(level, "latency_ms", "p99"),
        "p99_ratio": _ratio(level, "latency_ms", "p99"),
        "gateway_cpu_us_per_request": _cpu_per(level, "request"),
        "refusals": {side: _refusals(level, side) for side in _sides(level)},
        "utilisation": _utilisations(level),
        "limits": _limits_cost(level),
    }


def summarise_stream(level: Level) -> None:
    concurrency = level.params["concurrency"]
    memory = [
        (o["gateway"]["rss_max_kb"] - o["gateway"]["idle_rss_kb"]) / concurrency
        for o in level.rounds
        if o["gateway"]["rss_max_kb"] and o["gateway"]["idle_rss_kb"]
    ]
    level.summary = {
        "ttft_p50_ms": _side_median(level, "ttft_ms", "p50"),
        "ttft_p99_ms": _side_median(level, "ttft_ms", "p99"),
        "added_ttft_p50_ms": _added(level, "ttft_ms", "p50"),
        "added_ttft_p99_ms": _added(level, "ttft_ms", "p99"),
        "gap_p50_ms": _side_median(level, "gap_ms", "p50"),
        "gap_p99_ms": _side_median(level, "gap_ms", "p99"),
        "gap_p50_ratio": _ratio(level, "gap_ms", "p50"),
        "gap_p99_ratio": _ratio(level, "gap_ms", "p99"),
        "stalls": {side: sum(_each(level, side, "stalls")) for side in SIDES},
        "rounds_with_stalls": {side: sum(1 for n in _each(level, side, "stalls") if n) for side in SIDES},
        "stall_bursts": {side: sum(len(bursts) for bursts in _each(level, side, "stall_bursts")) for side in SIDES},
        "parity_failures": {side: _merge(_each(level, side, "parity_failures")) for side in SIDES},
        "streams": {side: sum(sum(s.values()) for s in _each(level, side, "statuses")) for side in SIDES},
        "refusals": {side: _refusals(level, side) for side in SIDES},
        "gateway_cpu_us_per_event": _cpu_per(level, "event"),
        "memory_kb_per_stream": _median(memory),
        "gateway_peak_rss_kb": max(_each(level, "gateway", "rss_max_kb")),
        "utilisation": _utilisations(level),
    }


def summarise_overload(level: Level) -> None:
    level.summary = {
        "offered_per_second": _side_median(level, "offered_per_second"),
        "answered": {side: _merge(_each(level, side, "statuses")) for side in SIDES},
        "errors": {side: _merge(_each(level, side, "errors")) for side in SIDES},
        "p99_ms": _side_median(level, "latency_ms", "p99"),
        "max_ms": {side: max(v or 0 for v in _each(level, side, "latency_ms", "max")) for side in SIDES},
        "recovery_s": {side: _worst(_each(level, side, "recovery_s")) for side in SIDES},
        "peak_busy_connections": {side: max(_each(level, side, "peak_busy_connections")) for side in SIDES},
        "gateway_peak_rss_kb": max(_each(level, "gateway", "rss_max_kb")),
        "utilisation": _utilisations(level),
    }


def _merge(counters: list[dict[str, int]]) -> dict[str, int]:
    merged: dict[str, int] = {}
    for counter in counters:
        for key, count in counter.items():
            merged[key] = merged.get(key, 0) + count
    return merged


def _worst(values: list[float | None]) -> float | None:
    """The slowest recovery over rounds; None (never recovered) beats any number."""
    return None if any(value is None for value in values) else max(values, default=None)  # type: ignore[type-var]


# --- the scenarios ------------------------------------------------------------------------------


def _chat(**extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": PROMPT, "max_tokens": 16, **extra}


def _stream_body(tokens: int, ttft: float, rate: float, include_usage: bool) -> dict[str, Any]:
    return _chat(
        max_tokens=tokens,
        ignore_eos=True,  # exactly `tokens` tokens, so parity can be checked to the token
        stream=True,
        stream_options={"include_usage": include_usage},
        fake_vllm={"ttft": ttft, "tokens_per_second": rate},
    )


def s1(stack: Stack, plan: Plan) -> Scenario:
    requests, warmup = (500, 50) if plan.quick else (1000, 100)
    scenario = Scenario("S1", "Added latency, non-streaming, concurrency 1, model server latency 0")
    warm = Level("warm key", {"concurrency": 1, "requests": requests})
    _rounds(
        stack,
        plan.rounds,
        warm,
        _maker(stack, _chat(), concurrency=1, per_client=requests, warmup=warmup),
        "latency",
        plan.limit_sides,
    )
    summarise_latency(warm)
    scenario.levels.append(warm)
    if stack.cold_keys:
        # Each gateway request carries a key this worker has not seen: a database read on the request path.
        per_round = len(stack.cold_keys) // plan.rounds
        cold = Level("cold key", {"concurrency": 1, "requests": per_round})

        def cold_job(side: str, index: int) -> dict[str, Any]:
            keys = stack.cold_keys[index * per_round : (index + 1) * per_round]
            job = _job(stack, side, _chat(), concurrency=1, per_client=per_round)
            if side == "gateway":
                job["authorizations"] = [f"Bearer {key}" for key in keys]
            return job

        _rounds(stack, plan.rounds, cold, cold_job, "latency")
        summarise_latency(cold)
        scenario.levels.append(cold)
    return scenario


def s2(stack: Stack, plan: Plan) -> Scenario:
    scenario = Scenario("S2", "Maximum requests/s through one gateway worker, model server latency 0")
    duration = 3.0 if plan.quick else 4.0
    for concurrency in (64,) if plan.quick else (16, 64, 256):
        level = Level(f"c={concurrency}", {"concurrency": concurrency, "duration_s": duration})
        _rounds(
            stack,
            plan.rounds,
            level,
            _maker(stack, _chat(), concurrency=concurrency, duration=duration, warmup=1.0),
            "throughput",
            plan.limit_sides,
        )
        summarise_throughput(level)
        scenario.levels.append(level)
    return scenario


def s3(stack: Stack, plan: Plan) -> Scenario:
    scenario = Scenario("S3", "Realistic model latency 200 ms, non-streaming")
    body = _chat(fake_vllm={"latency": 0.2})
    for concurrency in (64, 256):
        level = Level(f"c={concurrency}", {"concurrency": concurrency, "duration_s": 5.0})
        _rounds(
            stack,
            plan.rounds,
            level,
            _maker(stack, body, concurrency=concurrency, duration=5.0, warmup=1.0),
            "throughput",
        )
        summarise_throughput(level)
        scenario.levels.append(level)
    return scenario


def s4(stack: Stack, plan: Plan) -> Scenario:
    scenario = Scenario("S4", "Streaming: TTFT 50 ms, 50 tokens/s, 128 tokens, usage chunk asked for")
    tokens, ttft, rate = 128, 0.05, 50.0
    body = _stream_body(tokens, ttft, rate, include_usage=True)
    for concurrency in (32,) if plan.quick else (1, 32, 128):
        # At concurrency 1 a round is 3 streams in a row; otherwise one stream per client, starts spread over 1 s.
        per_client, stagger = (3, 0.0) if concurrency == 1 else (1, 1.0)
        level = Level(f"c={concurrency}", {"concurrency": concurrency, "streams_per_client": per_client})
        _rounds(
            stack,
            plan.rounds,
            level,
            _maker(
                stack,
                body,
                concurrency=concurrency,
                per_client=per_client,
                stagger=stagger,
                stream=True,
                expect_tokens=tokens,
                expect_usage=True,
                stall_gap=2 / rate,
            ),
            "stream",
        )
        summarise_stream(level)
        scenario.levels.append(level)
    return scenario


def s5(stack: Stack, plan: Plan) -> Scenario:
    scenario = Scenario("S5", "Stream capacity: 20 tokens/s, 300 tokens, no usage chunk asked for")
    tokens, rate = 300, 20.0
    body = _stream_body(tokens, 0.0, rate, include_usage=False)
    for concurrency in (64, 256, 512, 768, 1024):
        level = Level(f"c={concurrency}", {"concurrency": concurrency})
        _rounds(
            stack,
            plan.rounds,
            level,
            _maker(
                stack,
                body,
                concurrency=concurrency,
                per_client=1,
                stagger=1.0,
                stream=True,
                expect_tokens=tokens,
                expect_usage=False,
                stall_gap=2 / rate,
                deadline=120,
            ),
            "stream",
        )
        summarise_stream(level)
        scenario.levels.append(level)
        stalled = level.summary["rounds_with_stalls"]
        if stalled["gateway"] * 2 > plan.rounds or stalled["direct"] * 2 > plan.rounds:
            log(f"  stalls in most rounds at {level.label}: no higher concurrency is tried")
            break
    return scenario


def s7(stack: Stack, plan: Plan) -> Scenario:
    """The HPC path: the `local` backend runs the compute function, which streams vLLM's events back through
    the gateway's relay route, one POST per batch; so every token crosses the gateway twice."""
    scenario = Scenario(
        "S7", "HPC path (compute function + relay, `local` backend): TTFT 50 ms, 50 tokens/s, 128 tokens"
    )
    if stack.direct_only:
        return Scenario(scenario.id, scenario.title, error="needs the compute endpoint (run without --direct-only)")
    tokens, ttft, rate = 128, 0.05, 50.0
    body = _stream_body(tokens, ttft, rate, include_usage=True)
    hpc_body = {**body, "model": HPC_MODEL}
    stream = {"stream": True, "expect_tokens": tokens, "expect_usage": True, "stall_gap": 2 / rate}
    # Start the pool's processes (one per concurrent task), then move them off the gateway's core: they
    # stand in for the cluster node, which is not the gateway's to pay for.
    stack.loadgen.run(_job(stack, "gateway", hpc_body, concurrency=HPC_WORKERS, per_client=1, **stream))
    log(f"  moved {stack.move_compute_workers_off_the_gateway_core()} compute processes to the client core")
    for concurrency in (1, HPC_WORKERS):
        per_client, stagger = (3, 0.0) if concurrency == 1 else (1, 1.0)
        level = Level(f"c={concurrency}", {"concurrency": concurrency, "streams_per_client": per_client})

        def make(
            side: str,
            _round: int,
            concurrency: int = concurrency,
            per_client: int = per_client,
            stagger: float = stagger,
        ) -> dict[str, Any]:
            chosen = body if side == "direct" else hpc_body
            return _job(stack, side, chosen, concurrency=concurrency, per_client=per_client, stagger=stagger, **stream)

        _rounds(stack, plan.rounds, level, make, "stream")
        summarise_stream(level)
        scenario.levels.append(level)
    return scenario


@contextlib.contextmanager
def _busy_neighbour(cpus: frozenset[int] | None) -> Iterator[None]:
    """A process spinning on the gateway's core while the block runs: the worker then gets about half of it."""
    if cpus is None:
        yield  # one core for everything: spinning would slow the client side as much as the gateway
        return
    spinner = subprocess.Popen(
        [sys.executable, "-c", "while True: pass"], preexec_fn=lambda: os.sched_setaffinity(0, cpus)
    )
    try:
        yield
    finally:
        spinner.kill()
        spinner.wait()


def s8(stack: Stack, plan: Plan) -> Scenario:
    """Closed loops of up to MAX_PENDING_PER_WORKER (256) clients get no refusal, even on a shared core."""
    scenario = Scenario("S8", "Closed loop at 64 and 256 with a busy process on the gateway's core")
    for concurrency in (64, 256):
        level = Level(f"c={concurrency}", {"concurrency": concurrency, "duration_s": 4.0})
        with _busy_neighbour(stack.cores.gateway):
            _rounds(
                stack,
                plan.rounds,
                level,
                _maker(stack, _chat(), concurrency=concurrency, duration=4.0, warmup=1.0),
                "throughput",
            )
        summarise_throughput(level)
        scenario.levels.append(level)
    return scenario


S6_ROUNDS = 3  # a pass/fail behaviour check of 20 s per side, not a ratio: three rounds (fewer if asked) suffice


def s6(stack: Stack, plan: Plan, capacity: float) -> Scenario:
    scenario = Scenario("S6", "Overload: 1.5x the S2 capacity for 20 s, then recovery")
    rate = 1.5 * capacity
    level = Level(f"{rate:.0f} req/s", {"rate": rate, "duration_s": 20.0, "timeout_s": 10.0})
    _rounds(
        stack,
        min(S6_ROUNDS, plan.rounds),
        level,
        _maker(stack, _chat(), rate=rate, duration=20.0, timeout=10.0, deadline=90),
        "overload",
    )
    summarise_overload(level)
    scenario.levels.append(level)
    return scenario


def warm_up(stack: Stack) -> None:
    """A few hundred requests first, so that lazy imports and caches do not land in the first round."""
    for side in (*SIDES, LIMITS) if stack.limits_key else SIDES:
        stack.loadgen.run(_job(stack, side, _chat(), concurrency=4, per_client=100))
    time.sleep(1.0)
