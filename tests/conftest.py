from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from django.db import connection

from fakes.compute_service import RunningCompute, start_compute_service
from fakes.scheduler import COMMANDS_DIR, Scenario
from fakes.scheduler.scenario import STATE_VARIABLE
from resource_server.bootstrap import Runtime, bootstrap, runtime_install
from resource_server.limits.store_redis import KEY_PREFIX as LIMIT_KEY_PREFIX
from resource_server.models import ApiKey, Cluster, Endpoint, User
from resource_server.services.api_keys import api_key_create
from tests.servers import fake_model_server

# Tier markers (unit, slow, server, e2e, integration) for every test, and the guard that keeps unit tests in-process.
pytest_plugins = ("tests.selection",)

# Every test server is on loopback: a developer's proxy settings must not send the gateway (or the
# gateway processes the tests start, which inherit this environment) anywhere else.
for _variable in [name for name in os.environ if name.lower() in ("http_proxy", "https_proxy", "all_proxy")]:
    del os.environ[_variable]


def pytest_sessionstart(session: pytest.Session) -> None:
    """Forget the limit counters an earlier run left in the tests' Redis. They are named by database ids, and a
    fresh test database hands the same ids out again: this run's user 1 would find the last run's user 1's
    requests and tokens still counted (a second run within a minute, or a day for budgets, failed)."""
    url = os.environ.get("REDIS_URL")
    if not url:
        return
    import redis  # here: runs without REDIS_URL never load the client

    with redis.Redis.from_url(url) as client:
        stale = list(client.scan_iter(match=f"{LIMIT_KEY_PREFIX}*", count=1000))
        for start in range(0, len(stale), 1000):
            client.delete(*stale[start : start + 1000])


MODEL_SERVER_ARGUMENTS = ("--model=demo-model", "--model=org/model.v1", "--model=group-model", "--max-model-len=512")


@pytest.fixture(scope="session")
def model_server() -> Iterator[str]:
    """One fake vLLM server for the session (its behaviour is chosen per request)."""
    with fake_model_server(*MODEL_SERVER_ARGUMENTS) as url:
        yield url


# The Globus Compute service accounts the tests use: the gateway's, and a site's own (an Endpoint override).
COMPUTE_CLIENT_ID, COMPUTE_CLIENT_SECRET = "7d0b6f5e-2c1a-4b8e-9f3d-5a6c7e8f9a01", "gateway-compute-secret"
SITE_CLIENT_ID, SITE_CLIENT_SECRET = "c3e1a2b4-5d6f-4a7b-8c9d-0e1f2a3b4c5d", "site-compute-secret"


@pytest.fixture(scope="session")
def compute_service() -> Iterator[RunningCompute]:
    """Globus Compute for the session: the service and Globus Auth stood in, the endpoint's real engine
    behind them (one block of workers), results through the machine's RabbitMQ (`fakes.compute_service`)."""
    with start_compute_service(
        {COMPUTE_CLIENT_ID: COMPUTE_CLIENT_SECRET, SITE_CLIENT_ID: SITE_CLIENT_SECRET}
    ) as running:
        # An endpoint without workers is answered 503 `endpoint_starting` (its block is still starting): the
        # tests begin once the block's workers are up, as a live endpoint's would be.
        deadline = time.monotonic() + 120
        while running.service.engine.get_status_report().global_state["total_workers"] == 0:
            assert time.monotonic() < deadline, "the engine's block did not start within 120 s"
            time.sleep(0.1)
        yield running


@pytest.fixture
def compute(compute_service: RunningCompute, monkeypatch: pytest.MonkeyPatch) -> RunningCompute:
    """The session's Globus Compute, with the SDK pointed at it for this test."""
    for name, value in compute_service.environment.items():
        monkeypatch.setenv(name, value)
    return compute_service


@dataclass
class FakeScheduler:
    """The fake PBS and Slurm commands (fakes/scheduler) and the scenario file they read."""

    state_file: Path
    commands_dir: Path = COMMANDS_DIR

    def write(self, scenario: Scenario) -> Scenario:
        scenario.write(self.state_file)
        return scenario


@pytest.fixture
def fake_scheduler(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeScheduler:
    """A scenario file of this test's own, named in the environment the fake commands (run by the test or by
    the function under test) inherit."""
    state_file = tmp_path / "scheduler-state.json"
    monkeypatch.setenv(STATE_VARIABLE, str(state_file))
    return FakeScheduler(state_file)


@pytest.fixture(scope="session", autouse=True)
def _release_test_database(django_db_setup: None, django_db_blocker: Any) -> Iterator[None]:
    """Let pytest-django drop the test database: end other sessions (each test's usage writer has stopped)."""
    yield
    with django_db_blocker.unblock():
        if connection.vendor == "postgresql":
            with connection.cursor() as cursor:
                # Threads that ran async ORM calls keep their own connections open.
                cursor.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )


@pytest.fixture(autouse=True)
def runtime() -> Iterator[Runtime]:
    """A fresh runtime for every test, built by the composition root and installed as the process's
    (the doors, the Django test client and the relay server in this process use it)."""
    fresh = bootstrap()
    runtime_install(fresh)
    yield fresh
    fresh.usage_sink.flush(timeout=10)
    fresh.usage_sink.stop()
    fresh.compute_endpoints.close()
    runtime_install(None)


@dataclass
class Seeded:
    user: User
    api_key: ApiKey
    key: str
    cluster: Cluster
    endpoint: Endpoint

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}


def seed(model_url: str, *, username: str = "ada@anl.gov", wait_seconds: float = 5) -> Seeded:
    """A user with an API key, and a cluster whose endpoint is served by `model_url`. The endpoint waits at
    most `wait_seconds` to connect and between two bytes of an answer: briefly, so that a test whose model
    server stopped answering fails fast."""
    user = User.objects.create(identity_id=f"id-{username}", username=username, name="Ada")
    key_row, key = api_key_create(owner=user, name="test")
    cluster = Cluster.objects.create(name="polaris", description="test cluster")
    endpoint = Endpoint.objects.create(
        cluster=cluster,
        framework="vllm",
        model="demo-model",
        backend="direct",
        backend_config={"base_url": model_url, "read_timeout": wait_seconds, "connect_timeout": wait_seconds},
    )
    return Seeded(user=user, api_key=key_row, key=key, cluster=cluster, endpoint=endpoint)


@pytest.fixture
def seeded(transactional_db: None, model_server: str) -> Seeded:
    return seed(model_server)
