"""The status board's sharing on Redis for real: two workers' boards on one Redis make each change once and agree
on since; the endpoint's lock is Redis' own SET NX (whole seconds), taken and released every round."""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Iterator

import pytest
import redis
from django.core.cache.backends.redis import RedisCache

from resource_server.bootstrap import Runtime
from resource_server.status.base import State
from resource_server.status.shared import Shared, endpoint_lock_key
from tests.resource_server.status.conftest import (
    Clock,
    build_board,
    direct_route,
    fake_vllm,
    fixed_table,
)
from tests.servers import free_port

pytestmark = pytest.mark.skipif(not os.environ.get("REDIS_URL"), reason="needs REDIS_URL pointing at Redis")


@pytest.fixture
def on_redis() -> Iterator[Shared]:
    """The Redis of REDIS_URL under a prefix of this test's own, emptied after it."""
    prefix = f"status-test-{uuid.uuid4()}"
    yield Shared(RedisCache(os.environ["REDIS_URL"], {"KEY_PREFIX": prefix}))
    client = redis.Redis.from_url(os.environ["REDIS_URL"])
    for key in client.scan_iter(match=f"{prefix}:*"):
        client.delete(key)


async def test_two_workers_on_one_redis_log_each_change_once_and_agree_on_since(
    runtime: Runtime, on_redis: Shared, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="resource_server.status.board")
    clock = Clock()
    port = free_port()
    table = fixed_table(direct_route(9, f"http://127.0.0.1:{port}/v1"))
    first, second = (build_board(runtime, table, store=on_redis, clock=clock) for _ in range(2))

    with fake_vllm(port):
        await first.probe()
        clock.advance(10)
        await second.probe()
    clock.advance(20)
    await second.probe()
    await first.probe()

    assert [first.status(9).state, second.status(9).state] == [State.OFFLINE, State.OFFLINE]
    assert first.status(9).since == second.status(9).since == clock.now
    lines = [record.getMessage() for record in caplog.records if record.name == "resource_server.status.board"]
    assert [line.split(") is ")[1].split(" ")[0] for line in lines] == ["live", "offline"]
    assert on_redis.available
    assert on_redis.get(endpoint_lock_key(9)) is None, "every round lets go of the lock"
    assert on_redis.add(endpoint_lock_key(9), "held", 0.2) is True, "a sub-second lock is kept a whole second"
    assert on_redis.add(endpoint_lock_key(9), "again", 1) is False
