"""The state the fake scheduler commands read: a small JSON document, written with this module.

A scenario lists jobs and nodes in a neutral form; each fake command (`fakes/scheduler/qstat`, `squeue`, ...)
renders them in its scheduler's real JSON format, honouring the flags the real command honours. The file is
named by the environment variable FAKE_SCHEDULER_STATE and read on every call, so a test or the demo changes
what the "cluster" says by writing the file again (atomically: a command never reads half of it).

    {
      "server": "polaris-pbs-01.hsn.cm.polaris.alcf.anl.gov",  PBS job ids end with it; Slurm's cluster name
      "submit_host": "polaris-login-01",                          PBS Job_Owner is user@submit_host
      "slurm_data_parser": "v0.0.41",       the JSON shape Slurm prints: v0.0.39 (23.02), v0.0.40 (23.11), v0.0.41
      "jobs": [
        {"id": "4101", "name": "vllm-llama", "user": "svc-gateway", "queue": "demand",
         "state": "queued",        queued | held | waiting (for a begin time) | running | exiting | finished | suspended
         "submitted_at": 1790000000.0, "queued_at": null, "started_at": null, "ended_at": null,
         "estimated_start_at": null,   the scheduler's estimate for a queued job (waiting: its begin time)
         "walltime_seconds": 3600, "nodes": 1, "hosts": [],
         "comment": null,          PBS's comment (a default per state when null)
         "reason": null,           Slurm's state_reason (a default per state when null)
         "exit_status": null, "priority": 1000 (Slurm; higher first),
         "array_indices": null,    e.g. "0-3": an array job; its tasks not listed in "tasks" are still queued
         "tasks": [{"index": 0, "state": "running", "started_at": ..., "ended_at": null, "hosts": [...],
                    "exit_status": null, "job_id": null (Slurm's own id of the task; default id + index + 1)}]}
      ],
      "nodes": [{"name": "x3001c0s13b0n0", "state": "free",   free | busy | down | offline | drain
                 "partitions": ["demand"]}],
      "faults": {"qstat": "down"},          down (the real error and exit status) | hang | garbage (not JSON)
      "samples": {"squeue": "/abs/path.json"}   a real-format file standing for that command's data instead of
                                                 the jobs above (see fakes/scheduler/commands.py)
    }
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

COMMANDS_DIR = Path(__file__).resolve().parent  # put first on PATH (the task's commands_dir) to use the fakes
COMMANDS = ("qstat", "qselect", "pbsnodes", "squeue", "sacct", "sinfo")
STATE_VARIABLE = "FAKE_SCHEDULER_STATE"

JOB_STATES = ("queued", "held", "waiting", "running", "exiting", "finished", "suspended")
NODE_STATES = ("free", "busy", "down", "offline", "drain")
FAULTS = ("down", "hang", "garbage")
DATA_PARSERS = ("v0.0.39", "v0.0.40", "v0.0.41")


@dataclass
class FakeTask:
    """One started task of an array job (a PBS subjob, a Slurm array task)."""

    index: int
    state: str = "running"
    started_at: float | None = None
    ended_at: float | None = None
    hosts: list[str] = field(default_factory=list)
    exit_status: int | None = None
    job_id: str | None = None


@dataclass
class FakeJob:
    id: str
    name: str
    user: str
    queue: str
    submitted_at: float
    state: str = "queued"
    queued_at: float | None = None
    started_at: float | None = None
    ended_at: float | None = None
    estimated_start_at: float | None = None
    walltime_seconds: int = 3600
    nodes: int = 1
    hosts: list[str] = field(default_factory=list)
    comment: str | None = None
    reason: str | None = None
    exit_status: int | None = None
    priority: int = 1000
    array_indices: str | None = None
    tasks: list[FakeTask] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.state not in JOB_STATES:
            raise ValueError(f"job {self.id}: state {self.state!r} is not one of {JOB_STATES}")
        if not self.id.isdigit():
            raise ValueError(f"job {self.id}: the id is the job's number (PBS adds the server, Slurm prints it)")
        for task in self.tasks:
            if task.state not in JOB_STATES:
                raise ValueError(f"job {self.id}[{task.index}]: state {task.state!r} is not one of {JOB_STATES}")

    def indices(self) -> list[int]:
        """The array's indices ("0-3", "1,4,7", "0-10:2")."""
        found: list[int] = []
        for part in (self.array_indices or "").split(","):
            span, _, step = part.partition(":")
            low, _, high = span.partition("-")
            found.extend(range(int(low), int(high or low) + 1, int(step or 1)))
        return found


def index_ranges(indices: list[int]) -> str:
    """Indices as both schedulers print them: "2-5,8" (PBS array_indices_remaining, Slurm array_task_string)."""
    spans: list[str] = []
    for index in sorted(indices):
        if spans and index == int(spans[-1].rpartition("-")[2]) + 1:
            spans[-1] = f"{spans[-1].partition('-')[0]}-{index}"
        else:
            spans.append(str(index))
    return ",".join(spans)


@dataclass
class FakeNode:
    name: str
    state: str = "free"
    partitions: list[str] = field(default_factory=lambda: ["batch"])

    def __post_init__(self) -> None:
        if self.state not in NODE_STATES:
            raise ValueError(f"node {self.name}: state {self.state!r} is not one of {NODE_STATES}")


@dataclass
class Scenario:
    server: str = "pbs-01.cluster.example.org"
    submit_host: str = "login-01.cluster.example.org"
    slurm_data_parser: str = "v0.0.41"
    jobs: list[FakeJob] = field(default_factory=list)
    nodes: list[FakeNode] = field(default_factory=list)
    faults: dict[str, str] = field(default_factory=dict)
    samples: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.slurm_data_parser not in DATA_PARSERS:
            raise ValueError(f"slurm_data_parser {self.slurm_data_parser!r} is not one of {DATA_PARSERS}")
        for command, fault in self.faults.items():
            if command not in COMMANDS or fault not in FAULTS:
                raise ValueError(f"fault {command}={fault!r}: commands {COMMANDS}, faults {FAULTS}")
        for command, path in self.samples.items():
            if command not in COMMANDS or not Path(path).is_absolute():
                raise ValueError(f"sample {command}={path!r}: commands {COMMANDS}, absolute paths")

    def job(self, job_id: str) -> FakeJob:
        for job in self.jobs:
            if job.id == job_id:
                return job
        raise KeyError(f"no job {job_id} in the scenario")

    def update(self, job_id: str, **changes: Any) -> FakeJob:
        """Change one job (e.g. state="running", started_at=..., hosts=[...]); checked like a new one."""
        index = self.jobs.index(self.job(job_id))
        self.jobs[index] = dataclasses.replace(self.jobs[index], **changes)
        return self.jobs[index]

    def start(self, job_id: str, hosts: list[str], at: float | None = None) -> FakeJob:
        """The scheduler starts a queued job on `hosts` (now, unless `at`)."""
        started = time.time() if at is None else at
        return self.update(job_id, state="running", started_at=started, estimated_start_at=None, hosts=hosts)

    def finish(self, job_id: str, exit_status: int = 0, at: float | None = None) -> FakeJob:
        """A job ends (now, unless `at`): it leaves the active listings for the finished ones."""
        return self.update(
            job_id, state="finished", ended_at=time.time() if at is None else at, exit_status=exit_status
        )

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Scenario:
        jobs = [
            FakeJob(**{**job, "tasks": [FakeTask(**task) for task in job.get("tasks", [])]})
            for job in data.get("jobs", [])
        ]
        nodes = [FakeNode(**node) for node in data.get("nodes", [])]
        return cls(**{**data, "jobs": jobs, "nodes": nodes})

    def write(self, path: Path) -> Path:
        """Write the scenario where the commands read it, all at once (a rename)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        with os.fdopen(descriptor, "w") as file:
            json.dump(self.to_json(), file, indent=2)
        os.replace(temporary, path)
        return path

    @classmethod
    def read(cls, path: Path) -> Scenario:
        return cls.from_json(json.loads(path.read_text()))


def environment(state_file: Path) -> dict[str, str]:
    """What a process needs in its environment for the fake commands to read `state_file`."""
    return {STATE_VARIABLE: str(state_file)}
