"""The direct backend's HTTP/1.1 pool: connections are kept and reused, and a stale one is replaced."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import orjson
import pytest

from resource_server.dispatch.base import UpstreamRequest
from resource_server.dispatch.direct import DirectBackend, DirectConfig
from resource_server.dispatch.http1 import ConnectError, Pool, ReadTimeout
from resource_server.routes import Route

CHAT = orjson.dumps({"model": "demo-model", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3})


def chat_request(host: str, port: int) -> bytes:
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(CHAT)}\r\n\r\n"
    )
    return head.encode() + CHAT


def pool_for(host: str, port: int, *, read_timeout: float = 5.0) -> Pool:
    return Pool(host, port, tls=None, max_connections=4, connect_timeout=2.0, read_timeout=read_timeout)


async def test_sequential_requests_share_one_kept_alive_connection(model_server: str) -> None:
    url = urlsplit(model_server)
    assert url.hostname is not None and url.port is not None
    pool = pool_for(url.hostname, url.port)
    for _ in range(3):
        response = await pool.request(chat_request(url.hostname, url.port))
        assert response.status == 200
        assert orjson.loads(response.content)["object"] == "chat.completion"
    assert pool.open_connections == 1
    await pool.aclose()


@pytest.fixture
async def closing_server() -> AsyncIterator[tuple[int, list[int]]]:
    """A server that answers one request per connection, then closes it as a keep-alive timeout would."""
    served: list[int] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        served.append(1)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    yield port, served
    server.close()
    await server.wait_closed()


async def test_a_connection_the_server_closed_while_idle_is_replaced(closing_server: tuple[int, list[int]]) -> None:
    port, served = closing_server
    pool = pool_for("127.0.0.1", port)
    request = b"POST /x HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n\r\n"
    for _ in range(3):
        assert (await pool.request(request)).status == 200
        await asyncio.sleep(0.1)  # the server has closed the connection by now
    assert len(served) == 3
    await pool.aclose()


async def test_silence_beyond_the_read_timeout_fails_the_request(model_server: str) -> None:
    url = urlsplit(model_server)
    assert url.hostname is not None and url.port is not None
    pool = pool_for(url.hostname, url.port, read_timeout=0.2)
    body = orjson.dumps({"model": "demo-model", "prompt": "x", "fake_vllm": {"hang": True}})
    head = "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    head += f"Content-Length: {len(body)}\r\n\r\n"
    with pytest.raises(ReadTimeout):
        await pool.request(head.encode() + body)
    assert pool.open_connections == 0, "a timed-out connection is not kept"
    await pool.aclose()


async def test_a_refused_connection_is_a_connect_error() -> None:
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    with pytest.raises(ConnectError):
        await pool_for("127.0.0.1", port).request(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")


STREAM_REQUEST = UpstreamRequest(Route.CHAT, {"model": "m", "stream": True}, "r1")


@pytest.fixture
async def slow_ending_stream_server() -> AsyncIterator[tuple[int, list[int]]]:
    """Streams two events then `[DONE]`, and ends the chunked response a little later, as a busy server may."""
    connections: list[int] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            await reader.readexactly(length)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
            for event in (b'data: {"n":1}\n\n', b'data: {"n":2}\n\n', b"data: [DONE]\n\n"):
                writer.write(b"%x\r\n%s\r\n" % (len(event), event))
            await writer.drain()
            await asyncio.sleep(0.05)
            writer.write(b"0\r\n\r\n")
            await writer.drain()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1], connections
    server.close()


async def test_a_stream_that_ended_with_done_keeps_its_connection(
    slow_ending_stream_server: tuple[int, list[int]],
) -> None:
    port, connections = slow_ending_stream_server
    backend = DirectBackend(DirectConfig(base_url=f"http://127.0.0.1:{port}/v1"))  # type: ignore[arg-type]
    for _ in range(3):
        stream = await backend.open_stream(STREAM_REQUEST)
        events = []
        async for event in stream:
            events.append(event)
            if event.startswith(b"data: [DONE]"):
                break  # as the relay does: it stops reading at [DONE]
        await stream.aclose()
        assert len(events) == 3
    assert len(connections) == 1, "each stream opened a new connection"
    await backend.aclose()


async def test_a_stream_abandoned_before_done_closes_its_connection(
    slow_ending_stream_server: tuple[int, list[int]],
) -> None:
    port, connections = slow_ending_stream_server
    backend = DirectBackend(DirectConfig(base_url=f"http://127.0.0.1:{port}/v1"))  # type: ignore[arg-type]
    for _ in range(2):
        stream = await backend.open_stream(STREAM_REQUEST)
        async for _event in stream:
            break  # the client left after the first event
        await stream.aclose()
    assert len(connections) == 2, "an unfinished response must not be reused"
    await backend.aclose()


async def test_a_model_server_at_an_ipv6_address_is_reached_with_the_right_host_header() -> None:
    seen: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        seen.append(head)
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        await reader.readexactly(length)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}")
        await writer.drain()

    try:
        server = await asyncio.start_server(handle, "::1", 0)
    except OSError:
        pytest.skip("no IPv6 loopback on this machine")
    port = server.sockets[0].getsockname()[1]
    backend = DirectBackend(DirectConfig(base_url=f"http://[::1]:{port}/v1"))  # type: ignore[arg-type]
    try:
        assert await backend.submit(UpstreamRequest(Route.CHAT, {"model": "m"}, "r1")) == b"{}"
    finally:
        await backend.aclose()
        server.close()
    assert f"\r\nHost: [::1]:{port}\r\n".encode() in seen[0]
