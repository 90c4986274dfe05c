"""python -m benchmarks.compute_pacing [--rates 1,5,20] [--seconds 60] [--pacing sdk,gateway] [--label NAME]

The latency the gateway's side of the `globus_compute` path adds, at fixed request rates: the gateway's own
`ComputeEndpoints` submits through the real globus-compute-sdk `Executor` to the stand-in web service in front
of a real `GlobusComputeEngine` (fakes/compute_service.py; RabbitMQ carries the results back to the SDK's
result watcher), whose workers run the registered compute function against the fake model server. Each
request is an open-loop arrival (evenly spaced, rate r for `--seconds`); its added latency is the time from
the gateway's submit to the result in hand, less the time the function itself ran (its `elapsed_ms`). Run
once with the SDK's default pacing (batch_size 128, api_burst_limit 4, api_burst_window_s 16, and its result
watcher's 0.5 s poll) and once with the gateway's settings (GLOBUS_COMPUTE_*; docs/performance.md, "Globus
Compute submission"). Writes <out>/<label>.json and .md and prints the table (added latency in ms).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import Future
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from benchmarks.stack import REPO, _process, _wait_until_up, free_port, machine, source_revision

MODEL = "bench-model"
CLIENT_ID, CLIENT_SECRET = "0c4b1e9a-6a53-4f2e-9a51-6d1d7b0f3c11", "bench-compute-secret"
# The SDK Executor's own defaults (globus-compute-sdk 4.19), the "before" of the settings change.
SDK_PACING = {
    "GLOBUS_COMPUTE_BATCH_SIZE": 128,
    "GLOBUS_COMPUTE_API_BURST_LIMIT": 4,
    "GLOBUS_COMPUTE_API_BURST_WINDOW_SECONDS": 16,
    "GLOBUS_COMPUTE_RESULT_POLL_SECONDS": 0.5,  # the result watcher's
}
WARM_UP_REQUESTS = 5
RESULT_WAIT_SECONDS = 300.0


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.compute_pacing", description=__doc__.split("\n\n")[1])
    parser.add_argument("--rates", default="1,5,20", help="requests per second, comma-separated (default: %(default)s)")
    parser.add_argument("--seconds", type=float, default=60.0, help="duration of each rate (default: %(default)s)")
    parser.add_argument("--pacing", default="sdk,gateway", help="sdk (the SDK's defaults), gateway (the settings)")
    parser.add_argument("--label", help="name of the result files (default: compute-pacing and the time)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    return parser.parse_args(argv)


def _percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p95": None, "p99": None, "max": None}
    cuts = statistics.quantiles(values, n=100, method="inclusive") if len(values) > 1 else values * 99
    return {"p50": cuts[49], "p95": cuts[94], "p99": cuts[98], "max": max(values)}


class _Timings:
    """When each task was accepted by the service and handed back to the gateway (wall clock, like the
    stand-in's `completion_t`): one poller for every pending submission, so the measure costs little."""

    def __init__(self) -> None:
        self.submitting: dict[Future[Any], float] = {}
        self.accepted: dict[Future[Any], float] = {}
        self.handed_back: dict[Future[Any], float] = {}

    def submitted(self, future: Future[Any], at: float) -> None:
        self.submitting[future] = at
        future.add_done_callback(lambda done: self.handed_back.setdefault(done, time.time()))

    def sweep(self) -> None:
        # The SDK gives a future its task id once the service accepted the batch holding it.
        now = time.time()
        for future in [f for f in self.submitting if getattr(f, "task_id", None) or f.done()]:
            self.accepted[future] = now
            del self.submitting[future]

    async def poll(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self.sweep()
            await asyncio.sleep(0.002)


async def _one(parts: dict[str, Any], timings: _Timings, n: int) -> dict[str, float]:
    """One request through the gateway's path: where its time went, in ms."""
    from resource_server.dispatch.compute import settled

    task = {
        "mode": "inference",
        "route": "chat/completions",
        "body": {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8},
        "request_id": f"bench-{n}",
        "vllm": parts["vllm"],
    }
    began, wall = time.monotonic(), time.time()
    future = await parts["endpoints"].submit(parts["credentials"], parts["endpoint_id"], parts["function_id"], task)
    timings.submitted(future, wall)
    result = await asyncio.wait_for(settled(future), RESULT_WAIT_SECONDS)
    total_ms = (time.monotonic() - began) * 1000
    if result.get("status") != 200:
        raise RuntimeError(f"request {n} failed: {result!r:.300}")
    timings.sweep()
    published = float(parts["service"].tasks[future.task_id].completion_t)
    submission_ms = (timings.accepted[future] - wall) * 1000
    hand_over_ms = (timings.handed_back[future] - published) * 1000
    return {
        "added": total_ms - float(result["elapsed_ms"]),
        "submission": submission_ms,
        "hand_over": hand_over_ms,
        "gateway": submission_ms + hand_over_ms,
    }


async def _at_rate(parts: dict[str, Any], rate: float, seconds: float) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    count = max(1, round(rate * seconds))
    timings, stop = _Timings(), asyncio.Event()
    poller = asyncio.ensure_future(timings.poll(stop))
    start = loop.time()
    pending = []
    for n in range(count):
        await asyncio.sleep(max(0.0, start + n / rate - loop.time()))
        pending.append(asyncio.ensure_future(_one(parts, timings, n)))
    outcomes = await asyncio.gather(*pending, return_exceptions=True)
    stop.set()
    await poller
    measured = [outcome for outcome in outcomes if isinstance(outcome, dict)]
    failures = [repr(outcome)[:300] for outcome in outcomes if not isinstance(outcome, dict)]
    return {"rate": rate, "requests": count, "ok": len(measured), "failed": len(failures), "failures": failures[:3]} | {
        f"{part}_ms": _percentiles([each[part] for each in measured])
        for part in ("added", "gateway", "submission", "hand_over")
    }


def _measure(
    compute: Any, pacing: str, rates: list[float], seconds: float, vllm: dict[str, Any]
) -> list[dict[str, Any]]:
    from django.conf import settings

    from compute_functions import inference
    from resource_server.dispatch.globus_compute import ComputeEndpoints, Credentials

    base = settings.GATEWAY
    settings.GATEWAY = base.model_copy(update=SDK_PACING) if pacing == "sdk" else base
    try:
        credentials = Credentials(CLIENT_ID, CLIENT_SECRET)
        endpoint_id = compute.service.add_endpoint()
        function_id = ComputeEndpoints().client(credentials).register_function(inference)
        levels = []
        for rate in rates:
            # A fresh Executor per rate: the SDK's burst window starts empty, as on a gateway worker's start.
            endpoints = ComputeEndpoints()
            parts = {
                "service": compute.service,
                "endpoints": endpoints,
                "credentials": credentials,
                "endpoint_id": endpoint_id,
                "function_id": function_id,
                "vllm": vllm,
            }
            try:
                asyncio.run(_at_rate(parts, 1.0, WARM_UP_REQUESTS))  # the executor, its watcher and the engine warm
                time.sleep(max(SDK_PACING["GLOBUS_COMPUTE_API_BURST_WINDOW_SECONDS"], 1))  # and the burst window empty
                print(f"{pacing}: {rate:g} req/s for {seconds:g} s", file=sys.stderr, flush=True)
                levels.append(asyncio.run(_at_rate(parts, rate, seconds)) | {"pacing": pacing})
            finally:
                endpoints.close()  # a task the engine lost must not hold the run at exit
        return levels
    finally:
        settings.GATEWAY = base


def _markdown(run: dict[str, Any]) -> str:
    lines = [
        f"# {run['label']}",
        "",
        f"`{run['command']}` at {run['revision']}, {run['started']}; {run['machine']}",
        "",
        "Milliseconds, p50 / p95 / p99. gateway side: submission (submit until the service accepted the batch)",
        "plus hand-over (the result published until the request has it); added: all but the function's own time.",
        "",
        "| pacing: batch / burst limit / window / result poll | req/s | failed | gateway side | submission "
        "| hand-over | added |",
        "|---|---|---|---|---|---|---|",
    ]
    for level in run["levels"]:
        cells = []
        for part in ("gateway", "submission", "hand_over", "added"):
            figures = level[f"{part}_ms"]
            cells.append(
                " / ".join("-" if figures[key] is None else f"{figures[key]:.0f}" for key in ("p50", "p95", "p99"))
            )
        pacing = run["pacing"][level["pacing"]]
        lines.append(
            f"| {level['pacing']}: {pacing} | {level['rate']:g} | {level['failed']} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    options = _arguments(argv)
    rates = [float(rate) for rate in options.rates.split(",")]
    pacings = [pacing.strip() for pacing in options.pacing.split(",")]
    if set(pacings) - {"sdk", "gateway"}:
        sys.exit("--pacing takes sdk, gateway or both")
    label = options.label or f"compute-pacing-{datetime.now(UTC):%Y%m%dT%H%M%SZ}"
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "gateway.settings")
    with ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="compute-pacing-")))
        os.environ.setdefault("DATA_DIR", str(workdir))
        import django

        django.setup()
        from django.conf import settings

        from fakes.compute_service import start_compute_service

        port = free_port()
        log = workdir / "fake.log"
        fake = stack.enter_context(
            _process(
                [sys.executable, "-m", "fakes.model_server", "--port", str(port), "--model", MODEL],
                cwd=REPO,
                env={},
                cpus=None,
                log=log,
            )
        )
        _wait_until_up(f"http://127.0.0.1:{port}/health", fake, log)
        compute = stack.enter_context(start_compute_service({CLIENT_ID: CLIENT_SECRET}))
        os.environ.update(compute.environment)
        gateway = settings.GATEWAY
        run: dict[str, Any] = {
            "label": label,
            "command": " ".join(["python -m benchmarks.compute_pacing", *(argv if argv is not None else sys.argv[1:])]),
            "started": f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
            "revision": source_revision(REPO),
            "machine": machine(),
            "seconds": options.seconds,
            "pacing": {
                "sdk": "{GLOBUS_COMPUTE_BATCH_SIZE} / {GLOBUS_COMPUTE_API_BURST_LIMIT} / "
                "{GLOBUS_COMPUTE_API_BURST_WINDOW_SECONDS} s / {GLOBUS_COMPUTE_RESULT_POLL_SECONDS} s".format(
                    **SDK_PACING
                ),
                "gateway": f"{gateway.GLOBUS_COMPUTE_BATCH_SIZE} / {gateway.GLOBUS_COMPUTE_API_BURST_LIMIT} / "
                f"{gateway.GLOBUS_COMPUTE_API_BURST_WINDOW_SECONDS} s / {gateway.GLOBUS_COMPUTE_RESULT_POLL_SECONDS} s",
            },
            "levels": [],
        }
        vllm = {"host": "127.0.0.1", "port": port}
        for pacing in pacings:
            run["levels"] += _measure(compute, pacing, rates, options.seconds, vllm)
    options.out.mkdir(parents=True, exist_ok=True)
    (options.out / f"{label}.json").write_bytes(orjson.dumps(run, option=orjson.OPT_INDENT_2))
    text = _markdown(run)
    (options.out / f"{label}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
