"""The status board's health source: backend health asked in the background, never on the request path, and the
route stage putting endpoints that do not answer after the others."""

from __future__ import annotations

import asyncio
import logging
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import AbstractContextManager

import orjson
import pytest
from django.core.cache.backends.locmem import LocMemCache

from gateway.asgi import http_application
from resource_server.auth.base import AuthKind, Principal
from resource_server.bootstrap import Runtime
from resource_server.models import Cluster, Endpoint
from resource_server.selectors.endpoints import endpoint_candidates
from resource_server.status.base import UNPROBED, State
from resource_server.status.board import StatusBoard
from tests.conftest import Seeded
from tests.gateway.test_asgi import CHAT, CHAT_PATH, call
from tests.resource_server.status.conftest import Clock, build_board
from tests.servers import free_port, running

pytestmark = pytest.mark.django_db(transaction=True)


def _model_server(port: int) -> AbstractContextManager[subprocess.Popen[bytes]]:
    """The fake vLLM server on a chosen port, so that it can come back where it was."""
    args = [sys.executable, "-m", "fakes.model_server", "--port", str(port), "--model=demo-model"]
    return running(args, f"http://127.0.0.1:{port}/health")


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts connections and never answers: a health check there hangs."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        yield listener.getsockname()[1]


async def _endpoint_before(base_url: str) -> Endpoint:
    """A second endpoint for demo-model, on a cluster that sorts before the seeded one (so it comes first)."""
    cluster = await Cluster.objects.acreate(name="aurora", description="first in the registry's order")
    return await Endpoint.objects.acreate(
        cluster=cluster,
        framework="vllm",
        model="demo-model",
        backend="direct",
        backend_config={"base_url": base_url, "read_timeout": 30},
    )


def _prober(runtime: Runtime, *, interval: float = 3600, timeout: float = 2.0) -> StatusBoard:
    """A board over the runtime's backend pool and routing table, as bootstrap() builds it (with a cache of its
    own: other tests' records of the same endpoint ids are not this test's)."""
    return build_board(
        runtime,
        runtime.routing.table,
        store=LocMemCache(f"health-{uuid.uuid4()}", {}),
        clock=Clock(),
        interval=interval,
        timeout=timeout,
    )


async def _candidates(runtime: Runtime, prober: StatusBoard, seeded: Seeded) -> list[int]:
    user = seeded.user
    principal = Principal(user.pk, user.identity_id, user.username, AuthKind.API_KEY)
    candidates = await endpoint_candidates(
        routing=runtime.routing, status=prober, in_flight=runtime.in_flight, principal=principal, model="demo-model"
    )
    return [route.id for route in candidates.routes]


async def test_a_server_that_stops_is_found_down_tried_last_and_logged_once(
    seeded: Seeded, runtime: Runtime, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="resource_server.status.board")
    port = free_port()
    first = await _endpoint_before(f"http://127.0.0.1:{port}/v1")
    prober = _prober(runtime)
    with _model_server(port):
        await prober.probe()
        assert prober.status(first.pk).state is State.LIVE
        assert await _candidates(runtime, prober, seeded) == [first.pk, seeded.endpoint.pk]
    first_seen = len(caplog.records)  # each endpoint seen live: one line each

    await prober.probe()
    await prober.probe()
    down = prober.status(first.pk)
    assert down.state is State.OFFLINE and down.detail and not down.serving
    assert prober.status(seeded.endpoint.pk).state is State.LIVE
    assert await _candidates(runtime, prober, seeded) == [seeded.endpoint.pk, first.pk]
    warnings = [record for record in caplog.records if record.levelno == logging.WARNING]
    assert [record.args[0] for record in warnings] == [first.pk]  # type: ignore[index]

    with _model_server(port):
        await prober.probe()
        assert prober.status(first.pk).state is State.LIVE
        assert await _candidates(runtime, prober, seeded) == [first.pk, seeded.endpoint.pk]
    ups = [record for record in caplog.records[first_seen:] if record.levelno == logging.INFO]
    assert [record.args[0] for record in ups] == [first.pk]  # type: ignore[index]


async def test_a_hanging_health_check_is_cut_by_its_timeout_and_never_holds_up_requests(
    seeded: Seeded, runtime: Runtime, silent_port: int
) -> None:
    hanging = await _endpoint_before(f"http://127.0.0.1:{silent_port}/v1")
    await Cluster.objects.filter(name="aurora").aupdate(allowed_groups=["nobody"])  # requests go to the seeded one
    prober = _prober(runtime, interval=0.05, timeout=0.5)
    prober.start()
    try:
        started = time.monotonic()
        answers = await asyncio.gather(
            *(call(http_application, CHAT_PATH, orjson.dumps(CHAT), headers=seeded.auth) for _ in range(3))
        )
        assert [answer.status for answer in answers] == [200, 200, 200]
        async with asyncio.timeout(10):
            while prober.status(hanging.pk) is UNPROBED:
                await prober.wait_for_change(1)
    finally:
        await prober.stop()
    state = prober.status(hanging.pk)
    assert state.state is State.OFFLINE
    assert "within 0.5 s" in state.detail
    assert time.monotonic() - started < 10


async def test_the_first_probe_is_one_interval_after_start_and_zero_turns_probing_off(
    seeded: Seeded, runtime: Runtime
) -> None:
    off = _prober(runtime, interval=0)
    off.start()
    await asyncio.sleep(0.2)
    assert off.status(seeded.endpoint.pk) is UNPROBED
    await off.stop()

    prober = _prober(runtime, interval=0.3)
    prober.start()
    try:
        assert prober.status(seeded.endpoint.pk) is UNPROBED, "no probe at start"
        async with asyncio.timeout(10):
            while prober.status(seeded.endpoint.pk) is UNPROBED:
                await prober.wait_for_change(1)
    finally:
        await prober.stop()
    assert prober.status(seeded.endpoint.pk).state is State.LIVE


async def test_one_candidate_stays_the_candidate_even_when_down(seeded: Seeded, runtime: Runtime) -> None:
    seeded.endpoint.backend_config = {"base_url": f"http://127.0.0.1:{free_port()}/v1"}
    await seeded.endpoint.asave()
    prober = _prober(runtime)
    await prober.probe()
    assert prober.status(seeded.endpoint.pk).state is State.OFFLINE
    assert await _candidates(runtime, prober, seeded) == [seeded.endpoint.pk]


async def test_a_probe_that_changes_a_state_wakes_the_requests_waiting_for_one(
    seeded: Seeded, runtime: Runtime
) -> None:
    prober = _prober(runtime)
    waiting = asyncio.ensure_future(prober.wait_for_change(60))
    await asyncio.sleep(0)
    await prober.probe()  # not probed yet -> live: a change
    async with asyncio.timeout(10):
        await waiting

    unchanged = asyncio.ensure_future(prober.wait_for_change(60))
    await asyncio.sleep(0)
    await prober.probe()  # live again: nothing changed
    assert not unchanged.done()
    unchanged.cancel()
    assert prober.status(seeded.endpoint.pk).state is State.LIVE

    await asyncio.wait_for(prober.wait_for_change(0.01), 10)  # with no change, it returns at its timeout
