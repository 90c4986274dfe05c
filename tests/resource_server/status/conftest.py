"""What the status board's tests share: a clock they move, a fake vLLM they stop and start on one port, a cache
of their own (shared by the boards of one test, as Redis is by a gateway's workers), and boards built as the
composition root builds them."""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from django.core.cache.backends.locmem import LocMemCache

from fakes.model_server import FakeServerConfig
from fakes.scheduler.scenario import COMMANDS, COMMANDS_DIR, STATE_VARIABLE
from resource_server.auth.base import AuthKind, Principal
from resource_server.bootstrap import Runtime
from resource_server.dispatch.direct import DirectConfig
from resource_server.dispatch.globus_compute import ComputeEndpoints
from resource_server.dispatch.local import LocalExecutors
from resource_server.dispatch.registry import BackendPool
from resource_server.selectors.endpoints import AccessRule, EndpointRoute, RoutingTable
from resource_server.status.board import StatusBoard
from resource_server.status.scheduler import SchedulerFunction, SchedulerReader
from resource_server.status.shared import Shared
from tests.servers import fake_model_server_in_thread

OPEN = AccessRule(frozenset(), frozenset())
CALLER = Principal(1, "id-1", "ada@anl.gov", AuthKind.API_KEY)


class Clock:
    """Wall-clock time that moves only when the test says (from the real time, so stored dates make sense)."""

    def __init__(self) -> None:
        self.now = float(int(time.time()))

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store() -> LocMemCache:
    """A cache of this test's own: what Redis is to a gateway's workers, without other tests' records."""
    return LocMemCache(f"status-test-{uuid.uuid4()}", {})


@contextmanager
def fake_vllm(port: int, *models: str) -> Iterator[str]:
    """The fake vLLM in a thread of this process on `port` (it can come back on the same port); yields /v1."""
    with fake_model_server_in_thread(FakeServerConfig(models=models or ("demo-model",)), port=port) as base:
        yield f"{base}/v1"


def direct_route(
    endpoint_id: int,
    base_url: str,
    *,
    cluster: str = "polaris",
    model: str = "demo-model",
    maintenance: str | None = None,
    maintenance_ends: float | None = None,
    job_name: str = "",
    rule: AccessRule = OPEN,
) -> EndpointRoute:
    """A direct endpoint's route as the routing table holds it; `rule`: the endpoint's own access rule."""
    return EndpointRoute(
        id=endpoint_id,
        model=model,
        framework="vllm",
        cluster=cluster,
        backend="direct",
        config=DirectConfig(base_url=base_url, connect_timeout=2, read_timeout=2),
        created=0,
        maintenance_message=maintenance,
        rules=(OPEN, rule),
        preference=0,
        header=f"cluster={cluster}; endpoint={endpoint_id}; reason=",
        maintenance_ends=maintenance_ends,
        job_name=job_name,
    )


def fixed_table(*routes: EndpointRoute) -> Callable[[], Awaitable[RoutingTable]]:
    """A routing table of these routes, as the board reads it each round."""
    table = RoutingTable()
    for route in routes:
        table.by_model.setdefault(route.model, []).append(route)

    async def read() -> RoutingTable:
        return table

    return read


def build_board(
    runtime: Runtime,
    table: Callable[[], Awaitable[RoutingTable]],
    *,
    store: LocMemCache | Shared,
    clock: Clock,
    local_executors: LocalExecutors | None = None,
    compute_endpoints: ComputeEndpoints | None = None,
    function: Callable[[], SchedulerFunction] | None = None,
    backends: BackendPool | None = None,
    interval: float = 3600,
    timeout: float = 2.0,
) -> StatusBoard:
    """A board as bootstrap() builds one, over this test's table, cache and clock."""
    reader = SchedulerReader(
        compute_endpoints=compute_endpoints or runtime.compute_endpoints,
        local_executors=local_executors or LocalExecutors(),
        **({"function": function} if function is not None else {}),
    )
    return StatusBoard(
        backends=backends or runtime.backend_pool,
        table=table,
        scheduler=reader,
        interval=interval,
        timeout=timeout,
        drain_seconds=600,
        shared=store if isinstance(store, Shared) else Shared(store),
        clock=clock,
    )


def scheduler_commands(state_file: Path, directory: Path) -> Path:
    """A login node's commands directory: each fake scheduler command (fakes/scheduler) reading `state_file`.

    The scheduler function runs them from wherever it runs (a process pool started before this test, an endpoint
    engine's worker), whose environment does not name this test's scenario: each command here names it itself.
    """
    directory.mkdir(parents=True, exist_ok=True)
    for command in COMMANDS:
        script = directory / command
        script.write_text(f"#!/bin/sh\n{STATE_VARIABLE}='{state_file}' exec '{COMMANDS_DIR / command}' \"$@\"\n")
        script.chmod(0o755)
    return directory
