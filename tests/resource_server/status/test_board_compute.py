"""The status board over Globus Compute: the endpoint's status as its health (workers, outstanding tasks), a
status service that cannot answer (the last reading holds, stale), and the cluster's jobs read by a function on
the login node's endpoint, which, offline, leaves them unknown. Globus Compute's service is stood in before the
real endpoint engine (`fakes.compute_service`); its workers run the `scheduler` function over the fake Slurm
commands (`fakes/scheduler`)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from django.core.cache.backends.locmem import LocMemCache
from pydantic import SecretStr

from compute_functions.scheduler import scheduler_jobs
from fakes.compute_service import RunningCompute
from fakes.scheduler import FakeJob, Scenario
from resource_server.bootstrap import Runtime
from resource_server.dispatch.globus_compute import ComputeEndpoints, Credentials, GlobusComputeConfig
from resource_server.dispatch.local import LocalExecutors
from resource_server.dispatch.registry import BackendParts, BackendPool
from resource_server.selectors.endpoints import ClusterRoute, EndpointRoute, RoutingTable
from resource_server.status.base import State
from resource_server.status.board import StatusBoard
from resource_server.status.jobs import JobState
from resource_server.status.scheduler import SchedulerConfig
from tests.conftest import COMPUTE_CLIENT_ID, COMPUTE_CLIENT_SECRET, FakeScheduler
from tests.resource_server.status.conftest import OPEN, Clock, build_board, scheduler_commands

GATEWAY = Credentials(COMPUTE_CLIENT_ID, COMPUTE_CLIENT_SECRET)


@pytest.fixture
def compute_settings(settings: Any, compute: RunningCompute) -> Any:
    """The gateway's service account, and endpoint statuses fetched afresh at every round."""
    settings.GATEWAY = settings.GATEWAY.model_copy(
        update={
            "GLOBUS_COMPUTE_CLIENT_ID": COMPUTE_CLIENT_ID,
            "GLOBUS_COMPUTE_CLIENT_SECRET": SecretStr(COMPUTE_CLIENT_SECRET),
            "GLOBUS_COMPUTE_STATUS_CACHE_SECONDS": 0,
        }
    )
    return settings


@pytest.fixture
def endpoints(compute_settings: Any) -> Iterator[ComputeEndpoints]:
    fresh = ComputeEndpoints()
    yield fresh
    fresh.close()  # stop its executors without waiting for any task


def _table(*, endpoint: EndpointRoute | None = None, scheduler: SchedulerConfig | None = None) -> Any:
    table = RoutingTable()
    if endpoint is not None:
        table.by_model[endpoint.model] = [endpoint]
    table.clusters["polaris"] = ClusterRoute("polaris", None, OPEN, scheduler=scheduler)

    async def read() -> RoutingTable:
        return table

    return read


def _route(endpoint_id: str, *, job_name: str = "") -> EndpointRoute:
    config = GlobusComputeConfig.model_validate(
        {"endpoint_id": endpoint_id, "function_id": str(uuid.uuid4()), "vllm": {"port": 8000}}
    )
    return EndpointRoute(
        id=5,
        model="demo-model",
        framework="vllm",
        cluster="polaris",
        backend="globus_compute",
        config=config,
        created=0,
        maintenance_message=None,
        rules=(OPEN, OPEN),
        preference=0,
        header="cluster=polaris; endpoint=5; reason=",
        job_name=job_name,
    )


def _board(runtime: Runtime, table: Any, endpoints: ComputeEndpoints, clock: Clock) -> StatusBoard:
    """A board whose backends and scheduler readings use this test's Globus Compute clients."""
    parts = BackendParts(relay_hub=runtime.relay_hub, compute_endpoints=endpoints, local_executors=LocalExecutors())
    return build_board(
        runtime,
        table,
        store=LocMemCache(f"compute-{uuid.uuid4()}", {}),
        clock=clock,
        compute_endpoints=endpoints,
        backends=BackendPool(parts),
        timeout=60,  # a round waits for the scheduler's reading: a task through the engine, three commands
    )


async def test_an_endpoint_with_workers_is_live_and_a_status_service_that_fails_leaves_it_live_but_stale(
    runtime: Runtime, compute: RunningCompute, endpoints: ComputeEndpoints, clock: Clock
) -> None:
    endpoint_id = compute.service.add_endpoint()
    board = _board(runtime, _table(endpoint=_route(endpoint_id)), endpoints, clock)

    await board.probe()
    status = board.status(5)
    assert (status.state, status.stale_seconds) == (State.LIVE, None)
    assert "workers" in status.detail

    served = compute.service.endpoints.pop(endpoint_id)  # the service no longer knows it: status 404
    clock.advance(45)
    await board.probe()
    status = board.status(5)
    assert (status.state, status.stale_seconds) == (State.LIVE, 45), "the last reading holds, marked stale"

    served.online = False
    compute.service.endpoints[endpoint_id] = served
    clock.advance(30)
    await board.probe()
    status = board.status(5)
    assert (status.state, status.stale_seconds, status.detail) == (State.OFFLINE, None, "offline")


async def test_jobs_are_read_through_the_login_nodes_endpoint_and_are_unknown_while_it_is_offline(
    runtime: Runtime,
    compute: RunningCompute,
    endpoints: ComputeEndpoints,
    clock: Clock,
    fake_scheduler: FakeScheduler,
) -> None:
    login = compute.service.add_endpoint()
    function_id = endpoints.client(GATEWAY).register_function(scheduler_jobs)
    fake_scheduler.write(
        Scenario(
            jobs=[
                FakeJob("88", "vllm-other", "alice", "gpu", clock.now - 900, priority=5000),
                FakeJob("89", "gw-demo", "svc", "gpu", clock.now - 600, estimated_start_at=clock.now + 600),
            ]
        )
    )
    commands = scheduler_commands(fake_scheduler.state_file, fake_scheduler.state_file.parent / "slurm-bin")
    config = SchedulerConfig.model_validate(
        {
            "kind": "slurm",
            "backend": "globus_compute",
            "endpoint_id": login,
            "function_id": function_id,
            "user": "svc",
            "commands_dir": str(commands),
            "timeout_seconds": 60,
        }
    )
    board = _board(runtime, _table(scheduler=config), endpoints, clock)

    await board.probe()
    reading = board.jobs("polaris")
    assert reading.error is None and reading.jobs is not None
    assert [(job.id, job.state, job.queue_position) for job in reading.jobs.jobs] == [("89", JobState.QUEUED, 2)]

    compute.service.endpoints[login].online = False
    clock.advance(61)
    await board.probe()
    reading = board.jobs("polaris")
    assert (reading.jobs, reading.configured) == (None, True), "unknown, not an empty list"
    assert reading.error == "the login node's Globus Compute endpoint is offline"
