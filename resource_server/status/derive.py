"""An endpoint's state from what its sources last said: one pure function, so every rule is tested alone.

The sources: the backend's health (and, through Globus Compute, its endpoint's status), the cluster's batch
jobs whose name is the endpoint's `scheduler_job_name`, an admin's maintenance window, and the model's
measured load time. The status board (`board.py`) gathers them in the background and calls `derive_status`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from resource_server.dispatch.base import BackendHealth
from resource_server.status.base import EndpointStatus, State
from resource_server.status.jobs import ClusterJobs, Job, JobState


@dataclass(frozen=True, slots=True)
class Maintenance:
    """An admin's maintenance window in force: what researchers are told, and when it ends (None: not set)."""

    message: str
    ends_at: float | None  # wall clock


def endpoint_jobs(jobs: ClusterJobs | None, job_name: str) -> list[Job] | None:
    """The endpoint's jobs: those not finished whose name is its `scheduler_job_name`. None when the cluster's
    jobs are unknown; an endpoint without a job name has no job (an empty list), whatever runs."""
    if jobs is None:
        return None
    if not job_name:
        return []
    return [job for job in jobs.jobs if job.name == job_name and job.state is not JobState.FINISHED]


def serving_job(jobs: Sequence[Job]) -> Job | None:
    """The running (or exiting) job that serves the model: the one that runs longest from now (an open-ended
    one first), so that a replacement job started before the old one ends keeps the endpoint live."""
    running = [job for job in jobs if job.state in (JobState.RUNNING, JobState.EXITING)]
    if not running:
        return None
    return max(
        running,
        key=lambda job: (job.state is JobState.RUNNING, float("inf") if job.ends_at is None else job.ends_at),
    )


def _waiting_job(jobs: Sequence[Job]) -> Job | None:
    """The queued job nearest to start: queued before held, then by queue position and estimated start."""
    waiting = [job for job in jobs if job.state in (JobState.QUEUED, JobState.HELD)]
    if not waiting:
        return None
    far = float("inf")
    return min(
        waiting,
        key=lambda job: (
            job.state is JobState.HELD,
            far if job.queue_position is None else job.queue_position,
            far if job.estimated_start_at is None else job.estimated_start_at,
        ),
    )


def _stale(*ages: float | None) -> float | None:
    known = [age for age in ages if age is not None]
    return max(known) if known else None


def derive_status(
    *,
    health: BackendHealth | None,
    jobs: Sequence[Job] | None,
    window: Maintenance | None,
    load_median: float | None,
    now: float,
    drain_seconds: float,
    previous: EndpointStatus | None = None,
    health_stale_seconds: float | None = None,
    jobs_stale_seconds: float | None = None,
) -> EndpointStatus:
    """The endpoint's state now.

    `health`: the backend's last known reading (None: never had one); `jobs`: the endpoint's jobs (see
    `endpoint_jobs`; None: unknown); `window`: the maintenance window in force; `load_median`: seconds from its
    job's start to its first healthy answer, the median of its recent starts. `previous` gives `since` when the
    state is unchanged; the `*_stale_seconds` are the ages of readings kept after their source failed.

    maintenance  a window is in force (its message and end)
    unknown      never probed
    live         healthy; draining when its job is exiting or ends within `drain_seconds`
    starting     not healthy, its job runs: eta = load median - time since the job started (at least 0)
    queued       not healthy, its job waits (held too): eta = estimated start - now + load median; or a Globus
                 Compute endpoint online with no workers but tasks outstanding (its engine asked for a block)
    offline      anything else
    """
    stale = _stale(health_stale_seconds, jobs_stale_seconds if jobs is not None else None)
    status = _derive(health, jobs or (), window, load_median, now, drain_seconds, stale)
    if previous is not None and previous.state is status.state and previous.since:
        return _with_since(status, previous.since)
    return status


def _with_since(status: EndpointStatus, since: float) -> EndpointStatus:
    return EndpointStatus(
        status.state,
        since=since,
        detail=status.detail,
        eta_seconds=status.eta_seconds,
        queue_position=status.queue_position,
        stale_seconds=status.stale_seconds,
        maintenance_message=status.maintenance_message,
        maintenance_ends=status.maintenance_ends,
    )


def _derive(
    health: BackendHealth | None,
    jobs: Sequence[Job],
    window: Maintenance | None,
    median: float | None,
    now: float,
    drain_seconds: float,
    stale: float | None,
) -> EndpointStatus:
    if window is not None:
        return EndpointStatus(
            State.MAINTENANCE,
            since=now,
            detail=window.message,
            maintenance_message=window.message,
            maintenance_ends=window.ends_at,
        )
    if health is None:
        return EndpointStatus(State.UNKNOWN, since=now, detail="not checked yet", stale_seconds=stale)
    serving = serving_job(jobs)
    if health.ok:
        if serving is not None and serving.state is JobState.EXITING:
            return EndpointStatus(State.DRAINING, since=now, detail=f"job {serving.id} is ending", stale_seconds=stale)
        if serving is not None and serving.ends_at is not None and serving.ends_at - now <= drain_seconds:
            left = max(0.0, serving.ends_at - now)
            detail = f"job {serving.id} reaches its walltime in {left:.0f} s"
            return EndpointStatus(State.DRAINING, since=now, detail=detail, stale_seconds=stale)
        return EndpointStatus(State.LIVE, since=now, detail=health.detail, stale_seconds=stale)
    if serving is not None and serving.state is JobState.RUNNING:
        eta = None
        if median is not None and serving.started_at is not None:
            eta = max(0.0, median - (now - serving.started_at))
        detail = f"job {serving.id} runs; the model is loading ({health.detail})"
        return EndpointStatus(State.STARTING, since=now, detail=detail, eta_seconds=eta, stale_seconds=stale)
    waiting = _waiting_job(jobs)
    if waiting is not None:
        eta = None
        if waiting.estimated_start_at is not None and median is not None:
            eta = max(0.0, waiting.estimated_start_at - now + median)
        held = " (held)" if waiting.state is JobState.HELD else ""
        where = f"; position {waiting.queue_position}" if waiting.queue_position is not None else ""
        detail = f"job {waiting.id} waits in queue {waiting.queue}{held}{where}"
        return EndpointStatus(
            State.QUEUED,
            since=now,
            detail=detail,
            eta_seconds=eta,
            queue_position=waiting.queue_position,
            stale_seconds=stale,
        )
    facts = health.compute
    if facts is not None and facts.online and facts.workers == 0 and (facts.outstanding_tasks or 0) > 0:
        detail = f"its Globus Compute endpoint has {facts.outstanding_tasks} task(s) waiting for a block to start"
        return EndpointStatus(State.QUEUED, since=now, detail=detail, stale_seconds=stale)
    return EndpointStatus(State.OFFLINE, since=now, detail=health.detail, stale_seconds=stale)
