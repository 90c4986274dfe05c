"""FIRST's jobs listing: the cluster's model jobs in FIRST's buckets, only for models the caller may use."""

from __future__ import annotations

from typing import Any

from resource_server.auth.base import AuthKind, Principal
from resource_server.selectors.endpoints import AccessRule, EndpointRoute, RoutingTable
from resource_server.selectors.jobs import JobsReading, cluster_jobs
from resource_server.status.base import State
from resource_server.status.jobs import ClusterJobs, Job, JobState
from tests.resource_server.status.conftest import OPEN, direct_route
from tests.status import ScriptedStatus

GROUP_ONLY = AccessRule(frozenset({"group-a"}), frozenset())
NOW = 1_800_000_000.0


def _route(
    endpoint_id: int, model: str, job_name: str, rule: AccessRule = OPEN, cluster: str = "polaris"
) -> EndpointRoute:
    return direct_route(endpoint_id, "http://node:8000/v1", cluster=cluster, model=model, job_name=job_name, rule=rule)


def _job(job_id: str, name: str, state: JobState, **fields: Any) -> Job:
    code = {"queued": "Q", "held": "H", "running": "R", "exiting": "E", "finished": "F", "other": "S"}[state]
    return Job(id=job_id, name=name, user="svc", queue="prod", state=state, scheduler_state=code, **fields)


def _table(*routes: EndpointRoute) -> RoutingTable:
    table = RoutingTable()
    for route in routes:
        table.by_model.setdefault(route.model, []).append(route)
    return table


CALLER = Principal(1, "id-1", "ada@anl.gov", AuthKind.API_KEY)
MEMBER = Principal(2, "id-2", "bob@anl.gov", AuthKind.API_KEY, groups=frozenset({"group-a"}))
TABLE = _table(
    _route(1, "llama-70b", "gw-llama70b"),
    _route(2, "llama-8b", "gw-llama8b"),
    _route(3, "secret-model", "gw-secret", rule=GROUP_ONLY),
    _route(4, "other-cluster-model", "gw-llama70b", cluster="sophia"),
)
JOBS = ClusterJobs(
    scheduler="pbs",
    user="svc",
    collected_at=NOW,
    free_nodes=12,
    jobs=[
        _job("101.pbs", "gw-llama70b", JobState.RUNNING, started_at=NOW - 120, hosts=["x1", "x2"], nodes=2),
        _job("102.pbs", "gw-llama8b", JobState.QUEUED, queue_position=3, estimated_start_at=NOW + 600),
        _job("103.pbs", "gw-secret", JobState.HELD),
        _job("104.pbs", "gw-llama8b", JobState.FINISHED, exit_status=0),
        _job("105.pbs", "someone-elses-batch", JobState.RUNNING),
    ],
)


def _listing(principal: Principal, reading: JobsReading, states: dict[int, State] | None = None) -> dict[str, Any]:
    status = ScriptedStatus()
    for endpoint_id, state in (states or {}).items():
        status.set(endpoint_id, state)
    return cluster_jobs(table=TABLE, cluster="polaris", principal=principal, reading=reading, status=status, now=NOW)


def test_jobs_go_to_firsts_buckets_with_the_models_they_run() -> None:
    answer = _listing(CALLER, JobsReading(JOBS, read_at=NOW - 5), {1: State.STARTING})

    assert [job["Job ID"] for job in answer["running"]] == ["101.pbs"]
    running = answer["running"][0]
    assert running["Models"] == "llama-70b" and running["Cluster"] == "polaris" and running["Framework"] == "vllm"
    assert running["Model Status"] == "starting" and running["Host Name"] == "x1+x2" and running["Nodes Reserved"] == 2
    queued = answer["queued"][0]
    assert queued["Job ID"] == "102.pbs" and queued["Queue Position"] == 3 and queued["Model Status"] == "queued"
    assert queued["Estimated Start Time"] == "2027-01-15T08:10:00+00:00"
    assert [job["Job ID"] for job in answer["stopped"]] == ["104.pbs"]
    assert answer["others"] == [] and answer["private_batch_running"] == [] and answer["private_batch_queued"] == []
    assert answer["cluster_status"]["jobs"] == "known" and answer["cluster_status"]["free_nodes"] == 12


def test_a_running_job_whose_model_answers_is_running() -> None:
    answer = _listing(CALLER, JobsReading(JOBS, read_at=NOW), {1: State.LIVE})
    assert answer["running"][0]["Model Status"] == "running"


def test_jobs_of_models_the_caller_may_not_use_are_hidden_and_shown_to_members() -> None:
    hidden = _listing(CALLER, JobsReading(JOBS, read_at=NOW))
    assert "103.pbs" not in [job["Job ID"] for job in hidden["queued"]]
    shown = _listing(MEMBER, JobsReading(JOBS, read_at=NOW))
    assert "103.pbs" in [job["Job ID"] for job in shown["queued"]]


def test_a_job_that_runs_no_registered_model_is_not_listed() -> None:
    answer = _listing(MEMBER, JobsReading(JOBS, read_at=NOW))
    listed = [job["Job ID"] for bucket in ("running", "queued", "stopped", "others") for job in answer[bucket]]
    assert "105.pbs" not in listed


def test_a_failed_reading_keeps_the_last_jobs_marked_stale() -> None:
    answer = _listing(CALLER, JobsReading(JOBS, read_at=NOW - 300, error="the login endpoint is offline"))
    assert answer["cluster_status"]["jobs"] == "stale" and answer["cluster_status"]["stale_seconds"] == 300
    assert "login endpoint is offline" in answer["cluster_status"]["message"]
    assert [job["Job ID"] for job in answer["running"]] == ["101.pbs"]


def test_jobs_never_read_are_unknown_not_an_empty_cluster() -> None:
    answer = _listing(CALLER, JobsReading(None, error="timed out"))
    assert answer["cluster_status"]["jobs"] == "unknown" and answer["running"] == []
    unconfigured = _listing(CALLER, JobsReading(None, configured=False))
    assert unconfigured["cluster_status"]["jobs"] == "unknown"
    assert "not read" in unconfigured["cluster_status"]["message"]
