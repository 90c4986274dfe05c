"""The cluster-side scheduler reader (compute_functions/scheduler.py) through the fake PBS and Slurm commands.

The samples under samples/ are PBS Pro 2022 and Slurm 23.02/23.11/24.05 JSON in the formats their commands print
(qstat.c and pbsnodes.c of OpenPBS, the data_parser plugins v0.0.39-v0.0.41 of Slurm); the fake commands print
them (filtering them the way the real commands filter) and the real function reads them, as it would on a login
node. Each result is validated with the gateway's own model of it (ClusterJobs).
"""

from __future__ import annotations

import json
import os
import pwd
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from globus_compute_sdk.serialize import ComputeSerializer

from compute_functions import CODE_STRATEGY, DATA_STRATEGY, scheduler_jobs
from fakes.scheduler import FakeJob, FakeNode, FakeTask, Scenario
from fakes.scheduler.scenario import COMMANDS, STATE_VARIABLE
from resource_server.status.jobs import ClusterJobs
from tests.conftest import FakeScheduler
from tests.servers import ROOT

SAMPLES = Path(__file__).parent / "samples"
SERVICE = "svc-inference"
SERVER = "polaris-pbs-01.hsn.cm.polaris.alcf.anl.gov"
LOGIN = "polaris-login-02.hsn.cm.polaris.alcf.anl.gov"
CLUSTER_ZONE = "America/Chicago"  # where the PBS sample was printed: its times are this zone's


@pytest.fixture
def cluster_time_zone() -> Iterator[None]:
    """This process in the cluster's time zone, as the endpoint on its login node would be."""
    before = os.environ.get("TZ")
    os.environ["TZ"] = CLUSTER_ZONE
    time.tzset()
    yield
    if before is None:
        del os.environ["TZ"]
    else:
        os.environ["TZ"] = before
    time.tzset()


def local(text: str) -> float:
    """A time as qstat prints it, read in the cluster's zone by a library that is not the one under test."""
    return datetime.strptime(text, "%a %b %d %H:%M:%S %Y").replace(tzinfo=ZoneInfo(CLUSTER_ZONE)).timestamp()


def window_since(epoch: float) -> int:
    """finished_seconds reaching back to `epoch` (the samples were printed on a fixed day)."""
    return int(time.time() - epoch)


def read(fake: FakeScheduler, scheduler: str, **task: Any) -> dict[str, Any]:
    """Run the function against the fake commands; the result must be what the gateway accepts."""
    result = scheduler_jobs({"scheduler": scheduler, "commands_dir": str(fake.commands_dir), **task})
    ClusterJobs.model_validate(result)
    return result


def job(**fields: Any) -> dict[str, Any]:
    """A Job of the result: every field, those not given empty."""
    empty: dict[str, Any] = {
        "array_parent": None,
        "array_index": None,
        "submitted_at": None,
        "started_at": None,
        "estimated_start_at": None,
        "walltime_seconds": None,
        "ends_at": None,
        "nodes": None,
        "hosts": [],
        "comment": None,
        "exit_status": None,
        "queue_position": None,
    }
    return {**empty, **fields}


def pbs_samples() -> Scenario:
    return Scenario(
        server=SERVER,
        samples={"qstat": str(SAMPLES / "pbs/qstat-x-f-t.json"), "pbsnodes": str(SAMPLES / "pbs/pbsnodes-a.json")},
    )


def slurm_samples(version: str) -> Scenario:
    samples = {"squeue": str(SAMPLES / f"slurm/squeue-{version}.json")}
    for command in ("sacct", "sinfo"):
        if (SAMPLES / f"slurm/{command}-{version}.json").exists():
            samples[command] = str(SAMPLES / f"slurm/{command}-{version}.json")
    return Scenario(samples=samples)


# --- PBS Pro: the samples -------------------------------------------------------------------------------------


def pbs(number: str, name: str, state: str, code: str, queue: str, submitted: str, **fields: Any) -> dict[str, Any]:
    return job(
        id=f"{number}.{SERVER}",
        name=name,
        user=SERVICE,
        queue=queue,
        state=state,
        scheduler_state=code,
        submitted_at=local(f"{submitted} 2026"),
        **fields,
    )


def pbs_expected() -> list[dict[str, Any]]:
    day = "Fri Nov 27"
    ran_at = "Job run at Fri Nov 27 at"
    return [
        pbs(
            "6102",
            "vllm-llama3-70b",
            "queued",
            "Q",
            "small",
            f"{day} 08:30:00",
            estimated_start_at=local(f"{day} 11:15:00 2026"),
            walltime_seconds=6 * 3600,
            nodes=1,
            comment="Not Running: Insufficient amount of resource: nodect (R: 1 A: 0 T: 560)",
            queue_position=2,
        ),
        pbs(
            "6104",
            "vllm-mistral-7b",
            "held",
            "H",
            "small",
            "Thu Nov 26 16:47:11",
            walltime_seconds=8 * 3600,
            nodes=1,
            comment="job held, too many failed attempts to run",
            exit_status=-3,
        ),
        pbs(
            "6105",
            "vllm-qwen2-72b",
            "running",
            "R",
            "debug",
            f"{day} 09:00:02",
            started_at=local(f"{day} 09:05:10 2026"),
            walltime_seconds=3600,
            ends_at=local(f"{day} 10:05:10 2026"),
            nodes=2,
            hosts=["x3005c0s13b0n0", "x3005c0s13b1n0"],
            comment=f"{ran_at} 09:05 on (x3005c0s13b0n0:ncpus=64)+(x3005c0s13b1n0:ncpus=64)",
        ),
        pbs(
            "6106",
            "vllm-gemma-27b",
            "exiting",
            "E",
            "debug",
            f"{day} 08:05:00",
            started_at=local(f"{day} 08:10:00 2026"),
            walltime_seconds=3600,
            ends_at=local(f"{day} 09:10:00 2026"),
            nodes=1,
            hosts=["x3005c0s19b0n0"],
            comment=f"{ran_at} 08:10 on (x3005c0s19b0n0:ncpus=64)",
            exit_status=271,  # PBS: 256 + the signal (15) that ended it
        ),
        pbs(
            "6108[]",
            "vllm-sweep",
            "running",
            "B",
            "small",
            f"{day} 09:10:00",
            started_at=local(f"{day} 09:20:00 2026"),
            walltime_seconds=4 * 3600,
            ends_at=local(f"{day} 13:20:00 2026"),
            nodes=1,
            comment=f"Job Array Began at {day} 09:20:00 2026",
        ),
        pbs(
            "6108[0]",
            "vllm-sweep",
            "running",
            "R",
            "small",
            f"{day} 09:10:00",
            array_parent=f"6108[].{SERVER}",
            array_index=0,
            started_at=local(f"{day} 09:20:00 2026"),
            walltime_seconds=4 * 3600,
            ends_at=local(f"{day} 13:20:00 2026"),
            nodes=1,
            hosts=["x3006c0s1b0n0"],
            comment=f"{ran_at} 09:20 on (x3006c0s1b0n0:ncpus=64)",
        ),
        pbs(
            "6108[1]",
            "vllm-sweep",
            "finished",
            "X",
            "small",
            f"{day} 09:10:00",
            array_parent=f"6108[].{SERVER}",
            array_index=1,
            started_at=local(f"{day} 09:20:00 2026"),
            walltime_seconds=4 * 3600,
            ends_at=local(f"{day} 09:40:00 2026"),
            nodes=1,
            hosts=["x3006c0s1b1n0"],
            comment=f"{ran_at} 09:20 on (x3006c0s1b1n0:ncpus=64) and finished",
            exit_status=0,
        ),
        pbs(
            "6109[]",
            "vllm-batch",
            "queued",
            "Q",
            "small",
            f"{day} 09:00:00",
            walltime_seconds=2 * 3600,
            nodes=1,
            comment="Not Running: Insufficient amount of resource: nodect (R: 1 A: 0 T: 560)",
            queue_position=4,
        ),
        pbs(
            "6111",
            "vllm-nightly",
            "held",
            "W",
            "small",
            f"{day} 07:30:00",
            estimated_start_at=local(f"{day} 22:00:00 2026"),
            walltime_seconds=6 * 3600,
            nodes=1,
        ),
        pbs(
            "6115",
            "vllm-preempted",
            "other",
            "S",
            "debug",
            f"{day} 08:20:00",
            started_at=local(f"{day} 08:25:00 2026"),
            walltime_seconds=3600,
            ends_at=local(f"{day} 09:25:00 2026"),
            nodes=1,
            hosts=["x3005c0s7b0n0"],
            comment=f"{ran_at} 08:25 on (x3005c0s7b0n0:ncpus=64)",
        ),
        # Finished: qselect -x -s F -u svc-inference -t m.gt.<window>, then qstat -x -f -F json on those.
        pbs(
            "6107",
            "vllm-phi-4",
            "finished",
            "F",
            "debug",
            f"{day} 06:55:00",
            started_at=local(f"{day} 07:00:00 2026"),
            walltime_seconds=3600,
            ends_at=local(f"{day} 08:00:12 2026"),
            nodes=1,
            hosts=["x3005c0s25b0n0"],
            comment=f"{ran_at} 07:00 on (x3005c0s25b0n0:ncpus=64) and finished",
            exit_status=0,
        ),
        pbs(
            "6114",
            "vllm-deleted",
            "finished",
            "F",
            "small",
            f"{day} 08:40:00",
            walltime_seconds=3600,
            ends_at=local(f"{day} 08:50:00 2026"),
            nodes=1,
            exit_status=-3,
            comment=f"Job deleted as result of a qdel by svc-inference@{LOGIN}",
        ),
    ]


@pytest.mark.usefixtures("cluster_time_zone")
def test_pbs_sample_every_job_of_the_account_with_every_field(fake_scheduler: FakeScheduler) -> None:
    fake_scheduler.write(pbs_samples())

    result = read(fake_scheduler, "pbs", user=SERVICE, finished_seconds=window_since(local("Fri Nov 27 07:30:00 2026")))

    assert result["jobs"] == pbs_expected()
    # The free nodes: "free" (one of them in a maintenance reservation's list, still free); not job-exclusive,
    # down, offline, "down,offline" nor resv-exclusive.
    assert (result["scheduler"], result["user"], result["free_nodes"], result["errors"]) == ("pbs", SERVICE, 2, [])
    assert result["collected_at"] == pytest.approx(time.time(), abs=60)


@pytest.mark.usefixtures("cluster_time_zone")
def test_pbs_positions_count_every_users_queued_jobs_estimated_starts_first(fake_scheduler: FakeScheduler) -> None:
    fake_scheduler.write(pbs_samples())

    positions = {
        user: {row["id"].split(".")[0]: row["queue_position"] for row in read(fake_scheduler, "pbs", user=user)["jobs"]}
        for user in ("alice", "bob", "dave", SERVICE)
    }

    # small: alice's (estimated 10:30) and ours (11:15) have estimates; bob's (queued 07:45) and our array
    # (09:00) follow by queue time. debug has dave's alone. Held, waiting and running jobs have none.
    assert positions["alice"] == {"6101": 1}
    assert positions["bob"] == {"6103": 3}
    assert positions["dave"] == {"6113": 1}
    assert {job: position for job, position in positions[SERVICE].items() if position} == {"6102": 2, "6109[]": 4}


@pytest.mark.usefixtures("cluster_time_zone")
def test_pbs_finished_jobs_are_those_of_the_window(fake_scheduler: FakeScheduler) -> None:
    fake_scheduler.write(pbs_samples())

    day_before = read(
        fake_scheduler, "pbs", user=SERVICE, finished_seconds=window_since(local("Thu Nov 26 12:00:00 2026"))
    )
    last_hour = read(fake_scheduler, "pbs", user=SERVICE, finished_seconds=3600)

    finished = [row["id"].split(".")[0] for row in day_before["jobs"] if row["state"] == "finished"]
    assert finished == ["6108[1]", "6107", "6112", "6114"]
    assert next(row for row in day_before["jobs"] if row["id"].startswith("6112."))["exit_status"] == 271
    assert [row for row in last_hour["jobs"] if row["state"] == "finished"] == []  # the sample is days old


# --- Slurm: the samples ---------------------------------------------------------------------------------------

T = 1795780800  # the Slurm samples' reference time (Fri Nov 27 2026 06:00 UTC)


def slurm(
    job_id: str, name: str, state: str, words: str, partition: str, submitted: float, **fields: Any
) -> dict[str, Any]:
    return job(
        id=job_id,
        name=name,
        user=SERVICE,
        queue=partition,
        state=state,
        scheduler_state=words,
        submitted_at=float(submitted),
        **fields,
    )


def slurm_v41_expected() -> list[dict[str, Any]]:
    return [
        slurm(
            "81002",
            "vllm-llama3-70b",
            "queued",
            "PENDING",
            "gpu",
            T + 600,
            estimated_start_at=T + 18000.0,
            walltime_seconds=6 * 3600,
            nodes=1,
            comment="Resources",
            queue_position=2,
        ),
        slurm(
            "81004",
            "vllm-mistral-7b",
            "held",
            "PENDING",
            "gpu",
            T + 300,
            walltime_seconds=8 * 3600,
            nodes=1,
            comment="JobHeldUser",
        ),
        slurm(
            "81005",
            "vllm-qwen2-72b",
            "running",
            "RUNNING",
            "debug",
            T + 3000,
            started_at=T + 3600.0,
            walltime_seconds=3600,
            ends_at=T + 7200.0,
            nodes=2,
            hosts=["sophia-gpu-03", "sophia-gpu-04"],
        ),
        slurm(
            "81006",
            "vllm-gemma-27b",
            "exiting",
            "COMPLETED,COMPLETING",
            "debug",
            T - 600,
            started_at=T - 300.0,
            walltime_seconds=3600,
            ends_at=T + 3300.0,
            nodes=1,
            hosts=["sophia-gpu-02"],
        ),
        slurm(  # the array's pending remainder
            "81010_[2-3]",
            "vllm-sweep",
            "queued",
            "PENDING",
            "gpu",
            T + 1800,
            array_parent="81010",
            walltime_seconds=4 * 3600,
            nodes=1,
            comment="Priority",
            queue_position=4,
        ),
        slurm(
            "81010_0",
            "vllm-sweep",
            "running",
            "RUNNING",
            "gpu",
            T + 1800,
            array_parent="81010",
            array_index=0,
            started_at=T + 2400.0,
            walltime_seconds=4 * 3600,
            ends_at=T + 2400.0 + 4 * 3600,
            nodes=1,
            hosts=["sophia-gpu-05"],
        ),
        slurm(
            "81010_1",
            "vllm-sweep",
            "finished",
            "COMPLETED",
            "gpu",
            T + 1800,
            array_parent="81010",
            array_index=1,
            started_at=T + 2400.0,
            walltime_seconds=4 * 3600,
            ends_at=T + 3000.0,
            nodes=1,
            hosts=["sophia-gpu-06"],
            exit_status=0,
        ),
        slurm(  # waiting for its --begin time: the begin time is when it may start
            "81008",
            "vllm-nightly",
            "held",
            "PENDING",
            "gpu",
            T - 3600,
            estimated_start_at=T + 57600.0,
            walltime_seconds=6 * 3600,
            nodes=1,
            comment="BeginTime",
        ),
        slurm(
            "81009",
            "vllm-after-qwen",
            "held",
            "PENDING",
            "gpu",
            T + 3700,
            walltime_seconds=3600,
            nodes=1,
            comment="Dependency",
        ),
        slurm(
            "81013",
            "vllm-suspended",
            "other",
            "SUSPENDED",
            "debug",
            T - 1200,
            started_at=T - 1000.0,
            walltime_seconds=3600,
            ends_at=T + 2600.0,
            nodes=1,
            hosts=["sophia-gpu-07"],
        ),
        slurm(
            "81014",
            "vllm-broken",
            "finished",
            "FAILED",
            "debug",
            T + 100,
            started_at=T + 200.0,
            walltime_seconds=3600,
            ends_at=T + 260.0,
            nodes=1,
            hosts=["sophia-gpu-08"],
            comment="NonZeroExitCode",
            exit_status=1,
        ),
        slurm(  # nodes booting for it: allocated, so running
            "81015",
            "vllm-booting",
            "running",
            "RUNNING,CONFIGURING",
            "debug",
            T + 3500,
            started_at=T + 3550.0,
            walltime_seconds=3600,
            ends_at=T + 7150.0,
            nodes=1,
            hosts=["sophia-gpu-09"],
        ),
        # From sacct, finished only (81005 running, 81006 and 81010_1 already listed by squeue, 80980 too old).
        slurm(
            "80990",
            "vllm-phi-4",
            "finished",
            "COMPLETED",
            "debug",
            T - 7200,
            started_at=T - 7100.0,
            walltime_seconds=3600,
            ends_at=T - 3500.0,
            nodes=1,
            hosts=["sophia-gpu-01"],
            exit_status=0,
        ),
        slurm(
            "80991",
            "vllm-gemma-2b",
            "finished",
            "FAILED",
            "debug",
            T - 5000,
            started_at=T - 4900.0,
            walltime_seconds=3600,
            ends_at=T - 4800.0,
            nodes=1,
            hosts=["sophia-gpu-02"],
            comment="NonZeroExitCode",
            exit_status=1,
        ),
        slurm(
            "80992",
            "vllm-timeout",
            "finished",
            "TIMEOUT",
            "debug",
            T - 9000,
            started_at=T - 8000.0,
            walltime_seconds=3600,
            ends_at=T - 4400.0,
            nodes=2,
            hosts=["sophia-gpu-05", "sophia-gpu-06"],
            exit_status=128 + 15,
        ),
        slurm(
            "80993",
            "vllm-cancelled",
            "finished",
            "CANCELLED",
            "gpu",
            T - 3000,
            walltime_seconds=3600,
            ends_at=T - 2000.0,
            nodes=1,
            exit_status=0,
        ),
    ]


def test_slurm_v0_0_41_sample_every_job_of_the_account_with_every_field(fake_scheduler: FakeScheduler) -> None:
    fake_scheduler.write(slurm_samples("v0.0.41"))

    result = read(fake_scheduler, "slurm", user=SERVICE, finished_seconds=window_since(T - 10000))

    assert result["jobs"] == slurm_v41_expected()
    # Idle: gpu-06 and gpu-07 (in both partitions, counted once); not gpu-08 (drained) nor gpu-10 (planned).
    assert (result["scheduler"], result["free_nodes"], result["errors"]) == ("slurm", 2, [])


def test_slurm_positions_by_priority_then_submit_time_among_every_user(fake_scheduler: FakeScheduler) -> None:
    fake_scheduler.write(slurm_samples("v0.0.41"))

    positions = {
        user: {row["id"]: row["queue_position"] for row in read(fake_scheduler, "slurm", user=user)["jobs"]}
        for user in ("alice", "bob", "carol")
    }

    # gpu: alice 5200 first; ours and bob's both 4100, ours submitted first; our array's remainder 3900 last.
    assert positions == {"alice": {"81001": 1}, "bob": {"81003": 3}, "carol": {"81007": None}}


def test_slurm_finished_jobs_are_those_of_the_window(fake_scheduler: FakeScheduler) -> None:
    fake_scheduler.write(slurm_samples("v0.0.41"))

    week = read(fake_scheduler, "slurm", user=SERVICE, finished_seconds=window_since(T - 700000))

    assert "80980" in [row["id"] for row in week["jobs"]]  # sacct's --starttime reaches it now
    assert [row for row in read(fake_scheduler, "slurm", user=SERVICE)["jobs"] if row["state"] == "finished"] == []


def test_slurm_v0_0_39_sample_plain_times_one_word_states_and_wait_statuses(fake_scheduler: FakeScheduler) -> None:
    fake_scheduler.write(slurm_samples("v0.0.39"))

    result = read(fake_scheduler, "slurm", user=SERVICE, finished_seconds=window_since(T - 5000))

    assert result["jobs"] == [
        slurm(
            "5501",
            "vllm-llama3-8b",
            "queued",
            "PENDING",
            "a100",
            T,
            estimated_start_at=T + 3600.0,
            walltime_seconds=3600,
            nodes=1,
            comment="Resources",
            queue_position=1,
        ),
        slurm(
            "5503",
            "vllm-qwen2-7b",
            "running",
            "RUNNING",
            "a100",
            T - 900,
            started_at=T - 800.0,
            walltime_seconds=3600,
            ends_at=T + 2800.0,
            nodes=2,
            hosts=["gpu01", "gpu02"],
        ),
        slurm(
            "5504",
            "vllm-done",
            "finished",
            "COMPLETED",
            "a100",
            T - 4000,
            started_at=T - 3900.0,
            walltime_seconds=3600,
            ends_at=T - 300.0,
            nodes=1,
            hosts=["gpu03"],
            exit_status=0,
        ),
        slurm(  # exit_code 256: the wait status of exit(1)
            "5505",
            "vllm-crashed",
            "finished",
            "FAILED",
            "a100",
            T - 2000,
            started_at=T - 1900.0,
            walltime_seconds=3600,
            ends_at=T - 1800.0,
            nodes=1,
            hosts=["gpu04"],
            comment="NonZeroExitCode",
            exit_status=1,
        ),
        slurm(
            "5506",
            "vllm-ending",
            "exiting",
            "COMPLETING",
            "a100",
            T - 4000,
            started_at=T - 3700.0,
            walltime_seconds=3600,
            ends_at=T - 100.0,
            nodes=1,
            hosts=["gpu05"],
        ),
        slurm(
            "5507",
            "vllm-held",
            "held",
            "PENDING",
            "a100",
            T - 100,
            walltime_seconds=3600,
            nodes=1,
            comment="JobHeldAdmin",
        ),
        slurm(  # exit_code 9: killed by SIGKILL
            "5508",
            "vllm-killed",
            "finished",
            "CANCELLED",
            "a100",
            T - 3000,
            started_at=T - 2900.0,
            walltime_seconds=3600,
            ends_at=T - 2000.0,
            nodes=1,
            hosts=["gpu06"],
            exit_status=137,
        ),
        slurm(
            "5490",
            "vllm-yesterday",
            "finished",
            "COMPLETED",
            "a100",
            T - 3600,
            started_at=T - 3500.0,
            walltime_seconds=3600,
            ends_at=T - 1500.0,
            nodes=1,
            hosts=["gpu07"],
            exit_status=0,
        ),
        slurm(
            "5491",
            "vllm-oom",
            "finished",
            "CANCELLED",
            "a100",
            T - 3000,
            started_at=T - 2950.0,
            walltime_seconds=3600,
            ends_at=T - 2500.0,
            nodes=1,
            hosts=["gpu08"],
            exit_status=137,
        ),
        slurm(  # 23.02's sacct prints SUCCESS 0 for every normal exit: for a failed job that is unknown
            "5492",
            "vllm-failed",
            "finished",
            "FAILED",
            "a100",
            T - 2800,
            started_at=T - 2700.0,
            walltime_seconds=3600,
            ends_at=T - 2600.0,
            nodes=1,
            hosts=["gpu08"],
        ),
    ]
    assert result["free_nodes"] == 0  # the scenario has no nodes: sinfo prints an empty list


def test_slurm_v0_0_40_sample(fake_scheduler: FakeScheduler) -> None:
    fake_scheduler.write(slurm_samples("v0.0.40"))

    result = read(fake_scheduler, "slurm", user=SERVICE, finished_seconds=0)

    assert result["jobs"] == [
        slurm(
            "7201",
            "vllm-llama3-8b",
            "queued",
            "PENDING",
            "gpu",
            T,
            estimated_start_at=T + 1800.0,
            walltime_seconds=3600,
            nodes=1,
            comment="Priority",
            queue_position=1,
        ),
        slurm(
            "7200_4",
            "vllm-sweep",
            "running",
            "RUNNING",
            "gpu",
            T - 100,
            array_parent="7200",
            array_index=4,
            started_at=T - 50.0,
            walltime_seconds=3600,
            ends_at=T + 3550.0,
            nodes=1,
            hosts=["sophia-gpu-01"],
        ),
    ]


def test_slurm_problems_inside_its_json_are_reported_with_the_jobs(
    fake_scheduler: FakeScheduler, tmp_path: Path
) -> None:
    printed = json.loads((SAMPLES / "slurm/squeue-v0.0.40.json").read_text())
    printed["errors"] = [
        {
            "description": "Unable to query federation",
            "error_number": 1801,
            "error": "Invalid cluster name",
            "source": "slurm_load_federation()",
        }
    ]
    (tmp_path / "squeue.json").write_text(json.dumps(printed))
    fake_scheduler.write(Scenario(samples={"squeue": str(tmp_path / "squeue.json")}))

    result = read(fake_scheduler, "slurm", user=SERVICE)

    assert [row["id"] for row in result["jobs"]] == ["7201", "7200_4"]
    assert result["errors"] == ["squeue: Unable to query federation"]


# --- a job's life, rendered by the fake in each format --------------------------------------------------------

FORMATS = [("pbs", "v0.0.41"), ("slurm", "v0.0.39"), ("slurm", "v0.0.40"), ("slurm", "v0.0.41")]


def rendered(scheduler: str, job_id: str) -> str:
    return f"{job_id}.{SERVER}" if scheduler == "pbs" else job_id


@pytest.mark.parametrize(("scheduler", "data_parser"), FORMATS)
def test_a_job_walks_from_queued_to_running_to_finished(
    fake_scheduler: FakeScheduler, scheduler: str, data_parser: str
) -> None:
    now = float(int(time.time()))
    scenario = Scenario(
        server=SERVER,
        slurm_data_parser=data_parser,
        jobs=[
            FakeJob(
                id="900",
                name="other",
                user="alice",
                queue="demand",
                submitted_at=now - 900,
                estimated_start_at=now + 300,
                priority=2000,
            ),
            FakeJob(
                id="901",
                name="vllm-llama",
                user=SERVICE,
                queue="demand",
                submitted_at=now - 600,
                estimated_start_at=now + 900,
                walltime_seconds=7200,
                nodes=2,
            ),
        ],
        nodes=[FakeNode("x1", "busy", ["demand"]), FakeNode("x2", "free", ["demand"])],
    )
    fake_scheduler.write(scenario)

    [queued] = read(fake_scheduler, scheduler, user=SERVICE)["jobs"]

    assert (queued["id"], queued["name"], queued["queue"]) == (rendered(scheduler, "901"), "vllm-llama", "demand")
    assert (queued["state"], queued["queue_position"], queued["estimated_start_at"]) == ("queued", 2, now + 900)
    assert (queued["submitted_at"], queued["walltime_seconds"], queued["nodes"]) == (now - 600, 7200, 2)
    assert (queued["started_at"], queued["hosts"], queued["ends_at"]) == (None, [], None)

    scenario.start("900", ["x1"], at=now - 10)
    scenario.start("901", ["x2", "x3"], at=now)
    fake_scheduler.write(scenario)
    result = read(fake_scheduler, scheduler, user=SERVICE)
    [running] = result["jobs"]

    assert (running["state"], running["queue_position"], running["estimated_start_at"]) == ("running", None, None)
    assert (running["started_at"], running["hosts"], running["ends_at"]) == (now, ["x2", "x3"], now + 7200)
    assert result["free_nodes"] == 1

    scenario.finish("901", exit_status=3, at=now + 60)
    fake_scheduler.write(scenario)
    [finished] = read(fake_scheduler, scheduler, user=SERVICE)["jobs"]

    assert (finished["state"], finished["exit_status"], finished["ends_at"]) == ("finished", 3, now + 60)
    assert (finished["started_at"], finished["hosts"]) == (now, ["x2", "x3"])


@pytest.mark.parametrize(("scheduler", "data_parser"), FORMATS)
def test_an_array_job_its_started_parts_and_its_pending_remainder(
    fake_scheduler: FakeScheduler, scheduler: str, data_parser: str
) -> None:
    now = float(int(time.time()))
    tasks = [
        FakeTask(index=0, state="running", started_at=now - 60, hosts=["x7"]),
        FakeTask(index=1, state="finished", started_at=now - 120, ended_at=now - 30, hosts=["x8"], exit_status=0),
    ]
    fake_scheduler.write(
        Scenario(
            server=SERVER,
            slurm_data_parser=data_parser,
            jobs=[
                FakeJob(
                    id="700",
                    name="sweep",
                    user=SERVICE,
                    queue="q",
                    submitted_at=now - 300,
                    array_indices="0-3",
                    tasks=tasks,
                )
            ],
        )
    )

    jobs = {row["id"]: row for row in read(fake_scheduler, scheduler, user=SERVICE)["jobs"]}

    if scheduler == "pbs":
        parent = f"700[].{SERVER}"
        assert set(jobs) == {parent, f"700[0].{SERVER}", f"700[1].{SERVER}"}
        assert (jobs[parent]["state"], jobs[parent]["scheduler_state"], jobs[parent]["array_parent"]) == (
            "running",
            "B",
            None,
        )
        running, finished = jobs[f"700[0].{SERVER}"], jobs[f"700[1].{SERVER}"]
    else:
        parent = "700"
        # squeue's record of the tasks not started yet; the others each have their own job id.
        assert set(jobs) == {"700_[2-3]", "700_0", "700_1"}
        remainder = jobs["700_[2-3]"]
        assert (remainder["state"], remainder["array_parent"], remainder["queue_position"]) == ("queued", "700", 1)
        running, finished = jobs["700_0"], jobs["700_1"]
    assert (running["state"], running["array_parent"], running["array_index"], running["hosts"]) == (
        "running",
        parent,
        0,
        ["x7"],
    )
    assert (finished["state"], finished["array_index"], finished["exit_status"]) == ("finished", 1, 0)


@pytest.mark.parametrize(("scheduler", "data_parser"), FORMATS)
def test_held_and_waiting_jobs_have_no_position(
    fake_scheduler: FakeScheduler, scheduler: str, data_parser: str
) -> None:
    now = float(int(time.time()))
    fake_scheduler.write(
        Scenario(
            server=SERVER,
            slurm_data_parser=data_parser,
            jobs=[
                FakeJob(id="1", name="held", user=SERVICE, queue="q", submitted_at=now - 50, state="held"),
                FakeJob(
                    id="2",
                    name="later",
                    user=SERVICE,
                    queue="q",
                    submitted_at=now - 40,
                    state="waiting",
                    estimated_start_at=now + 3600,
                ),
                FakeJob(id="3", name="next", user=SERVICE, queue="q", submitted_at=now - 30),
            ],
        )
    )

    jobs = {row["name"]: row for row in read(fake_scheduler, scheduler, user=SERVICE)["jobs"]}

    assert (jobs["held"]["state"], jobs["held"]["queue_position"]) == ("held", None)
    assert (jobs["later"]["state"], jobs["later"]["estimated_start_at"]) == ("held", now + 3600)
    assert (jobs["next"]["state"], jobs["next"]["queue_position"]) == ("queued", 1)


def test_without_a_user_it_reads_the_account_running_it(fake_scheduler: FakeScheduler) -> None:
    me = pwd.getpwuid(os.getuid()).pw_name
    now = time.time()
    fake_scheduler.write(
        Scenario(
            jobs=[
                FakeJob(id="5", name="mine", user=me, queue="q", submitted_at=now),
                FakeJob(id="6", name="theirs", user=f"not-{me}", queue="q", submitted_at=now),
            ]
        )
    )

    for scheduler in ("pbs", "slurm"):
        result = read(fake_scheduler, scheduler)
        assert (result["user"], [row["name"] for row in result["jobs"]]) == (me, ["mine"])


# --- faults ---------------------------------------------------------------------------------------------------

MAIN = {"pbs": "qstat", "slurm": "squeue"}
FINISHED = {"pbs": "qselect", "slurm": "sacct"}
NODES = {"pbs": "pbsnodes", "slurm": "sinfo"}


def one_queued_job(**scenario: Any) -> Scenario:
    return Scenario(
        server=SERVER,
        jobs=[FakeJob(id="42", name="vllm", user=SERVICE, queue="q", submitted_at=time.time())],
        nodes=[FakeNode("x1", "free", ["q"])],
        **scenario,
    )


@pytest.mark.parametrize(
    ("scheduler", "message"),
    [
        (
            "pbs",
            f"`qstat -f -t -F json` exited with status 255: qstat: cannot connect to server {SERVER} (errno=15010)",
        ),
        (
            "slurm",
            "`squeue --json` exited with status 1: slurm_load_jobs error: Unable to contact slurm controller "
            "(connect failure)",
        ),
    ],
)
def test_a_main_listing_that_fails_fails_the_task_with_the_commands_own_message(
    fake_scheduler: FakeScheduler, scheduler: str, message: str
) -> None:
    fake_scheduler.write(one_queued_job(faults={MAIN[scheduler]: "down"}))

    with pytest.raises(RuntimeError) as failure:
        read(fake_scheduler, scheduler, user=SERVICE)

    assert str(failure.value) == f"Cannot read the {scheduler} jobs: {message}"


@pytest.mark.parametrize("scheduler", ["pbs", "slurm"])
def test_a_main_listing_that_prints_garbage_fails_the_task(fake_scheduler: FakeScheduler, scheduler: str) -> None:
    fake_scheduler.write(one_queued_job(faults={MAIN[scheduler]: "garbage"}))

    with pytest.raises(
        RuntimeError, match=rf"Cannot read the {scheduler} jobs: `{MAIN[scheduler]} .*` printed invalid JSON"
    ):
        read(fake_scheduler, scheduler, user=SERVICE)


@pytest.mark.parametrize("scheduler", ["pbs", "slurm"])
def test_a_main_listing_that_does_not_answer_is_ended_and_fails_the_task(
    fake_scheduler: FakeScheduler, scheduler: str
) -> None:
    fake_scheduler.write(one_queued_job(faults={MAIN[scheduler]: "hang"}))

    with pytest.raises(RuntimeError, match=rf"`{MAIN[scheduler]} .*` did not answer within 1 s"):
        read(fake_scheduler, scheduler, user=SERVICE, command_timeout=1)


@pytest.mark.parametrize("scheduler", ["pbs", "slurm"])
def test_a_missing_main_command_fails_the_task_naming_where_it_looked(
    fake_scheduler: FakeScheduler, scheduler: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_scheduler.write(one_queued_job())
    partial = tmp_path / "bin"
    partial.mkdir()
    for command in COMMANDS:
        if command != MAIN[scheduler]:
            (partial / command).symlink_to(fake_scheduler.commands_dir / command)
    monkeypatch.setenv("PATH", "/usr/bin:/bin")

    with pytest.raises(RuntimeError, match=rf"`{MAIN[scheduler]}` was not found on PATH \({partial}:/usr/bin:/bin\)"):
        scheduler_jobs({"scheduler": scheduler, "user": SERVICE, "commands_dir": str(partial)})


@pytest.mark.parametrize(
    ("scheduler", "message"),
    [
        ("pbs", f"qselect -x -s F -u {SERVICE} -t m.gt.* exited with status 162: qselect: cannot connect to server"),
        ("slurm", "sacct --json --user svc-inference --starttime now-3600seconds` exited with status 1: sacct: error:"),
    ],
)
def test_finished_jobs_failing_leave_a_partial_result(
    fake_scheduler: FakeScheduler, scheduler: str, message: str
) -> None:
    fake_scheduler.write(one_queued_job(faults={FINISHED[scheduler]: "down"}))

    result = read(fake_scheduler, scheduler, user=SERVICE)

    assert [row["name"] for row in result["jobs"]] == ["vllm"]
    assert result["free_nodes"] == 1
    [error] = result["errors"]
    assert error.startswith("finished jobs unknown: `")
    assert all(part in error for part in message.split("*"))


@pytest.mark.parametrize("fault", ["down", "garbage", "hang"])
@pytest.mark.parametrize("scheduler", ["pbs", "slurm"])
def test_free_nodes_failing_leave_a_partial_result(fake_scheduler: FakeScheduler, scheduler: str, fault: str) -> None:
    fake_scheduler.write(one_queued_job(faults={NODES[scheduler]: fault}))

    result = read(fake_scheduler, scheduler, user=SERVICE, command_timeout=1)

    assert [row["name"] for row in result["jobs"]] == ["vllm"]
    assert result["free_nodes"] is None
    [error] = result["errors"]
    why = {"down": "exited with status 1: ", "garbage": "printed invalid JSON", "hang": "did not answer within 1 s"}
    assert error.startswith(f"free nodes unknown: `{NODES[scheduler]} ")
    assert why[fault] in error


@pytest.mark.parametrize(
    ("printed", "complaint"),
    [
        ({"jobs": {"81001": {}}}, "printed 'jobs' that is not a list"),
        ([], "printed JSON without 'jobs'"),
        ({"sinfo": []}, "printed JSON without 'jobs'"),
    ],
)
def test_a_main_listing_of_the_wrong_shape_fails_the_task(
    fake_scheduler: FakeScheduler, tmp_path: Path, printed: Any, complaint: str
) -> None:
    (tmp_path / "squeue.json").write_text(json.dumps(printed))
    fake_scheduler.write(Scenario(samples={"squeue": str(tmp_path / "squeue.json")}))

    with pytest.raises(RuntimeError, match=complaint):
        read(fake_scheduler, "slurm", user=SERVICE)


@pytest.mark.parametrize(
    ("task", "complaint"),
    [
        ({"scheduler": "lsf"}, "task.scheduler must be 'pbs' or 'slurm', not 'lsf'"),
        ({"scheduler": "pbs", "finished_seconds": -1}, "task.finished_seconds must be a whole number"),
        ({"scheduler": "pbs", "finished_seconds": "3600"}, "task.finished_seconds must be a whole number"),
        ({"scheduler": "pbs", "command_timeout": 0}, "task.command_timeout must be a number of seconds > 0"),
        ({"scheduler": "pbs", "commands_dir": "fakes/scheduler"}, "task.commands_dir must be an absolute path"),
        ({"scheduler": "pbs", "commands_dir": "/no/such/directory"}, "task.commands_dir must be an absolute path"),
        ({"scheduler": "pbs", "user": ""}, "task.user must be a user name"),
    ],
)
def test_an_invalid_task_is_refused_before_any_command_runs(task: dict[str, Any], complaint: str) -> None:
    with pytest.raises(ValueError, match=complaint):
        scheduler_jobs(task)


# --- on an endpoint -------------------------------------------------------------------------------------------

# Runs where our packages cannot be imported, like an endpoint worker: the payload must carry the code.
ENDPOINT_SCRIPT = """
import json, sys
sys.modules["compute_functions"] = None
from globus_compute_sdk.serialize import ComputeSerializer
payload = open(sys.argv[1]).read()
serializer = ComputeSerializer(allowed_deserializer_types=sys.argv[2:])
function, args, kwargs = serializer.unpack_and_deserialize(payload)
try:
    print(json.dumps({"result": function(*args, **kwargs)}))
except Exception as exc:
    print(json.dumps({"exception": type(exc).__name__, "message": str(exc)}))
"""


def run_on_endpoint(task: dict[str, Any], tmp_path: Path, state_file: Path) -> dict[str, Any]:
    serializer = ComputeSerializer(strategy_code=CODE_STRATEGY, strategy_data=DATA_STRATEGY)
    packed = serializer.pack_buffers(
        [serializer.serialize(scheduler_jobs), serializer.serialize((task,)), serializer.serialize({})]
    )
    (tmp_path / "payload").write_text(packed)
    process = subprocess.run(
        [sys.executable, "-c", ENDPOINT_SCRIPT, str(tmp_path / "payload"), CODE_STRATEGY, DATA_STRATEGY],
        cwd=tmp_path,  # not the repository, so `tests` and friends are not importable either
        env={"PATH": "/usr/bin:/bin", STATE_VARIABLE: str(state_file), "TZ": CLUSTER_ZONE},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert process.returncode == 0, process.stderr
    answer: dict[str, Any] = json.loads(process.stdout)
    return answer


def test_entry_point_survives_the_serializer_and_runs_without_our_packages(
    fake_scheduler: FakeScheduler, tmp_path: Path
) -> None:
    fake_scheduler.write(pbs_samples())
    task = {
        "scheduler": "pbs",
        "user": SERVICE,
        "commands_dir": str(fake_scheduler.commands_dir),
        "finished_seconds": window_since(local("Fri Nov 27 07:30:00 2026")),
    }

    answer = run_on_endpoint(task, tmp_path, fake_scheduler.state_file)

    # Its own process, in the cluster's zone: the same jobs, the same times.
    assert ClusterJobs.model_validate(answer["result"]).model_dump(mode="json")["jobs"] == pbs_expected()


def test_on_an_endpoint_a_failure_comes_back_as_a_builtin_exception(
    fake_scheduler: FakeScheduler, tmp_path: Path
) -> None:
    fake_scheduler.write(one_queued_job(faults={"squeue": "down"}))
    task = {"scheduler": "slurm", "user": SERVICE, "commands_dir": str(fake_scheduler.commands_dir)}

    answer = run_on_endpoint(task, tmp_path, fake_scheduler.state_file)

    assert answer["exception"] == "RuntimeError"
    assert "slurm_load_jobs error: Unable to contact slurm controller" in answer["message"]


# The local backend's pool (resource_server/dispatch/local.py), as the gateway runs it for the demo and tests.
LOCAL_POOL = """
import json, sys
from compute_functions import scheduler_jobs
from resource_server.dispatch.local import LocalComputeExecutor

executor = LocalComputeExecutor(1)
function_id = executor.register_function(scheduler_jobs)
for task in json.loads(sys.argv[1]):
    future = executor.submit_to_registered_function(function_id, (task,))
    try:
        print(json.dumps({"result": future.result(timeout=60)}), flush=True)
    except Exception as exc:
        print(json.dumps({"exception": type(exc).__name__, "message": str(exc)}), flush=True)
"""


def test_the_local_backends_pool_runs_it(fake_scheduler: FakeScheduler, tmp_path: Path) -> None:
    fake_scheduler.write(one_queued_job(faults={"sinfo": "down"}))
    tasks = [
        {"scheduler": "slurm", "user": SERVICE, "commands_dir": str(fake_scheduler.commands_dir)},
        {"scheduler": "lsf"},
    ]

    process = subprocess.run(
        [sys.executable, "-c", LOCAL_POOL, json.dumps(tasks)],
        cwd=ROOT,
        env={**os.environ, "DJANGO_SETTINGS_MODULE": "gateway.settings", "DATA_DIR": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert process.returncode == 0, process.stderr
    worked, refused = (json.loads(line) for line in process.stdout.splitlines())
    jobs = ClusterJobs.model_validate(worked["result"])
    assert [job.id for job in jobs.jobs] == ["42"]
    assert jobs.errors[0].startswith("free nodes unknown: `sinfo --json` exited with status 1")
    assert (refused["exception"], refused["message"]) == (
        "ValueError",
        "task.scheduler must be 'pbs' or 'slurm', not 'lsf'.",
    )
