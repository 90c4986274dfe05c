"""A cluster's batch jobs, read by the `scheduler` compute function on its login node.

`Cluster.scheduler` (validated by `SchedulerConfig` when an admin saves it) says how: which scheduler, which
account's jobs, and where the function runs: a Globus Compute endpoint on the login node (`globus_compute`,
through the same SDK clients and executors as inference) or a local process pool (`local`: the demo and the
tests, with fake `qstat`/`squeue` commands). The function returns `status/jobs.py`'s `ClusterJobs` as a dict;
anything else is garbage.

`JobsPoller` polls each cluster at most once per `poll_seconds` across every worker and host: the worker that
takes the cluster's lock in the shared cache polls, and the result is kept there for the others and the admin.
A poll that fails, times out or returns garbage keeps the last good jobs (marked stale by their age); a login
endpoint that is offline makes the jobs unknown, never an empty list.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import re
import secrets
from collections.abc import Callable
from typing import Annotated, Any, Literal, Self
from uuid import UUID

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)

from resource_server.dispatch.compute import settled
from resource_server.dispatch.globus_compute import ComputeCredentials, ComputeEndpoints, MissingCredentials
from resource_server.dispatch.globus_compute import credentials_for as compute_credentials
from resource_server.dispatch.local import LocalExecutors
from resource_server.status.jobs import ClusterJobs
from resource_server.status.shared import JobsRecord, Shared, jobs_key, jobs_lock_key

logger = logging.getLogger(__name__)

# Worker processes of the local pool that runs the scheduler function (the demo's and the tests' clusters).
LOCAL_SCHEDULER_WORKERS = 2
# A poll's lock outlives its timeout by this much, so that a worker that died mid-poll frees it.
_LOCK_MARGIN_SECONDS = 30

AccountName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9._][A-Za-z0-9._-]{0,63}$")]
# An absolute directory (no `..`, checked below): where the login node's scheduler commands are.
CommandsDir = Annotated[str, StringConstraints(pattern=r"^/[A-Za-z0-9._/+-]*$", max_length=512)]


class SchedulerConfig(BaseModel):
    """`Cluster.scheduler`: how the gateway reads the cluster's batch jobs (an empty object: it does not)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["pbs", "slurm"] = Field(description="The batch scheduler: PBS (qstat) or Slurm (squeue, sacct).")
    backend: Literal["globus_compute", "local"] = Field(
        description="Where the scheduler function runs: the login node's Globus Compute endpoint, or a local "
        "process pool (demo, tests)."
    )
    endpoint_id: UUID | None = Field(default=None, description="globus_compute: the login node's endpoint.")
    function_id: UUID | None = Field(
        default=None, description="globus_compute: the `scheduler` function's id (`manage.py register_functions`)."
    )
    credentials: ComputeCredentials | None = Field(
        default=None, description="globus_compute: another service account; default GLOBUS_COMPUTE_CLIENT_ID."
    )
    user: AccountName = Field(description="The account whose jobs run the models (the gateway's service account).")
    commands_dir: CommandsDir | None = Field(
        default=None, description="Where qstat / squeue / sacct are on the login node; default: its PATH."
    )
    poll_seconds: float = Field(default=60.0, ge=5, le=86400, description="How often the jobs are read.")
    timeout_seconds: float = Field(default=30.0, gt=0, le=600, description="Longest wait for one reading.")
    finished_seconds: int = Field(
        default=3600, ge=0, le=7 * 86400, description="How far back finished jobs are listed (PBS -x, sacct)."
    )

    @field_validator("commands_dir")
    @classmethod
    def _no_parent_directory(cls, value: str | None) -> str | None:
        if value is not None and ".." in value.split("/"):
            raise ValueError("commands_dir must not go up a directory (`..`)")
        return value

    @model_validator(mode="after")
    def _backend_fields(self) -> Self:
        compute = (self.endpoint_id, self.function_id)
        if self.backend == "globus_compute" and None in compute:
            raise ValueError("a globus_compute scheduler needs endpoint_id and function_id")
        if self.backend == "local" and (compute != (None, None) or self.credentials is not None):
            raise ValueError("a local scheduler takes no endpoint_id, function_id or credentials")
        return self

    def task(self) -> dict[str, Any]:
        """The scheduler function's argument (`compute_functions/scheduler.py`)."""
        return {
            "scheduler": self.kind,
            "user": self.user,
            "commands_dir": self.commands_dir,
            "finished_seconds": self.finished_seconds,
            # A command that hangs (a scheduler server not answering) is killed on the node by then, rather
            # than hold a worker of the login endpoint after the gateway stopped waiting.
            "command_timeout": self.timeout_seconds,
        }


def scheduler_config(raw: object) -> SchedulerConfig | None:
    """A cluster's stored scheduler config, or None when it has none (an empty object). Raises ValidationError."""
    if raw in (None, {}):
        return None
    return SchedulerConfig.model_validate(raw)


class SchedulerReadError(Exception):
    """A reading failed; `unknown`: the cluster's jobs cannot be known now (its login endpoint is offline, or the
    config cannot work), so the last ones are not kept either."""

    def __init__(self, reason: str, *, unknown: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.unknown = unknown


SchedulerFunction = Callable[[dict[str, Any]], dict[str, Any]]


def installed_scheduler_function() -> SchedulerFunction:
    """`compute_functions.scheduler.scheduler_jobs`, looked up when first needed."""
    module = importlib.import_module("compute_functions.scheduler")
    function: SchedulerFunction = module.scheduler_jobs
    return function


def _failure(exc: BaseException) -> str:
    # A remote failure's text ends with the function's own exception; its first line is enough here.
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[-1][:200]}" if text else type(exc).__name__


class SchedulerReader:
    """Runs the scheduler function for one reading, through the machinery inference uses."""

    def __init__(
        self,
        *,
        compute_endpoints: ComputeEndpoints,
        local_executors: LocalExecutors,
        function: Callable[[], SchedulerFunction] = installed_scheduler_function,
    ) -> None:
        self._compute_endpoints = compute_endpoints
        self._local_executors = local_executors
        self._function = function
        self._local_function_id: str | None = None

    async def read(self, config: SchedulerConfig) -> ClusterJobs:
        """The cluster's jobs; raises SchedulerReadError naming what failed."""
        try:
            async with asyncio.timeout(config.timeout_seconds):
                result = await self._run(config)
        except TimeoutError:
            raise SchedulerReadError(f"no answer within {config.timeout_seconds:g} s") from None
        except SchedulerReadError:
            raise
        except Exception as exc:
            raise SchedulerReadError(f"the scheduler function failed ({_failure(exc)})") from None
        try:
            return ClusterJobs.model_validate(result)
        except ValidationError as exc:
            raise SchedulerReadError(
                f"the scheduler function returned something other than jobs ({exc.error_count()} problem(s), "
                f"first: {exc.errors()[0]['msg']})"
            ) from None

    async def _run(self, config: SchedulerConfig) -> object:
        if config.backend == "local":
            return await self._run_local(config)
        assert config.endpoint_id is not None and config.function_id is not None  # the config's validator
        endpoint_id = str(config.endpoint_id)
        try:
            credentials = compute_credentials(config.credentials)
        except MissingCredentials as exc:
            missing = f"the scheduler's service account is not configured: {exc}"
            raise SchedulerReadError(missing, unknown=True) from None
        status = await self._compute_endpoints.status(credentials, endpoint_id)
        if status.online is False:
            raise SchedulerReadError("the login node's Globus Compute endpoint is offline", unknown=True)
        future = await self._compute_endpoints.submit(credentials, endpoint_id, str(config.function_id), config.task())
        return await settled(future)

    async def _run_local(self, config: SchedulerConfig) -> object:
        executor = self._local_executors.get(LOCAL_SCHEDULER_WORKERS)
        if self._local_function_id is None:
            try:
                function = self._function()
            except ImportError as exc:
                raise SchedulerReadError(f"the scheduler function is not installed ({exc})", unknown=True) from None
            self._local_function_id = await asyncio.to_thread(executor.register_function, function)
        # Submitting may start a worker process, which waits on the fork server: keep it off the loop.
        future = await asyncio.to_thread(
            executor.submit_to_registered_function, self._local_function_id, (config.task(),)
        )
        return await settled(future)


class JobsPoller:
    """Each cluster's jobs, polled at most once per `poll_seconds` across workers (see the module doc)."""

    def __init__(self, *, reader: SchedulerReader, shared: Shared, clock: Callable[[], float]) -> None:
        self._reader = reader
        self._shared = shared
        self._clock = clock
        self._local: dict[str, JobsRecord] = {}  # the last record seen: what is known while the cache is not

    def record(self, cluster: str) -> JobsRecord | None:
        """The cluster's jobs as last seen by this worker (its own poll, or another's read from the cache)."""
        return self._local.get(cluster)

    async def adopt(self, cluster: str) -> None:
        """Take the cluster's jobs as other workers last read them, without polling (a worker that just started)."""
        await asyncio.to_thread(self._read_shared, cluster)

    def forget(self, keep: set[str]) -> None:
        for cluster in set(self._local) - keep:
            del self._local[cluster]

    async def poll(self, cluster: str, config: SchedulerConfig) -> JobsRecord | None:
        """The cluster's jobs: read now if a poll is due and no other worker is at it, else as last read."""
        now = self._clock()
        record = await asyncio.to_thread(self._read_shared, cluster)
        if record is not None and now - record.attempted_at < config.poll_seconds:
            return record
        lock = jobs_lock_key(cluster)
        held = await asyncio.to_thread(
            self._shared.add, lock, secrets.token_hex(8), config.timeout_seconds + _LOCK_MARGIN_SECONDS
        )
        if held is False:
            return record  # another worker is polling: its result will be in the cache
        try:
            if held:
                # Read again under the lock: a worker may have written a fresh reading and let go meanwhile.
                record = await asyncio.to_thread(self._read_shared, cluster)
                if record is not None and now - record.attempted_at < config.poll_seconds:
                    return record
            fresh = await self._attempt(cluster, config, record, now)
            self._local[cluster] = fresh
            await asyncio.to_thread(self._shared.set, jobs_key(cluster), fresh.as_dict())
            return fresh
        finally:
            if held:
                await asyncio.to_thread(self._shared.delete, lock)

    def _read_shared(self, cluster: str) -> JobsRecord | None:
        """The shared record (kept as this worker's), or this worker's own while the cache is unreachable."""
        record = JobsRecord.parse(self._shared.get(jobs_key(cluster)))
        if record is None:
            return self._local.get(cluster)
        known = self._local.get(cluster)
        if known is None or record.attempted_at >= known.attempted_at:
            self._local[cluster] = record
            return record
        return known

    async def _attempt(self, cluster: str, config: SchedulerConfig, last: JobsRecord | None, now: float) -> JobsRecord:
        try:
            jobs = await self._reader.read(config)
        except SchedulerReadError as exc:
            if last is None or _shape(last.error) != _shape(exc.reason):  # when it starts failing, or fails otherwise
                logger.warning("scheduler of cluster %s could not be read: %s", cluster, exc.reason)
            if exc.unknown or last is None:
                return JobsRecord(None, None, exc.reason, now)
            return JobsRecord(last.jobs, last.read_at, exc.reason, now)
        if last is not None and last.error is not None:
            logger.info("scheduler of cluster %s read again (%d jobs)", cluster, len(jobs.jobs))
        return JobsRecord(jobs, now, None, now)


def _shape(reason: str | None) -> str | None:
    """A failure's message without its numbers: a scheduler that prints the same garbage with another timestamp,
    or cut at another length, fails the same way (and is not logged again)."""
    return None if reason is None else re.sub(r"\d+", "#", reason)
