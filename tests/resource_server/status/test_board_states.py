"""The status board end to end over its real sources: the fake vLLM stopped and started on one port, and the
cluster's jobs read through the scheduler source's real path (a local process pool running a stand-in for the
scheduler function, `fake_scheduler.py`, whose answers the test writes), rows in the database, windows and
load times included. The clock is the test's: it moves past the poll period between rounds."""

from __future__ import annotations

import importlib
import json
import logging
import re
import subprocess
import sys
from contextlib import AbstractContextManager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from django.core.cache.backends.locmem import LocMemCache

from resource_server.bootstrap import Runtime
from resource_server.dispatch.local import LocalExecutors
from resource_server.models import Cluster, Endpoint, EndpointStart
from resource_server.status.base import State
from resource_server.status.board import StatusBoard
from resource_server.status.jobs import JobState
from resource_server.status.scheduler import SchedulerFunction
from tests.resource_server.status.conftest import Clock, build_board
from tests.resource_server.status.fake_scheduler import fake_scheduler_jobs
from tests.servers import free_port, running

# Tier `server`: the scheduler readings run in a process pool, the fake vLLM in a process of its own.
pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.server]

BOARD_LOGGER = "resource_server.status.board"
POLL = 60


@pytest.fixture(scope="module")
def local_executors() -> LocalExecutors:
    """One process pool for the module's scheduler readings (pools start processes; their workers end with us)."""
    return LocalExecutors()


def _model_server(port: int) -> AbstractContextManager[subprocess.Popen[bytes]]:
    args = [sys.executable, "-m", "fakes.model_server", "--port", str(port), "--model=demo-model"]
    return running(args, f"http://127.0.0.1:{port}/health")


class Scheduler:
    """What the fake scheduler function answers next (see fake_scheduler.py)."""

    def __init__(self, directory: Path, clock: Clock) -> None:
        self.directory = directory
        self._clock = clock

    def answer(self, answer: dict[str, Any]) -> None:
        (self.directory / "answer.json").write_text(json.dumps(answer))

    def jobs(self, *jobs: dict[str, Any]) -> None:
        self.answer({"jobs": {"scheduler": "pbs", "user": "svc", "collected_at": self._clock.now, "jobs": list(jobs)}})


def job(state: JobState, job_id: str = "4242.polaris-pbs-01", name: str = "gw-demo", **fields: Any) -> dict[str, Any]:
    code = {"queued": "Q", "held": "H", "running": "R", "exiting": "E", "finished": "F", "other": "S"}[state]
    return {
        "id": job_id,
        "name": name,
        "user": "svc",
        "queue": "demand",
        "state": state.value,
        "scheduler_state": code,
        **fields,
    }


@pytest.fixture
def scheduler(tmp_path: Path, clock: Clock) -> Scheduler:
    return Scheduler(tmp_path, clock)


async def _cluster(scheduler: Scheduler, **config: Any) -> Cluster:
    return await Cluster.objects.acreate(
        name="polaris",
        scheduler={
            "kind": "pbs",
            "backend": "local",
            "user": "svc",
            "commands_dir": str(scheduler.directory),
            "poll_seconds": POLL,
            "timeout_seconds": 20,
            **config,
        },
    )


async def _endpoint(cluster: Cluster, port: int) -> Endpoint:
    return await Endpoint.objects.acreate(
        cluster=cluster,
        model="demo-model",
        backend="direct",
        backend_config={"base_url": f"http://127.0.0.1:{port}/v1", "connect_timeout": 2, "read_timeout": 2},
        scheduler_job_name="gw-demo",
    )


def _board(
    runtime: Runtime,
    clock: Clock,
    local_executors: LocalExecutors,
    function: SchedulerFunction | None = fake_scheduler_jobs,
) -> StatusBoard:
    def installed() -> SchedulerFunction:
        if function is None:  # as on a gateway without compute_functions.scheduler
            module: Any = importlib.import_module("compute_functions.not_installed")
            return module.scheduler_jobs  # type: ignore[no-any-return]
        return function

    return build_board(
        runtime,
        runtime.routing.table,
        store=LocMemCache(f"states-{id(clock)}", {}),
        clock=clock,
        local_executors=local_executors,
        function=installed,
    )


def _changes(caplog: pytest.LogCaptureFixture) -> list[tuple[int, str]]:
    return [(record.levelno, record.getMessage()) for record in caplog.records if record.name == BOARD_LOGGER]


async def test_live_draining_offline_queued_starting_live_with_etas_load_times_and_metrics(
    runtime: Runtime,
    clock: Clock,
    scheduler: Scheduler,
    local_executors: LocalExecutors,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=BOARD_LOGGER)
    port = free_port()
    endpoint = await _endpoint(await _cluster(scheduler), port)
    for load, days_ago in ((200, 3), (300, 2), (400, 1)):  # earlier starts: a median load time of 300 s
        live_at = datetime.now(UTC) - timedelta(days=days_ago)
        await EndpointStart.objects.acreate(
            endpoint=endpoint, started_at=live_at - timedelta(seconds=load), live_at=live_at, load_seconds=load
        )
    board = _board(runtime, clock, local_executors)
    start = clock.now

    # live: the model answers; its job runs for another hour.
    scheduler.jobs(job(JobState.RUNNING, started_at=start - 3600, ends_at=start + 3600, nodes=1))
    with _model_server(port):
        await board.probe()
        status = board.status(endpoint.pk)
        assert (status.state, status.since, status.eta_seconds) == (State.LIVE, start, None)
        reading = board.jobs("polaris")
        assert reading.jobs is not None and [found.id for found in reading.jobs.jobs] == ["4242.polaris-pbs-01"]
        assert (reading.read_at, reading.error) == (start, None)

        # draining: its walltime is 10 minutes away; it still answers.
        clock.advance(3000)
        await board.probe()
        status = board.status(endpoint.pk)
        assert (status.state, status.serving) == (State.DRAINING, True)
        assert "reaches its walltime in 600 s" in status.detail

    # offline: the job ended and the server with it.
    clock.advance(700)
    scheduler.jobs(job(JobState.FINISHED, started_at=start - 3600, ends_at=start + 3600, exit_status=271))
    await board.probe()
    assert board.status(endpoint.pk).state is State.OFFLINE

    # queued: a new job waits, third in its queue, expected to start in 2 minutes: ETA 120 + 300 s.
    clock.advance(POLL)
    scheduler.jobs(job(JobState.QUEUED, job_id="4300", queue_position=3, estimated_start_at=clock.now + 120))
    await board.probe()
    status = board.status(endpoint.pk)
    assert (status.state, status.queue_position, status.eta_seconds) == (State.QUEUED, 3, 420)
    board.turned_away(endpoint.pk)
    board.turned_away(endpoint.pk)
    clock.advance(20)
    assert board.status(endpoint.pk).eta_seconds == 400, "the ETA counts down between rounds"

    # starting: the job has run for 100 s; the model usually loads in 300 s.
    clock.advance(POLL - 20)
    scheduler.jobs(job(JobState.RUNNING, job_id="4300", started_at=clock.now - 100, ends_at=clock.now + 7000))
    await board.probe()
    status = board.status(endpoint.pk)
    assert (status.state, status.eta_seconds, status.serving) == (State.STARTING, 200, False)
    job_started = clock.now - 100

    # live again: the load time (job start to first healthy) is recorded, and counts in the next ETA.
    clock.advance(POLL)
    with _model_server(port):
        await board.probe()
    assert board.status(endpoint.pk).state is State.LIVE
    [newest] = [start async for start in EndpointStart.objects.filter(job_id="4300")]
    assert (newest.endpoint_id, newest.load_seconds) == (endpoint.pk, 160)
    assert newest.started_at.timestamp() == job_started

    metrics = board.metrics()[endpoint.pk]
    assert metrics.load_seconds == (160, 400, 300, 200)
    assert (metrics.live_seconds, metrics.queued_seconds, metrics.starting_seconds) == (3000 + 700, 60, 60)
    assert metrics.seconds_in_state["offline"] == 60
    assert metrics.turned_away == 2
    changes = [found.group(1) for _, message in _changes(caplog) if (found := re.search(r"\) is (\w+) \(", message))]
    assert changes == ["live", "draining", "offline", "queued", "starting", "live"], "each change once"
    assert [level for level, message in _changes(caplog) if " is offline" in message] == [logging.WARNING]


async def test_a_scheduler_that_fails_times_out_or_answers_garbage_leaves_the_last_jobs_marked_stale(
    runtime: Runtime,
    clock: Clock,
    scheduler: Scheduler,
    local_executors: LocalExecutors,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="resource_server.status.scheduler")
    endpoint = await _endpoint(await _cluster(scheduler, timeout_seconds=1), free_port())  # no model server there
    board = _board(runtime, clock, local_executors)
    scheduler.jobs(job(JobState.QUEUED, queue_position=2))
    await board.probe()
    read_at = clock.now
    assert (board.status(endpoint.pk).state, board.status(endpoint.pk).stale_seconds) == (State.QUEUED, None)

    failures = [
        ({"garbage": {"jobs": "none today"}}, "returned something other than jobs"),
        ({"fail": "qstat: cannot connect to server polaris-pbs-01"}, "cannot connect to server"),
        ({"sleep": 5, "garbage": None}, "no answer within 1 s"),
    ]
    for answer, why in failures:
        clock.advance(POLL)
        scheduler.answer(answer)
        await board.probe()
        status = board.status(endpoint.pk)
        assert (status.state, status.queue_position) == (State.QUEUED, 2), "the last known jobs hold"
        assert status.stale_seconds == clock.now - read_at
        reading = board.jobs("polaris")
        assert reading.jobs is not None and reading.read_at == read_at
        assert reading.error is not None and why in reading.error

    clock.advance(POLL)
    scheduler.answer({"fail": "qstat: cannot connect to server polaris-pbs-01"})
    await board.probe()  # failing the same way again: not logged again
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 4 and "cannot connect" in warnings[3] and "cannot connect" in warnings[1]

    clock.advance(POLL)
    scheduler.jobs(job(JobState.RUNNING, started_at=clock.now - 10))
    await board.probe()
    status = board.status(endpoint.pk)
    assert (status.state, status.stale_seconds) == (State.STARTING, None)
    assert board.jobs("polaris").error is None


async def test_the_scheduler_is_polled_once_per_period_across_workers(
    runtime: Runtime, clock: Clock, scheduler: Scheduler, local_executors: LocalExecutors
) -> None:
    endpoint = await _endpoint(await _cluster(scheduler), free_port())
    first = _board(runtime, clock, local_executors)
    second = _board(runtime, clock, local_executors)  # the same cache: another worker of the same gateway
    scheduler.jobs(job(JobState.QUEUED, queue_position=4))
    await first.probe()
    scheduler.jobs(job(JobState.QUEUED, queue_position=1))  # what a second poll would read
    clock.advance(POLL - 1)
    await second.probe()
    assert second.status(endpoint.pk).queue_position == 4, "the first worker's reading, not a poll of its own"
    assert second.jobs("polaris").read_at == first.jobs("polaris").read_at
    clock.advance(1)
    await second.probe()
    assert second.status(endpoint.pk).queue_position == 1
    await first.probe()
    assert first.status(endpoint.pk).queue_position == 1, "and the first takes the second's"

    started = _board(runtime, clock, local_executors)  # a worker that just started
    await started.adopt()
    adopted = started.jobs("polaris").jobs
    assert adopted is not None and adopted.jobs[0].queue_position == 1
    assert started.status(endpoint.pk).queue_position == 1


async def test_jobs_that_cannot_be_read_are_unknown_never_an_empty_list(
    runtime: Runtime, clock: Clock, scheduler: Scheduler, local_executors: LocalExecutors
) -> None:
    await _endpoint(await _cluster(scheduler), free_port())
    await Cluster.objects.acreate(name="aurora")  # no scheduler to read
    board = _board(runtime, clock, local_executors, function=None)
    assert board.jobs("polaris").jobs is None, "before any round: unknown"
    await board.probe()
    reading = board.jobs("polaris")
    assert (reading.jobs, reading.configured) == (None, True)
    assert reading.error is not None and "not installed" in reading.error
    assert board.jobs("aurora").configured is False
