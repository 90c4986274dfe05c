"""python -m benchmarks [--quick] [--only S1,S4] [--rounds 5] [--source DIR] [--direct-only] [--label NAME]
                     [--limits redis|database [--redis-url URL]]

Starts the fake model server, the gateway as deployed (gunicorn + one uvicorn worker) and the load generator
on 127.0.0.1, runs the scenarios direct and through the gateway in alternating rounds, then writes
<out>/<label>.json and <out>/<label>.md and prints the Markdown table. With --limits, S1 and S2 also run a
third side in the same rounds, the gateway with a key whose user has a limit of every kind, counted in Redis
or in the gateway's database. See docs/performance.md.
"""

from __future__ import annotations

import argparse
import functools
import os
import shlex
import shutil
import signal
import sys
import time
import traceback
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson

from benchmarks import report, scenarios
from benchmarks.scenarios import Plan, Scenario, log
from benchmarks.stack import REPO, Stack, machine, redis_server, source_revision, started

ALL = ("S1", "S2", "S3", "S4", "S5", "S7", "S8", "S6")  # S6 last: overload should disturb nothing after it
QUICK = ("S1", "S2", "S4")  # at concurrency 64 and 32 only: see scenarios.s2 and s4
MAX_STREAMS = 1024


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[1])
    parser.add_argument("--quick", action="store_true", help="S1, S2 at 64, S4 at 32 (under 2 minutes)")
    parser.add_argument("--only", help="comma-separated scenarios to run, e.g. S1,S5")
    parser.add_argument("--rounds", type=int, default=5, help="rounds per scenario (default: %(default)s)")
    parser.add_argument("--source", type=Path, default=REPO, help="gateway source tree to run (default: this one)")
    parser.add_argument(
        "--direct-only",
        action="store_true",
        help="register no compute endpoint (the worker then never loads globus-compute-sdk)",
    )
    parser.add_argument("--label", help="name of the result files (default: bench-quick or bench, and the time)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument(
        "--limits",
        choices=("redis", "database"),
        help="S1 and S2 also run a gateway+limits side, its limits counted in Redis (--redis-url) or in the "
        "gateway's database (SQLite)",
    )
    parser.add_argument(
        "--redis-url",
        default="",
        help="the Redis the gateway under test uses with --limits redis (default: one the harness starts, "
        "redis-server from PATH, pinned to the client core)",
    )
    options = parser.parse_args(argv)
    options.argv = argv if argv is not None else sys.argv[1:]
    if options.rounds < 1:
        parser.error("--rounds must be at least 1")
    if options.limits == "redis" and not options.redis_url and shutil.which("redis-server") is None:
        parser.error("--limits redis needs --redis-url, or redis-server on PATH")
    return options


def _without_password(argument: str) -> str:
    """A command-line argument as the report shows it: a URL's password (--redis-url) masked."""
    try:
        password = urlsplit(argument).password
    except ValueError:
        return argument
    return argument.replace(f":{password}@", ":***@") if password else argument


def _limits_env(options: argparse.Namespace) -> tuple[dict[str, str], str]:
    """The gateway's environment for the limits store asked for, and the store in words for the report."""
    if options.limits == "redis":
        where = urlsplit(options.redis_url)
        # The report names the server, never a password the URL may carry.
        shown = f"{where.hostname}:{where.port or 6379}{where.path or '/0'}"
        whose = "the harness's own redis-server, on the client core" if options.own_redis else "given by --redis-url"
        return {"REDIS_URL": options.redis_url}, f"counted in Redis at {shown}, {whose} (REDIS_URL set for the gateway)"
    if options.limits == "database":
        return {}, "counted in the gateway's database (SQLite, no REDIS_URL)"
    return {}, "off"


def _guarded(name: str, run: Callable[[], Scenario]) -> Scenario:
    """A scenario's result; if it fails, the failure is reported and the other scenarios still run."""
    try:
        return run()
    except Exception as exc:
        log(traceback.format_exc())
        return Scenario(name, "failed", error=f"{type(exc).__name__}: {exc}")


def _capacity(stack: Stack, done: list[Scenario]) -> float:
    """The S2 capacity S6 overloads: the best S2 figure of this run, or a short measurement of its own."""
    for scenario in done:
        if scenario.id == "S2" and scenario.levels:
            return max(level.summary["per_second"]["gateway"] or 0.0 for level in scenario.levels)
    log("S6 needs the S2 capacity: measuring it at concurrency 64 for 3 s")
    body = {"model": "demo-model", "messages": scenarios.PROMPT, "max_tokens": 16}
    job = scenarios._job(stack, "gateway", body, concurrency=64, duration=3.0, warmup=1.0)
    return float(stack.loadgen.run(job)["per_second"])


def main(argv: list[str] | None = None) -> None:
    # Stopped with SIGTERM, still stop the servers and the load generator (the `with` blocks below).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    options = _arguments(argv)
    chosen = options.only.upper().split(",") if options.only else (QUICK if options.quick else ALL)
    unknown = set(chosen) - set(ALL)
    if unknown:
        sys.exit(f"unknown scenarios: {', '.join(sorted(unknown))}; choose from {', '.join(ALL)}")
    plan = Plan(rounds=options.rounds, quick=options.quick, only=frozenset(chosen), limits=bool(options.limits))
    with ExitStack() as own:
        options.own_redis = options.limits == "redis" and not options.redis_url
        if options.own_redis:
            options.redis_url = own.enter_context(redis_server())
        _run(options, plan, chosen)


def _run(options: argparse.Namespace, plan: Plan, chosen: list[str] | tuple[str, ...]) -> None:
    gateway_env, limits = _limits_env(options)
    label = options.label or f"{'bench-quick' if options.quick else 'bench'}-{datetime.now(UTC):%Y%m%dT%H%M%SZ}"
    source = options.source.resolve()
    cold_per_round = 100 if options.quick else 200
    began = time.monotonic()
    run: dict[str, Any] = {
        "label": label,
        "command": shlex.join(["python", "-m", "benchmarks", *map(_without_password, options.argv)]),
        "started": f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        "source": str(source),
        "revision": source_revision(source),
        "rounds": plan.rounds,
        "endpoints": "direct only" if options.direct_only else "direct, and a local compute endpoint (not used)",
        "limits": limits,
        "machine": machine(),
    }
    done: list[Scenario] = []
    with started(
        source,
        cold_keys=cold_per_round * plan.rounds if plan.wants("S1") else 0,
        max_streams=MAX_STREAMS,
        gateway_env=gateway_env,
        direct_only=options.direct_only,
        limits=plan.limits,
    ) as stack:
        run |= {"cores": stack.cores.describe(), "imported_from": stack.imported_from}
        log(f"gateway from {stack.imported_from}; {stack.cores.describe()}; warming up")
        scenarios.warm_up(stack)
        idle_rss_kb = stack.worker_memory_kb()
        runners = {
            "S1": scenarios.s1,
            "S2": scenarios.s2,
            "S3": scenarios.s3,
            "S4": scenarios.s4,
            "S5": scenarios.s5,
            "S7": scenarios.s7,
            "S8": scenarios.s8,
        }
        for name, runner in runners.items():
            if plan.wants(name):
                log(name)
                done.append(_guarded(name, functools.partial(runner, stack, plan)))
        if plan.wants("S6"):
            capacity = _capacity(stack, done)
            log(f"S6 at 1.5 x {capacity:.0f} req/s")
            done.append(_guarded("S6", functools.partial(scenarios.s6, stack, plan, capacity)))
        time.sleep(2.0)  # let the last streams' buffers go before reading the idle figure again
        run["memory"] = {
            "idle_rss_kb": idle_rss_kb,
            "end_rss_kb": stack.worker_memory_kb(),
            "peak_rss_kb": stack.worker_memory_kb("VmHWM"),
        }
    run |= {
        "duration_s": time.monotonic() - began,
        "load_average_after": os.getloadavg(),
        "scenarios": [asdict(scenario) for scenario in done],
    }
    options.out.mkdir(parents=True, exist_ok=True)
    (options.out / f"{label}.json").write_bytes(orjson.dumps(run, option=orjson.OPT_INDENT_2))  # first: keep the data
    run["verdicts"] = report.verdicts(run)
    (options.out / f"{label}.json").write_bytes(orjson.dumps(run, option=orjson.OPT_INDENT_2))
    text = report.markdown(run)
    (options.out / f"{label}.md").write_text(text)
    print(text)
    log(f"wrote {options.out / label}.json and .md")


if __name__ == "__main__":
    main()
