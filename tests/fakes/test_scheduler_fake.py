"""The fake PBS and Slurm commands (fakes/scheduler) against the real formats: what they print has the fields and
types of the samples written from PBS Pro's and Slurm's own output (tests/compute_functions/samples), and they
take, refuse and fail the way the real commands do."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from fakes.scheduler import FakeJob, FakeNode, FakeTask, Scenario
from tests.conftest import FakeScheduler

SAMPLES = Path(__file__).parents[1] / "compute_functions" / "samples"
SERVER = "polaris-pbs-01.hsn.cm.polaris.alcf.anl.gov"
NOW = float(int(time.time()))


def run(fake: FakeScheduler, *command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(fake.commands_dir / command[0]), *command[1:]], capture_output=True, text=True, timeout=30, check=False
    )


def printed(fake: FakeScheduler, *command: str) -> Any:
    done = run(fake, *command)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def shape(value: Any) -> Any:
    """What a consumer of the JSON relies on: the keys, and the JSON type of each value."""
    if isinstance(value, dict):
        return {key: shape(item) for key, item in value.items()}
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    return {list: "array", str: "string", type(None): "null"}[type(value)]


def sample(path: str) -> Any:
    return json.loads((SAMPLES / path).read_text())


def life(data_parser: str = "v0.0.41") -> Scenario:
    """A job in each state, an array, and nodes in each state."""
    return Scenario(
        server=SERVER,
        slurm_data_parser=data_parser,
        jobs=[
            FakeJob(id="1", name="q", user="svc", queue="small", submitted_at=NOW - 900, estimated_start_at=NOW + 60),
            FakeJob(id="2", name="h", user="svc", queue="small", submitted_at=NOW - 900, state="held"),
            FakeJob(
                id="3",
                name="r",
                user="svc",
                queue="debug",
                submitted_at=NOW - 900,
                state="running",
                started_at=NOW - 300,
                hosts=["x3005c0s13b0n0", "x3005c0s13b1n0"],
                nodes=2,
            ),
            FakeJob(
                id="4",
                name="f",
                user="svc",
                queue="debug",
                submitted_at=NOW - 900,
                state="finished",
                started_at=NOW - 800,
                ended_at=NOW - 100,
                hosts=["x3005c0s25b0n0"],
                exit_status=0,
            ),
            FakeJob(
                id="5",
                name="a",
                user="svc",
                queue="small",
                submitted_at=NOW - 900,
                array_indices="0-3",
                tasks=[
                    FakeTask(index=0, state="running", started_at=NOW - 60, hosts=["x3006c0s1b0n0"]),
                    FakeTask(
                        index=1, state="finished", started_at=NOW - 90, ended_at=NOW - 30, hosts=["x3006c0s1b1n0"]
                    ),
                ],
            ),
        ],
        nodes=[
            FakeNode("x3006c0s7b0n0", "free", ["small", "debug"]),
            FakeNode("x3005c0s13b0n0", "busy", ["debug"]),
            FakeNode("x3006c0s19b0n0", "down", ["debug"]),
            FakeNode("x3006c0s8b0n0", "drain", ["small"]),
        ],
    )


# --- PBS ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rendered", "real"),
    [("1", "6102"), ("3", "6105"), ("5[]", "6108[]"), ("5[0]", "6108[0]"), ("5[1]", "6108[1]"), ("4", "6107")],
)
def test_qstat_prints_a_job_in_each_state_with_the_attributes_of_pbs_pro(
    fake_scheduler: FakeScheduler, rendered: str, real: str
) -> None:
    fake_scheduler.write(life())
    jobs = printed(fake_scheduler, "qstat", "-x", "-f", "-t", "-F", "json")["Jobs"]
    real_job = sample("pbs/qstat-x-f-t.json")["Jobs"][f"{real}.{SERVER}"]
    fake_job = jobs[f"{rendered}.{SERVER}"]

    # The same attributes (the sample's site adds custom resources to Resource_List: compared by the standard ones).
    assert fake_job.keys() == real_job.keys()
    for name in fake_job.keys() - {"Resource_List", "Variable_List", "resources_used"}:
        assert shape(fake_job[name]) == shape(real_job[name]), name
    standard = ("ncpus", "nodect", "place", "select", "walltime")
    assert [shape(fake_job["Resource_List"][key]) for key in standard] == [
        shape(real_job["Resource_List"][key]) for key in standard
    ]


def test_qstat_and_pbsnodes_print_the_prologue_and_shape_of_pbs_pro(fake_scheduler: FakeScheduler) -> None:
    fake_scheduler.write(life())

    listing = printed(fake_scheduler, "qstat", "-f", "-t", "-F", "json")
    nodes = printed(fake_scheduler, "pbsnodes", "-a", "-F", "json")

    real_nodes = sample("pbs/pbsnodes-a.json")
    assert list(listing)[:3] == list(nodes)[:3] == ["timestamp", "pbs_version", "pbs_server"]
    assert list(nodes) == list(real_nodes)
    fake_node, real_node = nodes["nodes"]["x3006c0s7b0n0"], real_nodes["nodes"]["x3006c0s7b0n0"]
    # resources_available holds the site's custom resources too: compared by the standard ones.
    assert shape({**fake_node, "resources_available": None}) == shape({**real_node, "resources_available": None})
    standard = ("arch", "host", "mem", "ncpus", "vnode")
    assert [shape(fake_node["resources_available"][key]) for key in standard] == [
        shape(real_node["resources_available"][key]) for key in standard
    ]
    assert {name: node["state"] for name, node in nodes["nodes"].items()} == {
        "x3006c0s7b0n0": "free",
        "x3005c0s13b0n0": "job-exclusive",
        "x3006c0s19b0n0": "down",
        "x3006c0s8b0n0": "offline",
    }


def test_qstat_shows_history_only_with_x_and_started_subjobs_only_with_t(fake_scheduler: FakeScheduler) -> None:
    fake_scheduler.write(life())

    def listed(*options: str) -> list[str]:
        return [job_id.split(".")[0] for job_id in printed(fake_scheduler, "qstat", *options, "-F", "json")["Jobs"]]

    assert listed("-f") == ["1", "2", "3", "5[]"]
    assert listed("-f", "-t") == ["1", "2", "3", "5[]", "5[0]", "5[1]"]  # never the queued subjobs 5[2], 5[3]
    assert listed("-f", "-x") == ["1", "2", "3", "4", "5[]"]


def test_qstat_with_no_job_leaves_jobs_out_as_pbs_does(fake_scheduler: FakeScheduler) -> None:
    fake_scheduler.write(Scenario(server=SERVER))

    assert list(printed(fake_scheduler, "qstat", "-f", "-F", "json")) == ["timestamp", "pbs_version", "pbs_server"]


def test_qstat_refuses_an_alternate_format_option_with_json_as_qstat_does(fake_scheduler: FakeScheduler) -> None:
    fake_scheduler.write(life())

    done = run(fake_scheduler, "qstat", "-x", "-f", "-F", "json", "-u", "svc")

    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr.startswith("qstat: conflicting options.\nusage:")


def test_qstat_of_named_jobs_reports_unknown_and_finished_ones(fake_scheduler: FakeScheduler) -> None:
    fake_scheduler.write(life())

    history = run(fake_scheduler, "qstat", "-x", "-f", "-F", "json", f"4.{SERVER}", f"99.{SERVER}")
    current = run(fake_scheduler, "qstat", "-f", "-F", "json", f"4.{SERVER}")

    assert history.returncode == 153  # PBSE_UNKJOBID: qstat prints what it found, and fails
    assert list(json.loads(history.stdout)["Jobs"]) == [f"4.{SERVER}"]
    assert history.stderr == f"qstat: Unknown Job Id 99.{SERVER}\n"
    assert current.returncode == 35
    assert "Job has finished, use -x or -H to obtain historical job information" in current.stderr


def test_qselect_selects_by_owner_state_and_modification_time(fake_scheduler: FakeScheduler) -> None:
    scenario = life()
    scenario.jobs.append(
        FakeJob(
            id="6",
            name="old",
            user="svc",
            queue="debug",
            submitted_at=NOW - 90000,
            state="finished",
            started_at=NOW - 89000,
            ended_at=NOW - 86400,
            hosts=["x1"],
        )
    )
    scenario.jobs.append(
        FakeJob(id="7", name="theirs", user="other", queue="debug", submitted_at=NOW, state="finished")
    )
    fake_scheduler.write(scenario)
    an_hour_ago = time.strftime("%Y%m%d%H%M.%S", time.localtime(NOW - 3600))

    def selected(*options: str) -> list[str]:
        done = run(fake_scheduler, "qselect", *options)
        assert done.returncode == 0, done.stderr
        return [job_id.split(".")[0] for job_id in done.stdout.split()]

    assert selected("-x", "-s", "F", "-u", "svc", "-t", f"m.gt.{an_hour_ago}") == ["4"]
    assert selected("-x", "-s", "F", "-u", "svc") == ["4", "6"]
    assert selected("-s", "F", "-u", "svc") == []  # finished jobs only with -x
    assert selected("-u", "svc") == ["1", "2", "3", "5[]"]


# --- Slurm ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data_parser", "real_pending", "real_running"),
    [("v0.0.41", 81002, 81005), ("v0.0.40", 7201, 7202), ("v0.0.39", 5501, 5503)],
)
def test_squeue_prints_jobs_with_the_fields_of_its_data_parser(
    fake_scheduler: FakeScheduler, data_parser: str, real_pending: int, real_running: int
) -> None:
    fake_scheduler.write(life(data_parser))
    output = printed(fake_scheduler, "squeue", "--json")
    real = sample(f"slurm/squeue-{data_parser}.json")
    jobs = {job["job_id"]: job for job in output["jobs"]}
    real_jobs = {job["job_id"]: job for job in real["jobs"]}

    assert list(output) == list(real)
    assert shape(output["meta"]) == shape(real["meta"])
    assert shape(jobs[1]) == shape(real_jobs[real_pending])
    assert shape(jobs[3]) == shape(real_jobs[real_running])


@pytest.mark.parametrize(("data_parser", "finished_too"), [("v0.0.39", True), ("v0.0.40", True), ("v0.0.41", False)])
def test_squeue_json_filters_ended_jobs_from_24_05_on(
    fake_scheduler: FakeScheduler, data_parser: str, finished_too: bool
) -> None:
    fake_scheduler.write(life(data_parser))

    job_ids = [job["job_id"] for job in printed(fake_scheduler, "squeue", "--json")["jobs"]]

    # The array's pending tasks under its own id 5; its started tasks under their own ids (6, 7).
    assert job_ids == [1, 2, 3, 4, 5, 6, 7] if finished_too else [1, 2, 3, 5, 6]


@pytest.mark.parametrize(("data_parser", "real"), [("v0.0.41", 80990), ("v0.0.39", 5490)])
def test_sacct_prints_jobs_with_the_fields_of_its_data_parser(
    fake_scheduler: FakeScheduler, data_parser: str, real: int
) -> None:
    fake_scheduler.write(life(data_parser))
    output = printed(fake_scheduler, "sacct", "--json", "--user", "svc", "--starttime", "now-3600seconds")
    recorded = sample(f"slurm/sacct-{data_parser}.json")
    real_job = next(job for job in recorded["jobs"] if job["job_id"] == real)
    fake_job = next(job for job in output["jobs"] if job["job_id"] == 4)

    assert list(output) == list(recorded)
    assert shape(fake_job) == shape(real_job)


def test_sacct_selects_by_user_and_start_time(fake_scheduler: FakeScheduler) -> None:
    scenario = life()
    scenario.jobs.append(
        FakeJob(
            id="8",
            name="yesterday",
            user="svc",
            queue="debug",
            submitted_at=NOW - 90000,
            state="finished",
            started_at=NOW - 89000,
            ended_at=NOW - 86400,
        )
    )
    scenario.jobs.append(FakeJob(id="9", name="theirs", user="other", queue="debug", submitted_at=NOW - 60))
    fake_scheduler.write(scenario)

    def accounted(*options: str) -> list[int]:
        return [job["job_id"] for job in printed(fake_scheduler, "sacct", "--json", *options)["jobs"]]

    assert accounted("--user", "svc", "--starttime", "now-3600seconds") == [1, 2, 3, 4, 6, 7, 5]
    assert 8 in accounted("--user", "svc", "--starttime", "now-2days")
    assert 9 in accounted("--starttime", "now-3600")  # every user's (an operator's view)
    assert run(fake_scheduler, "sacct", "--json", "--starttime", "yesterday-ish").returncode == 1


def test_sinfo_prints_partitions_and_node_states_as_sinfo_groups_them(fake_scheduler: FakeScheduler) -> None:
    fake_scheduler.write(life())
    output = printed(fake_scheduler, "sinfo", "--json")
    real = sample("slurm/sinfo-v0.0.41.json")

    assert list(output) == list(real)
    assert shape(output["sinfo"][0]) == shape(real["sinfo"][0])
    assert [(row["partition"]["name"], row["node"]["state"], row["nodes"]["nodes"]) for row in output["sinfo"]] == [
        ("small", ["IDLE"], ["x3006c0s7b0n0"]),
        ("small", ["IDLE", "DRAIN"], ["x3006c0s8b0n0"]),
        ("debug", ["IDLE"], ["x3006c0s7b0n0"]),
        ("debug", ["ALLOCATED"], ["x3005c0s13b0n0"]),
        ("debug", ["DOWN", "NOT_RESPONDING"], ["x3006c0s19b0n0"]),
    ]


# --- faults, and what they do not implement -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "status", "message"),
    [
        (("qstat", "-f", "-F", "json"), 255, f"qstat: cannot connect to server {SERVER} (errno=15010)"),
        (("qselect", "-x"), 162, f"qselect: cannot connect to server {SERVER} (errno=15010)"),
        (("pbsnodes", "-a", "-F", "json"), 1, f"pbsnodes: cannot connect to server {SERVER}, error=15010"),
        (("squeue", "--json"), 1, "slurm_load_jobs error: Unable to contact slurm controller (connect failure)"),
        (("sacct", "--json"), 1, "sacct: error: Problem talking to the database: Connection refused"),
        (("sinfo", "--json"), 1, "slurm_load_partitions: Unable to contact slurm controller (connect failure)"),
    ],
)
def test_a_command_that_is_down_fails_as_the_real_one(
    fake_scheduler: FakeScheduler, command: tuple[str, ...], status: int, message: str
) -> None:
    fake_scheduler.write(Scenario(server=SERVER, faults={command[0]: "down"}))

    done = run(fake_scheduler, *command)

    assert (done.returncode, done.stdout, done.stderr) == (status, "", message + "\n")


def test_garbage_is_json_cut_short(fake_scheduler: FakeScheduler) -> None:
    scenario = life()
    scenario.faults = {"squeue": "garbage"}
    fake_scheduler.write(scenario)

    cut = run(fake_scheduler, "squeue", "--json")

    assert cut.returncode == 0
    assert cut.stdout.startswith('{\n  "jobs": [\n    {\n      "account": ')
    with pytest.raises(json.JSONDecodeError):
        json.loads(cut.stdout)


def test_options_the_fake_does_not_implement_are_refused_not_ignored(fake_scheduler: FakeScheduler) -> None:
    fake_scheduler.write(life())

    for command in (("squeue", "--json", "--states=all"), ("sinfo", "-N"), ("qstat",), ("pbsnodes", "-a")):
        done = run(fake_scheduler, *command)
        assert done.returncode == 2, command
        assert "not implemented" in done.stderr or "only" in done.stderr


def test_without_a_scenario_the_commands_say_what_to_set(fake_scheduler: FakeScheduler) -> None:
    done = subprocess.run(
        [str(fake_scheduler.commands_dir / "squeue"), "--json"], capture_output=True, text=True, env={}, timeout=30
    )

    assert done.returncode == 1
    assert "FAKE_SCHEDULER_STATE" in done.stderr


def test_a_scenario_is_checked_when_written() -> None:
    with pytest.raises(ValueError, match="state 'starting' is not one of"):
        FakeJob(id="1", name="x", user="u", queue="q", submitted_at=NOW, state="starting")
    with pytest.raises(ValueError, match="fault qstat='slow'"):
        Scenario(faults={"qstat": "slow"})
    with pytest.raises(ValueError, match=r"slurm_data_parser 'v0\.0\.42'"):
        Scenario(slurm_data_parser="v0.0.42")


def test_a_scenario_survives_its_file(tmp_path: Path) -> None:
    scenario = life()

    assert Scenario.read(scenario.write(tmp_path / "state.json")) == scenario
