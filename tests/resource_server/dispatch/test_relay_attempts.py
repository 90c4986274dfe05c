"""A streamed task that Globus Compute runs twice (its retry after a lost worker) never splices two answers.

The first run of the compute function is killed mid-stream, as a lost worker is; the same task then runs again,
as the endpoint's `max_retries_on_system_failure` does. Both post to the gateway's real relay route.
"""

from __future__ import annotations

import asyncio
import multiprocessing
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest

from compute_functions import inference
from resource_server.adapters.relay import RelayMessage, relay_url
from resource_server.bootstrap import Runtime
from tests.servers import fake_model_server


@pytest.fixture(scope="module")
def paced_vllm() -> Iterator[str]:
    """A fake vLLM that streams 50 tokens a second, so a run can be killed while it streams."""
    with fake_model_server("--model", "demo-model", "--max-model-len", "2048", "--tokens-per-second", "50") as url:
        yield url


async def _read_until(channel: Any, enough: int) -> list[RelayMessage]:
    messages: list[RelayMessage] = []
    while len(messages) < enough:
        batch = await channel.read(30)
        assert batch, "the first run relayed nothing within 30 s"
        messages += batch
    return messages


async def test_a_retried_run_is_refused_once_the_first_run_has_streamed(
    paced_vllm: str, gateway_settings: Any, runtime: Runtime
) -> None:
    url = urlsplit(paced_vllm)
    channel = await runtime.relay_hub.open(lifetime=120)
    task = {
        "route": "chat/completions",
        "body": {"model": "demo-model", "messages": [{"role": "user", "content": "count"}], "max_tokens": 1000},
        "vllm": {"host": url.hostname, "port": url.port},
        "stream": {"relay_url": relay_url(channel.task_id), "token": channel.token, "max_coalesce_ms": 0},
    }
    first_run = multiprocessing.get_context("spawn").Process(target=inference, args=(task,))
    first_run.start()
    try:
        delivered = await _read_until(channel, 3)
    finally:
        first_run.kill()  # the worker is lost mid-stream
        await asyncio.to_thread(first_run.join, 30)

    retry = await asyncio.to_thread(inference, task)
    delivered += await channel.read(0)
    await channel.close()

    assert retry["outcome"] == "cancelled"  # its first POST was answered 403: it stopped vLLM and sent nothing
    assert retry["chunks"] == 0
    assert len({message.attempt for message in delivered}) == 1
    assert [message.seq for message in delivered] == list(range(len(delivered)))
    assert not any(message.done for message in delivered)  # the stream stays the first run's, cut short
