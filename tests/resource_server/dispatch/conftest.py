"""Fixtures for the compute backends: a relay the compute functions can reach, the gateway's account, and its
Globus Compute clients and function over the session's service and engine."""

from __future__ import annotations

import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import uvicorn
from pydantic import SecretStr

from compute_functions import inference
from fakes.compute_service import RunningCompute
from gateway.asgi import application
from resource_server.adapters.relay import RedisRelayHub
from resource_server.bootstrap import Runtime
from resource_server.dispatch.globus_compute import ComputeEndpoints, Credentials
from tests.conftest import COMPUTE_CLIENT_ID, COMPUTE_CLIENT_SECRET, MODEL_SERVER_ARGUMENTS
from tests.servers import fake_model_server, free_port


@pytest.fixture(scope="session")
def model_server() -> Iterator[str]:
    """A fake vLLM of these tests' own. A compute task outlives the request that stopped waiting for it (a
    timeout, a lost task) and still reaches its model server later: here, never the one other tests count on."""
    with fake_model_server(*MODEL_SERVER_ARGUMENTS) as url:
        yield url


@pytest.fixture(scope="module")
def relay_base() -> Iterator[str]:
    """The gateway's real ASGI app in this process (so it shares the in-process relay hub of the runtime each
    test installs), on a real port."""
    port = free_port()
    config = uvicorn.Config(application, host="127.0.0.1", port=port, lifespan="off", log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the relay server did not start"
        time.sleep(0.01)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture
def gateway_settings(settings: Any, relay_base: str) -> Any:
    """The gateway's service account and relay URL, as an admin would set them."""
    settings.GATEWAY = settings.GATEWAY.model_copy(
        update={
            "GLOBUS_COMPUTE_CLIENT_ID": COMPUTE_CLIENT_ID,
            "GLOBUS_COMPUTE_CLIENT_SECRET": SecretStr(COMPUTE_CLIENT_SECRET),
            "RELAY_PUBLIC_URL": relay_base,
        }
    )
    return settings


@pytest.fixture(autouse=True)
async def _close_relay_connections(runtime: Runtime) -> AsyncIterator[None]:
    yield
    if isinstance(runtime.relay_hub, RedisRelayHub):
        await runtime.relay_hub.aclose()


GATEWAY = Credentials(COMPUTE_CLIENT_ID, COMPUTE_CLIENT_SECRET)


@pytest.fixture
def endpoints(compute: RunningCompute) -> Iterator[ComputeEndpoints]:
    """Fresh SDK clients, executors and status caches for each test, over the session's service and engine."""
    fresh = ComputeEndpoints()
    yield fresh
    fresh.close()  # a task a test lost is never answered: stop waiting for it, or pytest could not exit


@pytest.fixture
def function_id(endpoints: ComputeEndpoints) -> str:
    return endpoints.client(GATEWAY).register_function(inference)
