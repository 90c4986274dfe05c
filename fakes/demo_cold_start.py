"""python -m fakes.demo_cold_start: walk the demo's cold model through a batch job's life, for a person to watch.

`make demo` seeds cluster `demo-b` with `demo-model-big`, served by the batch job `demo-big` on a fake PBS
(the commands in fakes/scheduler, reading the scenario file `FAKE_SCHEDULER_STATE`). The model starts cold:
no job, no server. This walks it through the states the gateway derives from its sources:

    queued    the job waits behind two others in the queue, with the scheduler's estimated start
    starting  the job runs; the model server is still loading (no server answers yet)
    live      the model server answers; the gateway records how long the load took (its next ETAs use it)

and, at Ctrl-C (or with --end), the job finishes and the server stops: offline again. Meanwhile, watch
`GET /v1/models`, `GET /resource_server/demo-b/jobs`, a request held with `X-Gateway-Max-Wait` (its stream
prints `: status=queued position=3 eta=...` comments) and the admin's endpoint list.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from fakes.scheduler.scenario import FakeJob, Scenario

SERVER = "demo-pbs"
QUEUE = "demand"
JOB = "1001"


def _say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def _scenario_path(given: str | None) -> Path:
    path = given or os.environ.get("FAKE_SCHEDULER_STATE")
    if not path:
        sys.exit("Name the demo's scenario file: --state var/demo-scheduler.json (make demo prints it).")
    return Path(path)


def _queued(path: Path, queue_seconds: float) -> None:
    now = time.time()
    ahead = [
        FakeJob(id=str(900 + n), name=f"climate-{n}", user=f"user{n}", queue=QUEUE, submitted_at=now - 600 + n)
        for n in (1, 2)
    ]
    for position, job in enumerate(ahead):
        job.estimated_start_at = now + queue_seconds * (position + 1) / 3
    ours = FakeJob(
        id=JOB,
        name="demo-big",
        user="demo",
        queue=QUEUE,
        submitted_at=now,
        estimated_start_at=now + queue_seconds,
        walltime_seconds=3600,
    )
    Scenario(server=SERVER, jobs=[*ahead, ours]).write(path)


def _update(path: Path, change: Any) -> None:
    scenario = Scenario.read(path)
    change(scenario)
    scenario.write(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--state", help="The fake PBS's scenario file (default: $FAKE_SCHEDULER_STATE).")
    parser.add_argument("--queue-seconds", type=float, default=30.0, help="How long the job waits in the queue.")
    parser.add_argument("--load-seconds", type=float, default=20.0, help="How long the model takes to load.")
    parser.add_argument("--port", type=int, default=8003, help="Where the model's server answers once loaded.")
    parser.add_argument("--model", default="demo-model-big")
    parser.add_argument("--end", action="store_true", help="Only end the job (and its server): offline again.")
    args = parser.parse_args()
    path = _scenario_path(args.state)

    if args.end:
        _update(path, lambda scenario: scenario.finish(JOB) if any(j.id == JOB for j in scenario.jobs) else None)
        _say("job finished: the model goes offline at the gateway's next reading")
        return

    _queued(path, args.queue_seconds)
    _say(f"job {JOB}.{SERVER} (demo-big) queued, third in queue {QUEUE}; estimated start in {args.queue_seconds:g} s")
    time.sleep(args.queue_seconds)

    def start_jobs(scenario: Scenario) -> None:
        for job in scenario.jobs:
            scenario.start(job.id, hosts=[f"node{job.id}"])

    _update(path, start_jobs)
    _say(f"job running on node{JOB}; the model loads for {args.load_seconds:g} s (starting)")
    time.sleep(args.load_seconds)

    server = subprocess.Popen(  # noqa: S603 (our own interpreter and module, no shell)
        [sys.executable, "-m", "fakes.model_server", "--port", str(args.port), "--model", args.model, "--ttft", "0.05"]
    )
    _say(f"model server up on port {args.port}: live at the gateway's next health check. Ctrl-C ends the job.")
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a TERM ends the job as Ctrl-C does
    try:
        server.wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.terminate()
        server.wait(timeout=10)
        _update(path, lambda scenario: scenario.finish(JOB))
        _say("job finished and its server stopped: the model goes offline")


if __name__ == "__main__":
    main()
