"""The Redis relay hub against the real Redis: long waits, many waiting streams, and Redis going away.

Outages cut a TCP proxy between the hub and Redis (connections refused, open ones dropped); Redis itself is
never stopped.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest

from resource_server.adapters.relay import Delivery, RedisRelayHub, RelayMessage
from resource_server.errors import ServiceUnavailable
from tests.tcp_proxy import TcpProxy, proxy_to

REDIS_URL = os.environ.get("REDIS_URL", "")


def event(text: str) -> RelayMessage:
    return RelayMessage(0, events=(f"data: {text}\n\n".encode(),))


pytestmark = pytest.mark.skipif(not REDIS_URL, reason="needs REDIS_URL pointing at Redis")


async def _append_later(hub: RedisRelayHub, task_id: str, message: RelayMessage, delay: float) -> None:
    await asyncio.sleep(delay)
    assert await hub.append(task_id, message) is Delivery.ACCEPTED


async def test_a_read_waits_longer_than_redis_pys_default_socket_timeout() -> None:
    # redis-py 8 gives up on any reply after 5 s unless told otherwise; a stream may wait 900 s for its first chunk.
    hub = RedisRelayHub(REDIS_URL, max_pending=10)
    channel = await hub.open(lifetime=60)
    try:
        late = asyncio.create_task(_append_later(hub, channel.task_id, event("late"), 6.5))
        assert await channel.read(30) == [event("late")]
        await late
    finally:
        await channel.close()
        await hub.aclose()


async def test_a_long_read_is_made_of_short_blocking_reads_each_within_the_socket_timeout() -> None:
    # Socket timeout 0.2 + 0.3 s: one XREAD blocking for the whole wait would time out long before 1.5 s.
    hub = RedisRelayHub(REDIS_URL, max_pending=10, timeout=0.3, read_slice=0.2)
    channel = await hub.open(lifetime=60)
    try:
        late = asyncio.create_task(_append_later(hub, channel.task_id, event("after several slices"), 1.5))
        assert await channel.read(30) == [event("after several slices")]
        await late
        assert await channel.read(1.0) == []  # a wait with nothing to read still ends at its own limit
    finally:
        await channel.close()
        await hub.aclose()


async def test_more_streams_than_redis_pys_default_pool_can_wait_at_once() -> None:
    # Each waiting stream holds a connection in XREAD; redis-py's default pool refuses a 101st.
    hub = RedisRelayHub(REDIS_URL, max_pending=10)
    channels = [await hub.open(lifetime=60) for _ in range(150)]
    try:
        readers = [asyncio.create_task(channel.read(20)) for channel in channels]
        await asyncio.sleep(0.5)  # every reader is now blocked in Redis
        assert not any(reader.done() for reader in readers)
        for channel in channels:
            assert await hub.append(channel.task_id, event(channel.task_id)) is Delivery.ACCEPTED
        answers = await asyncio.gather(*readers)
        assert answers == [[event(channel.task_id)] for channel in channels]
    finally:
        for channel in channels:
            await channel.close()
        await hub.aclose()


@pytest.fixture
def proxy() -> Iterator[TcpProxy]:
    with proxy_to(REDIS_URL, 6379) as tcp:
        yield tcp


async def test_a_redis_outage_fails_reads_and_opens_closing_stays_quiet_and_the_hub_recovers(
    proxy: TcpProxy,
) -> None:
    url = urlsplit(REDIS_URL)._replace(netloc=f"127.0.0.1:{proxy.port}").geturl()
    hub = RedisRelayHub(url, max_pending=10, timeout=1.0)
    channel = await hub.open(lifetime=60)
    reader = asyncio.create_task(channel.read(30))
    await asyncio.sleep(0.2)  # blocked in Redis

    proxy.cut()
    with pytest.raises(ServiceUnavailable) as failed:
        await asyncio.wait_for(reader, 10)
    assert failed.value.code == "relay_unavailable"
    await channel.close()  # runs as the failed stream ends: it must not raise over the stream's own error
    with pytest.raises(ServiceUnavailable):
        await hub.open(lifetime=60)

    proxy.restore()
    # The same hub reconnects: no restart, no new client.
    again = await hub.open(lifetime=60)
    assert await hub.append(again.task_id, event("back")) is Delivery.ACCEPTED
    assert await again.read(5) == [event("back")]
    await again.close()
    assert not await hub.authorized(again.task_id, again.token)
    await hub.aclose()
