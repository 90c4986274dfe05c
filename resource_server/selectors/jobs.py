"""FIRST's `GET /resource_server/{cluster}/jobs`: a cluster's batch jobs that run models, in FIRST's shape.

A job belongs to the endpoints whose `scheduler_job_name` is its name; the caller sees a job only for the
models it runs that they may use (as in FIRST), and jobs that run no registered model not at all. FIRST's
buckets: `running`, `queued`, `stopped` (finished), `others`, and its private-batch buckets, left empty (the
gateway's batches are another route). Each job is FIRST's `JobInfo` (`Models`, `Framework`, `Cluster`, and
its spaced names such as `Job ID`, `Model Status`), with times in ISO 8601 UTC rather than FIRST's local time.

`cluster_status` says how much the lists can be trusted: `jobs` is `known` (read `read_at`), `stale` (the last
reading failed; the lists are the last known ones, `stale_seconds` old) or `unknown` (never read, or the
cluster has no scheduler: the lists are empty because nothing is known, not because nothing runs).
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from resource_server.auth.base import Principal
from resource_server.errors import ErrorCode, NotFound
from resource_server.selectors.endpoints import EndpointRoute, RoutingCache, RoutingTable
from resource_server.status.base import State, StatusView
from resource_server.status.jobs import ClusterJobs, Job, JobState

# FIRST's bucket of a job, by state; a held job waits in the queue as a queued one does.
_BUCKET = {
    JobState.QUEUED: "queued",
    JobState.HELD: "queued",
    JobState.RUNNING: "running",
    JobState.EXITING: "running",
    JobState.FINISHED: "stopped",
    JobState.OTHER: "others",
}
BUCKETS = ("running", "queued", "stopped", "others", "private_batch_running", "private_batch_queued")

# FIRST's `Model Status` of a running job, from the state of the endpoints it runs.
_MODEL_STATUS = {
    State.LIVE: "running",
    State.DRAINING: "running",
    State.STARTING: "starting",
    State.UNKNOWN: "starting",
}


@dataclass(frozen=True, slots=True)
class JobsReading:
    """What is known of a cluster's jobs: the last good reading, when it was taken, and the last error since."""

    jobs: ClusterJobs | None
    read_at: float | None = None  # wall clock of the last good reading
    error: str | None = None  # why the latest attempt failed, when it did
    configured: bool = True  # False: the cluster has no scheduler to read


class JobsSource(StatusView, Protocol):
    """The status board, as the jobs listing reads it: each endpoint's state and each cluster's jobs."""

    def jobs(self, cluster_name: str) -> JobsReading: ...


def _iso(epoch: float | None) -> str | None:
    return None if epoch is None else datetime.fromtimestamp(epoch, UTC).isoformat(timespec="seconds")


def _job_info(job: Job, routes: list[EndpointRoute], cluster: str, status: StatusView) -> dict[str, Any]:
    bucket = _BUCKET[job.state]
    if bucket == "running":
        states = sorted((status.status(route.id).state for route in routes), key=list(State).index)
        model_status = "stopping" if job.state is JobState.EXITING else _MODEL_STATUS.get(states[0], "starting")
    else:
        model_status = {"queued": "queued", "stopped": "stopped"}.get(bucket, "other")
    return {
        "Models": ",".join(sorted({route.model for route in routes})),
        "Framework": ",".join(sorted({route.framework for route in routes})),
        "Cluster": cluster,
        "Job ID": job.id,
        "Job State": job.scheduler_state,
        "Model Status": model_status,
        "Host Name": "+".join(job.hosts) or "N/A",
        "Job Comments": job.comment or "N/A",
        "Nodes Reserved": job.nodes if job.nodes is not None else "N/A",
        "Walltime": job.walltime_seconds,
        "Queue": job.queue,
        "Queue Position": job.queue_position,
        "Submitted": _iso(job.submitted_at),
        "Started": _iso(job.started_at),
        "Estimated Start Time": _iso(job.estimated_start_at),
        "Ends": _iso(job.ends_at),
    }


def cluster_jobs(
    *,
    table: RoutingTable,
    cluster: str,
    principal: Principal,
    reading: JobsReading,
    status: StatusView,
    now: float,
) -> dict[str, Any]:
    """The cluster's model jobs the caller may see, in FIRST's `JobsByStatus` shape (see the module doc)."""
    by_job_name: dict[str, list[EndpointRoute]] = defaultdict(list)
    for routes in table.by_model.values():
        for route in routes:
            if route.cluster == cluster and route.job_name and route.allows(principal):
                by_job_name[route.job_name].append(route)
    answer: dict[str, Any] = {bucket: [] for bucket in BUCKETS}
    jobs = reading.jobs
    if jobs is not None:
        for job in jobs.jobs:
            runs = by_job_name.get(job.name)
            if runs:
                answer[_BUCKET[job.state]].append(_job_info(job, runs, cluster, status))
    known = "unknown" if not reading.configured or jobs is None else "stale" if reading.error else "known"
    cluster_status: dict[str, Any] = {
        "jobs": known,
        "scheduler": jobs.scheduler if jobs is not None else None,
        "free_nodes": jobs.free_nodes if jobs is not None else None,
        "read_at": _iso(reading.read_at),
        "stale_seconds": round(now - reading.read_at) if known == "stale" and reading.read_at else None,
    }
    if not reading.configured:
        cluster_status["message"] = "This cluster's scheduler is not read by the gateway."
    elif reading.error:
        cluster_status["message"] = f"The cluster's scheduler could not be read: {reading.error}"
    answer["cluster_status"] = cluster_status
    return answer


async def cluster_jobs_list(
    *, routing: RoutingCache, status: JobsSource, principal: Principal, cluster: str
) -> dict[str, Any]:
    """FIRST's jobs listing of one cluster for the caller; 404 for a cluster that does not exist or that the
    caller may not use (as FIRST: no hint that a cluster they may not use exists)."""
    table = await routing.table()
    known = table.clusters.get(cluster)
    if known is None or not known.allows(principal):
        raise NotFound(f"There is no cluster named {cluster!r} on this gateway.", code=ErrorCode.CLUSTER_NOT_FOUND)
    return cluster_jobs(
        table=table, cluster=cluster, principal=principal, reading=status.jobs(cluster), status=status, now=time.time()
    )
