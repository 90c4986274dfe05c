"""A cluster's batch jobs, as the scheduler compute function (`compute_functions/scheduler.py`) returns them.

The function runs on the cluster's login node, reads the scheduler (PBS `qstat -f -F json`, Slurm
`squeue --json` / `sacct --json`) and returns the service account's jobs in this one shape, whatever the
scheduler; times are converted to epoch seconds there, in the cluster's own time zone. The gateway validates
what comes back with these models: a result that does not fit is garbage, and leaves the last known jobs.
"""

from __future__ import annotations

import enum

from pydantic import BaseModel, ConfigDict, Field


class JobState(enum.StrEnum):
    QUEUED = "queued"  # waiting for nodes (PBS Q, Slurm PENDING)
    HELD = "held"  # waiting for a hold to be released (PBS H, W; Slurm PENDING with a held reason)
    RUNNING = "running"  # PBS R, Slurm RUNNING
    EXITING = "exiting"  # ending: PBS E, Slurm COMPLETING
    FINISHED = "finished"  # done, whatever its outcome (PBS F, X; Slurm COMPLETED, FAILED, TIMEOUT...)
    OTHER = "other"  # suspended, moving, being routed...


class Job(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str  # as the scheduler names it: "123.polaris-pbs-01", "4567", "4567_3"
    name: str  # PBS Job_Name, Slurm name: matched against Endpoint.scheduler_job_name
    user: str
    queue: str  # PBS queue, Slurm partition
    state: JobState
    scheduler_state: str  # the scheduler's own code or word: "Q", "PENDING"
    array_parent: str | None = None  # the array job's id, for a subjob ("123[].polaris-pbs-01", "4567")
    array_index: int | None = None
    submitted_at: float | None = None  # epoch seconds
    started_at: float | None = None
    # The scheduler's estimate for a queued job (PBS estimated.start_time, a pending Slurm job's start_time);
    # for a held one waiting for its begin time (PBS W, Slurm BeginTime), that time.
    estimated_start_at: float | None = None
    walltime_seconds: int | None = None  # requested
    ends_at: float | None = None  # started_at + walltime (or the scheduler's own end time); a finished job's end
    nodes: int | None = None
    hosts: list[str] = Field(default_factory=list)
    comment: str | None = None
    exit_status: int | None = None  # the scheduler's (PBS: 256 + signal when killed; Slurm: 128 + signal)
    queue_position: int | None = None  # 1-based among queued jobs of all users in the same queue


class ClusterJobs(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    scheduler: str  # "pbs" | "slurm"
    user: str  # whose jobs these are (the service account the login endpoint runs as)
    collected_at: float  # epoch seconds, on the cluster
    jobs: list[Job]
    free_nodes: int | None = None
    errors: list[str] = Field(default_factory=list)  # commands that failed: the result is partial
