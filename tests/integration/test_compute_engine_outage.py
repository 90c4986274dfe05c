"""The endpoint's real engine losing its worker pool mid-run, through the `globus_compute` backend.

An outage test, so in the last tier: it kills the session engine's block, and Parsl may still route tasks to
the dead pool until it notices; no test that follows runs a compute task. Its model server is its own, since
the task on the killed pool may still reach it.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import orjson
import psutil
import pytest
from pydantic import SecretStr

from compute_functions import inference
from fakes.compute_service import RunningCompute
from resource_server.bootstrap import runtime
from resource_server.dispatch.base import UpstreamRequest
from resource_server.dispatch.globus_compute import (
    ComputeEndpoints,
    Credentials,
    GlobusComputeBackend,
    GlobusComputeConfig,
)
from resource_server.errors import GatewayError
from resource_server.routes import Route
from tests.conftest import COMPUTE_CLIENT_ID, COMPUTE_CLIENT_SECRET, MODEL_SERVER_ARGUMENTS
from tests.servers import fake_model_server

# The block is replaced within a minute here (LocalProvider, min_blocks 1); a generous bound.
RECOVERY_SECONDS = 240


@pytest.fixture
def model_server() -> Iterator[str]:
    with fake_model_server(*MODEL_SERVER_ARGUMENTS) as url:
        yield url


@pytest.fixture(autouse=True)
def service_account(settings: Any) -> None:
    settings.GATEWAY = settings.GATEWAY.model_copy(
        update={
            "GLOBUS_COMPUTE_CLIENT_ID": COMPUTE_CLIENT_ID,
            "GLOBUS_COMPUTE_CLIENT_SECRET": SecretStr(COMPUTE_CLIENT_SECRET),
        }
    )


def worker_pools(compute: RunningCompute) -> list[psutil.Process]:
    """The engine's worker pool processes (Parsl's process_worker_pool, one per block)."""
    pools = []
    for process in psutil.process_iter():
        try:
            command = " ".join(process.cmdline())
        except psutil.Error:
            continue
        if "process_worker_pool" in command and str(compute.run_dir) in command:
            pools.append(process)
    return pools


def chat(**body: object) -> UpstreamRequest:
    messages = [{"role": "user", "content": "Hello there"}]
    return UpstreamRequest(
        Route.CHAT, {"model": "demo-model", "messages": messages, "max_tokens": 8, **body}, uuid.uuid4().hex
    )


@pytest.fixture
def endpoints() -> Iterator[ComputeEndpoints]:
    fresh = ComputeEndpoints()
    yield fresh
    fresh.close()


async def test_a_killed_worker_pool_is_replaced_and_the_endpoint_serves_again(
    compute: RunningCompute, model_server: str, endpoints: ComputeEndpoints
) -> None:
    compute.wait_for_workers()
    function_id = endpoints.client(Credentials(COMPUTE_CLIENT_ID, COMPUTE_CLIENT_SECRET)).register_function(inference)
    url = urlsplit(model_server)
    config = {
        "endpoint_id": compute.service.add_endpoint(),
        "function_id": function_id,
        "vllm": {"host": url.hostname, "port": url.port, "read_timeout": 60},
        "task_timeout": 20,
    }
    backend = GlobusComputeBackend(
        GlobusComputeConfig.model_validate(config), relay_hub=runtime().relay_hub, endpoints=endpoints
    )
    assert orjson.loads(await backend.submit(chat()))["choices"]
    running = asyncio.create_task(backend.submit(chat(fake_vllm={"latency": 30})))
    deadline = time.monotonic() + 30
    while compute.service.engine.get_status_report().global_state["outstanding_tasks"] == 0:
        assert time.monotonic() < deadline, "the slow task never reached the workers"
        await asyncio.sleep(0.1)
    [pool] = worker_pools(compute)

    pool.kill()  # the node's worker pool dies with a task on it

    served = None
    deadline = time.monotonic() + RECOVERY_SECONDS
    while served is None and time.monotonic() < deadline:
        try:
            served = orjson.loads(await backend.submit(chat()))
        except GatewayError:
            await asyncio.sleep(1)  # lost on the dead pool (504) while the block is replaced
    assert served is not None and served["choices"], f"the endpoint did not serve within {RECOVERY_SECONDS} s"
    assert compute.service.engine.executor_exception is None
    assert [process.pid for process in worker_pools(compute)] != [pool.pid]
    with pytest.raises(GatewayError):
        await running  # its task went down with the pool
