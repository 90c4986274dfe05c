"""The derivation: an endpoint's state from its health, its Globus Compute facts, its jobs, a window and its load
time, one rule at a time."""

from __future__ import annotations

from typing import Any

import pytest

from resource_server.dispatch.base import BackendHealth, ComputeFacts
from resource_server.status.base import EndpointStatus, State
from resource_server.status.derive import Maintenance, derive_status, endpoint_jobs, serving_job
from resource_server.status.jobs import ClusterJobs, Job, JobState

NOW = 1_800_000_000.0
DRAIN = 600.0
HEALTHY = BackendHealth(True, "HTTP 200")
DOWN = BackendHealth(False, "ConnectError")


def job(state: JobState, *, job_id: str = "101.polaris", name: str = "gw-llama", **fields: Any) -> Job:
    code = {"queued": "Q", "held": "H", "running": "R", "exiting": "E", "finished": "F", "other": "S"}[state]
    return Job(id=job_id, name=name, user="svc", queue="prod", state=state, scheduler_state=code, **fields)


def derive(
    health: BackendHealth | None = HEALTHY,
    jobs: list[Job] | None = None,
    *,
    window: Maintenance | None = None,
    median: float | None = None,
    previous: EndpointStatus | None = None,
    **stale: float | None,
) -> EndpointStatus:
    return derive_status(
        health=health,
        jobs=jobs,
        window=window,
        load_median=median,
        now=NOW,
        drain_seconds=DRAIN,
        previous=previous,
        **stale,  # type: ignore[arg-type]
    )


def test_a_window_in_force_is_maintenance_with_its_message_and_end_whatever_else_is_said() -> None:
    window = Maintenance("Polaris is down for upgrades.", NOW + 3600)
    for health in (HEALTHY, DOWN, None):
        status = derive(health, [job(JobState.RUNNING)], window=window)
        assert status.state is State.MAINTENANCE
        assert (status.maintenance_message, status.maintenance_ends) == ("Polaris is down for upgrades.", NOW + 3600)
        assert not status.serving


def test_never_probed_is_unknown_which_is_served() -> None:
    status = derive(None, [job(JobState.QUEUED)])
    assert (status.state, status.serving) == (State.UNKNOWN, True)


def test_healthy_is_live_with_or_without_a_scheduler() -> None:
    assert derive(HEALTHY, None).state is State.LIVE  # jobs unknown
    assert derive(HEALTHY, []).state is State.LIVE  # no job of its name
    live = derive(HEALTHY, [job(JobState.RUNNING, started_at=NOW - 50, ends_at=NOW + DRAIN + 1)])
    assert (live.state, live.detail, live.eta_seconds) == (State.LIVE, "HTTP 200", None)


@pytest.mark.parametrize(
    ("running", "why"),
    [
        (job(JobState.EXITING, ends_at=NOW + 5000), "is ending"),
        (job(JobState.RUNNING, ends_at=NOW + DRAIN), "reaches its walltime in 600 s"),
        (job(JobState.RUNNING, ends_at=NOW - 5), "reaches its walltime in 0 s"),
    ],
)
def test_healthy_whose_job_is_exiting_or_near_its_end_is_draining_and_still_served(running: Job, why: str) -> None:
    status = derive(HEALTHY, [running])
    assert (status.state, status.serving) == (State.DRAINING, True)
    assert why in status.detail


def test_a_replacement_job_already_running_keeps_it_live() -> None:
    ending = job(JobState.RUNNING, job_id="1", ends_at=NOW + 60)
    fresh = job(JobState.RUNNING, job_id="2", ends_at=NOW + 7200)
    assert serving_job([ending, fresh]) == fresh
    assert derive(HEALTHY, [ending, fresh]).state is State.LIVE


def test_not_healthy_with_its_job_running_is_starting_eta_from_the_median_load_time() -> None:
    running = job(JobState.RUNNING, started_at=NOW - 100)
    assert derive(DOWN, [running], median=300).eta_seconds == 200
    assert derive(DOWN, [running], median=60).eta_seconds == 0, "past its usual load time: any moment now"
    status = derive(DOWN, [running])
    assert (status.state, status.eta_seconds, status.serving) == (State.STARTING, None, False)
    assert derive(DOWN, [job(JobState.RUNNING)], median=300).eta_seconds is None, "no start time, no ETA"


def test_not_healthy_with_its_job_waiting_is_queued_with_position_and_eta() -> None:
    waiting = job(JobState.QUEUED, queue_position=3, estimated_start_at=NOW + 120)
    status = derive(DOWN, [waiting], median=300)
    assert (status.state, status.queue_position, status.eta_seconds) == (State.QUEUED, 3, 420)
    assert "position 3" in status.detail
    assert derive(DOWN, [waiting]).eta_seconds is None, "without a load time"
    unestimated = job(JobState.QUEUED, queue_position=1)
    assert derive(DOWN, [unestimated], median=300).eta_seconds is None, "without the scheduler's estimate"


def test_a_held_job_is_queued_too_and_a_queued_one_goes_before_it() -> None:
    held = job(JobState.HELD, job_id="7")
    status = derive(DOWN, [held])
    assert (status.state, status.queue_position) == (State.QUEUED, None)
    assert "(held)" in status.detail
    queued = job(JobState.QUEUED, job_id="8", queue_position=5)
    assert "job 8" in derive(DOWN, [held, queued]).detail


def test_an_exiting_job_of_a_model_not_answering_is_offline() -> None:
    assert derive(DOWN, [job(JobState.EXITING)]).state is State.OFFLINE


def test_a_compute_endpoint_with_tasks_waiting_for_a_block_is_queued_without_an_eta() -> None:
    asking = BackendHealth(False, "online; no workers yet", compute=ComputeFacts(True, 0, 2, True))
    status = derive(asking, None)
    assert (status.state, status.eta_seconds, status.queue_position) == (State.QUEUED, None, None)
    idle = BackendHealth(False, "online; no workers yet", compute=ComputeFacts(True, 0, 0, True))
    assert derive(idle, None).state is State.OFFLINE
    gone = BackendHealth(False, "offline", compute=ComputeFacts(False, None, None, None))
    assert derive(gone, None).state is State.OFFLINE
    # The scheduler knows more: its job's place in the queue.
    assert derive(asking, [job(JobState.QUEUED, queue_position=2)]).queue_position == 2


def test_otherwise_offline_with_the_health_checks_words() -> None:
    status = derive(DOWN, [])
    assert (status.state, status.detail, status.serving) == (State.OFFLINE, "ConnectError", False)


def test_since_is_kept_while_the_state_holds_and_is_now_when_it_changes() -> None:
    before = EndpointStatus(State.LIVE, since=NOW - 3600)
    assert derive(HEALTHY, previous=before).since == NOW - 3600
    assert derive(DOWN, previous=before).since == NOW


def test_readings_kept_after_their_source_failed_make_it_stale_by_the_oldest() -> None:
    assert derive(HEALTHY, []).stale_seconds is None
    assert derive(HEALTHY, [], health_stale_seconds=40).stale_seconds == 40
    assert derive(DOWN, [job(JobState.QUEUED)], health_stale_seconds=40, jobs_stale_seconds=90).stale_seconds == 90
    assert derive(HEALTHY, None, jobs_stale_seconds=90).stale_seconds is None, "jobs not used"


def test_an_endpoints_jobs_are_its_unfinished_jobs_of_its_name() -> None:
    jobs = ClusterJobs(
        scheduler="pbs",
        user="svc",
        collected_at=NOW,
        jobs=[
            job(JobState.RUNNING, job_id="1"),
            job(JobState.FINISHED, job_id="2"),
            job(JobState.QUEUED, job_id="3", name="gw-other"),
        ],
    )
    assert [found.id for found in endpoint_jobs(jobs, "gw-llama") or []] == ["1"]
    assert endpoint_jobs(jobs, "") == [], "no job name: no job, whatever runs"
    assert endpoint_jobs(None, "gw-llama") is None, "unknown stays unknown"
