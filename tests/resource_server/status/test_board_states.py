"""The status board end to end over its real sources: the fake vLLM stopped and started on one port, and the
cluster's jobs read through the scheduler source's real path: the `scheduler` compute function
(`compute_functions/scheduler.py`) in a local process pool, running the fake PBS commands (`fakes/scheduler`)
over a scenario the test writes; rows in the database, load times included. The clock is the test's: it moves
past the poll period between rounds. A stand-in for the function (`fake_scheduler.py`) answers what the real one
never would: garbage."""

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

from fakes.scheduler import FakeJob, Scenario
from resource_server.bootstrap import Runtime
from resource_server.dispatch.local import LocalExecutors
from resource_server.models import Cluster, Endpoint, EndpointStart
from resource_server.status.base import State
from resource_server.status.board import StatusBoard
from resource_server.status.scheduler import SchedulerFunction, _shape, installed_scheduler_function
from tests.conftest import FakeScheduler
from tests.resource_server.status.conftest import Clock, build_board, scheduler_commands
from tests.resource_server.status.fake_scheduler import fake_scheduler_jobs
from tests.servers import free_port, running

# Tier `server`: the scheduler readings run in a process pool, the fake vLLM in a process of its own.
pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.server]

BOARD_LOGGER = "resource_server.status.board"
POLL = 60
SERVICE_ACCOUNT = "svc-gateway"


@pytest.fixture(scope="module")
def local_executors() -> LocalExecutors:
    """One process pool for the module's scheduler readings (pools start processes; their workers end with us)."""
    return LocalExecutors()


def _model_server(port: int) -> AbstractContextManager[subprocess.Popen[bytes]]:
    args = [sys.executable, "-m", "fakes.model_server", "--port", str(port), "--model=demo-model"]
    return running(args, f"http://127.0.0.1:{port}/health")


class Pbs:
    """The cluster's PBS as the fake commands print it: a scenario the test changes, and where the commands are."""

    def __init__(self, fake: FakeScheduler, clock: Clock) -> None:
        self.scenario = Scenario(server="polaris-pbs-01")
        self.commands_dir = scheduler_commands(fake.state_file, fake.state_file.parent / "pbs-bin")
        self._fake = fake
        self._clock = clock

    def job(self, job_id: str, *, state: str = "queued", user: str = SERVICE_ACCOUNT, **fields: Any) -> None:
        fields.setdefault("submitted_at", self._clock.now - 600)
        self.scenario.jobs.append(FakeJob(id=job_id, name="gw-demo", user=user, queue="demand", state=state, **fields))
        self.write()

    def write(self) -> None:
        self._fake.write(self.scenario)


@pytest.fixture
def pbs(fake_scheduler: FakeScheduler, clock: Clock) -> Pbs:
    return Pbs(fake_scheduler, clock)


async def _cluster(commands_dir: Path, **config: Any) -> Cluster:
    return await Cluster.objects.acreate(
        name="polaris",
        scheduler={
            "kind": "pbs",
            "backend": "local",
            "user": SERVICE_ACCOUNT,
            "commands_dir": str(commands_dir),
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
    function: SchedulerFunction | None = None,
    *,
    installed: bool = True,
) -> StatusBoard:
    """A board reading the scheduler with the installed function (or `function`); `installed=False`: as on a
    gateway without compute_functions.scheduler."""

    def scheduler_function() -> SchedulerFunction:
        if not installed:
            module: Any = importlib.import_module("compute_functions.not_installed")
            return module.scheduler_jobs  # type: ignore[no-any-return]
        return function or installed_scheduler_function()

    # Rounds wait for a poll as long as it may take: the readings here run several commands in a fresh pool.
    return build_board(
        runtime,
        runtime.routing.table,
        store=LocMemCache(f"states-{id(clock)}", {}),
        clock=clock,
        local_executors=local_executors,
        function=scheduler_function,
        timeout=20,
    )


def _changes(caplog: pytest.LogCaptureFixture) -> list[tuple[int, str]]:
    return [(record.levelno, record.getMessage()) for record in caplog.records if record.name == BOARD_LOGGER]


async def test_live_draining_offline_queued_starting_live_with_etas_load_times_and_metrics(
    runtime: Runtime,
    clock: Clock,
    pbs: Pbs,
    local_executors: LocalExecutors,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=BOARD_LOGGER)
    port = free_port()
    endpoint = await _endpoint(await _cluster(pbs.commands_dir), port)
    for load, days_ago in ((200, 3), (300, 2), (400, 1)):  # earlier starts: a median load time of 300 s
        live_at = datetime.now(UTC) - timedelta(days=days_ago)
        await EndpointStart.objects.acreate(
            endpoint=endpoint, started_at=live_at - timedelta(seconds=load), live_at=live_at, load_seconds=load
        )
    board = _board(runtime, clock, local_executors)
    start = clock.now

    # live: the model answers; its job started an hour ago for two.
    pbs.job("4242", state="running", started_at=start - 3600, walltime_seconds=7200, hosts=["x3001c0s13b0n0"])
    with _model_server(port):
        await board.probe()
        status = board.status(endpoint.pk)
        assert (status.state, status.since, status.eta_seconds) == (State.LIVE, start, None)
        reading = board.jobs("polaris")
        assert reading.jobs is not None and [job.id for job in reading.jobs.jobs] == ["4242.polaris-pbs-01"]
        assert (reading.read_at, reading.error, reading.jobs.jobs[0].ends_at) == (start, None, start + 3600)

        # draining: its walltime is 10 minutes away; it still answers.
        clock.advance(3000)
        await board.probe()
        status = board.status(endpoint.pk)
        assert (status.state, status.serving) == (State.DRAINING, True)
        assert "reaches its walltime in 600 s" in status.detail

    # offline: the job ended and the server with it.
    clock.advance(700)
    pbs.scenario.finish("4242", exit_status=271, at=clock.now - 60)
    pbs.write()
    await board.probe()
    assert board.status(endpoint.pk).state is State.OFFLINE

    # queued: a new job waits behind two of other users in its queue, expected to start in 2 minutes: ETA
    # 120 s + the 300 s the model takes to load.
    clock.advance(POLL)
    pbs.job("4250", user="alice", estimated_start_at=clock.now + 30)
    pbs.job("4251", user="bob", estimated_start_at=clock.now + 60)
    pbs.job("4300", estimated_start_at=clock.now + 120)
    await board.probe()
    status = board.status(endpoint.pk)
    assert (status.state, status.queue_position, status.eta_seconds) == (State.QUEUED, 3, 420)
    board.turned_away(endpoint.pk)
    board.turned_away(endpoint.pk)
    clock.advance(20)
    assert board.status(endpoint.pk).eta_seconds == 400, "the ETA counts down between rounds"

    # starting: the job has run for 100 s; the model usually loads in 300 s.
    clock.advance(POLL - 20)
    job_started = clock.now - 100
    pbs.scenario.start("4300", hosts=["x3001c0s13b0n0"], at=job_started)
    pbs.write()
    await board.probe()
    status = board.status(endpoint.pk)
    assert (status.state, status.eta_seconds, status.serving) == (State.STARTING, 200, False)

    # live again: the load time (job start to first healthy) is recorded, and counts in the next ETA.
    clock.advance(POLL)
    with _model_server(port):
        await board.probe()
    assert board.status(endpoint.pk).state is State.LIVE
    [newest] = [start async for start in EndpointStart.objects.filter(job_id="4300.polaris-pbs-01")]
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


def test_failing_the_same_way_ignores_the_numbers_in_the_message() -> None:
    """qstat's garbage carries its timestamp, and a cut-short output another length: the same failure."""
    garbage = (
        "`qstat -f -F json` printed invalid JSON (Expecting ',' delimiter: line 1 column {} (char {})): "
        "'{{\"timestamp\":{}'"
    )
    assert _shape(garbage.format(80, 79, 1796000000)) == _shape(garbage.format(81, 80, 1796000001))
    assert _shape("`qstat` exited with status 1: cannot connect") != _shape(garbage.format(80, 79, 1796000000))
    assert _shape(None) is None


@pytest.mark.parametrize(
    ("fault", "why"),
    [
        ("down", "qstat: cannot connect to server polaris-pbs-01"),
        ("garbage", "qstat"),
        ("hang", ""),  # killed by the function at its command timeout, or given up on by the board: either way
    ],
)
async def test_a_scheduler_that_fails_or_hangs_leaves_the_last_jobs_marked_stale(
    runtime: Runtime,
    clock: Clock,
    pbs: Pbs,
    local_executors: LocalExecutors,
    caplog: pytest.LogCaptureFixture,
    fault: str,
    why: str,
) -> None:
    caplog.set_level(logging.INFO, logger="resource_server.status.scheduler")
    cluster = await _cluster(pbs.commands_dir, timeout_seconds=2)
    endpoint = await _endpoint(cluster, free_port())  # no model server there: its job says why
    board = _board(runtime, clock, local_executors)
    pbs.job("4300", estimated_start_at=clock.now + 600)
    await board.probe()
    read_at = clock.now
    assert (board.status(endpoint.pk).state, board.status(endpoint.pk).queue_position) == (State.QUEUED, 1)

    pbs.scenario.faults = {"qstat": fault}
    pbs.write()
    for _ in range(2):
        clock.advance(POLL)
        await board.probe()
        status = board.status(endpoint.pk)
        assert (status.state, status.queue_position) == (State.QUEUED, 1), "the last known jobs hold"
        assert status.stale_seconds == clock.now - read_at
        reading = board.jobs("polaris")
        assert reading.jobs is not None and reading.read_at == read_at
        assert reading.error is not None and why in reading.error
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1, "failing the same way again is not logged again"

    pbs.scenario.faults = {}
    pbs.scenario.start("4300", hosts=["x3001c0s13b0n0"], at=clock.now)
    pbs.write()
    clock.advance(POLL)
    await board.probe()
    status = board.status(endpoint.pk)
    assert (status.state, status.stale_seconds) == (State.STARTING, None)
    assert board.jobs("polaris").error is None


async def test_a_function_that_answers_something_other_than_jobs_leaves_the_last_ones(
    runtime: Runtime, clock: Clock, local_executors: LocalExecutors, tmp_path: Path
) -> None:
    answer = tmp_path / "answer.json"
    endpoint = await _endpoint(await _cluster(tmp_path), free_port())
    board = _board(runtime, clock, local_executors, fake_scheduler_jobs)
    queued = {"id": "7", "name": "gw-demo", "user": SERVICE_ACCOUNT, "queue": "q", "state": "queued"}
    jobs = {"scheduler": "pbs", "user": SERVICE_ACCOUNT, "collected_at": clock.now, "jobs": [queued]}
    answer.write_text(json.dumps({"jobs": {**jobs, "jobs": [{**queued, "scheduler_state": "Q"}]}}))
    await board.probe()
    assert board.status(endpoint.pk).state is State.QUEUED

    clock.advance(POLL)
    answer.write_text(json.dumps({"garbage": {**jobs, "jobs": "none today"}}))  # a function of another version
    await board.probe()
    assert (board.status(endpoint.pk).state, board.status(endpoint.pk).stale_seconds) == (State.QUEUED, POLL)
    error = board.jobs("polaris").error
    assert error is not None and "returned something other than jobs" in error


async def test_the_scheduler_is_polled_once_per_period_across_workers(
    runtime: Runtime, clock: Clock, pbs: Pbs, local_executors: LocalExecutors
) -> None:
    endpoint = await _endpoint(await _cluster(pbs.commands_dir), free_port())
    first = _board(runtime, clock, local_executors)
    second = _board(runtime, clock, local_executors)  # the same cache: another worker of the same gateway
    pbs.job("4250", user="alice", estimated_start_at=clock.now + 30)
    pbs.job("4300", estimated_start_at=clock.now + 120)
    await first.probe()
    assert first.status(endpoint.pk).queue_position == 2
    pbs.scenario.jobs.pop(0)  # alice's job went: what a second poll would read
    pbs.write()
    clock.advance(POLL - 1)
    await second.probe()
    assert second.status(endpoint.pk).queue_position == 2, "the first worker's reading, not a poll of its own"
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
    runtime: Runtime, clock: Clock, local_executors: LocalExecutors, tmp_path: Path
) -> None:
    await _endpoint(await _cluster(tmp_path), free_port())
    await Cluster.objects.acreate(name="aurora")  # no scheduler to read
    board = _board(runtime, clock, local_executors, installed=False)
    assert board.jobs("polaris").jobs is None, "before any round: unknown"
    await board.probe()
    reading = board.jobs("polaris")
    assert (reading.jobs, reading.configured) == (None, True)
    assert reading.error is not None and "not installed" in reading.error
    assert board.jobs("aurora").configured is False
