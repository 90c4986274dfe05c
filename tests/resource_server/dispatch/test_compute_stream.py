"""A compute stream hands the client every event the cluster relayed before an error, however the reads fall."""

from __future__ import annotations

import asyncio

import pytest

from resource_server.adapters.relay import InProcessRelayHub, RelayError, RelayMessage
from resource_server.dispatch.compute import ComputeStream
from resource_server.dispatch.local import LocalBackend, LocalConfig, LocalExecutors
from resource_server.errors import UpstreamError


def _event(n: int) -> RelayMessage:
    return RelayMessage(n, events=(f"data: token{n}\n\n".encode(),))


async def test_events_relayed_before_an_error_in_the_same_read_reach_the_client_before_it() -> None:
    """The function streamed three tokens, then vLLM failed, then the task ended: all of it before the gateway
    read the channel once (a busy worker). The three events are the client's, then the error, never a 502
    in their place."""
    hub = InProcessRelayHub(max_pending=16)
    channel = await hub.open(lifetime=30)
    for n in range(3):
        await hub.append(channel.task_id, _event(n))
    await hub.append(channel.task_id, RelayMessage(3, error=RelayError(502, "upstream_error", "vLLM failed")))
    finished: asyncio.Future[object] = asyncio.get_running_loop().create_future()
    finished.set_result({"status": "error"})
    backend = LocalBackend(LocalConfig.model_validate({"vllm": {"port": 9}}), relay_hub=hub, executors=LocalExecutors())
    stream = ComputeStream(channel, finished, backend, first_chunk=5, idle=5, lifetime=30)

    await stream.start()  # the first event is there: no error yet
    received = []
    with pytest.raises(UpstreamError):
        async for event in stream:
            received.append(event)
    await stream.aclose()

    assert received == [f"data: token{n}\n\n".encode() for n in range(3)]
