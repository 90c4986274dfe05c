"""Uploads through the HTTP/1.1 pool: a body sent chunked as fast as the server takes it, and a server that
answers before the body is complete."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator

import pytest

from resource_server.dispatch.http1 import Pool

HEAD = b"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
PIECE = bytes(64 * 1024)


class Body:
    """A body made one piece at a time, as the client sends it; counts the pieces taken."""

    def __init__(self, pieces: int) -> None:
        self.pieces = pieces
        self.taken = 0

    async def stream(self) -> AsyncGenerator[bytes, None]:
        for _ in range(self.pieces):
            self.taken += 1
            yield PIECE


@pytest.fixture
async def server() -> AsyncIterator[tuple[int, asyncio.Event, list[bytes]]]:
    """A server that reads a request head, then its body only once `reading` is set, and answers 200 with the
    body's length; or, if the head asks for that, refuses with 413 at once and reads nothing more."""
    reading = asyncio.Event()
    finished = asyncio.Event()
    bodies: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        if b"/refuse" in head:
            writer.write(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 2\r\n\r\n{}")
            await writer.drain()
            await finished.wait()  # keeps the connection open, reading nothing more
            writer.close()
            return
        await reading.wait()
        body = bytearray()
        while size := int((await reader.readuntil(b"\r\n")).strip(), 16):
            body += await reader.readexactly(size)
            await reader.readexactly(2)
        await reader.readexactly(2)
        bodies.append(bytes(body))
        answer = str(len(body)).encode()
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: " + str(len(answer)).encode() + b"\r\n\r\n" + answer)
        await writer.drain()

    listening = await asyncio.start_server(handle, "127.0.0.1", 0)
    yield listening.sockets[0].getsockname()[1], reading, bodies
    finished.set()
    listening.close()
    await listening.wait_closed()


def pool(port: int) -> Pool:
    return Pool("127.0.0.1", port, tls=None, max_connections=4, connect_timeout=2.0, read_timeout=10.0)


async def test_a_body_is_taken_from_the_client_only_as_fast_as_the_server_reads_it(
    server: tuple[int, asyncio.Event, list[bytes]],
) -> None:
    port, reading, bodies = server
    body = Body(pieces=400)  # 25 MiB
    upload = asyncio.ensure_future(pool(port).exchange_upload(HEAD, body.stream()))
    await asyncio.sleep(0.5)  # the server reads nothing meanwhile
    held = body.taken
    assert held < 100, f"{held} pieces taken while the server read none"  # socket buffers, not the whole body
    reading.set()
    connection = await asyncio.wait_for(upload, 30)
    assert (connection.status, await connection.read_all()) == (200, str(400 * len(PIECE)).encode())
    assert bodies == [PIECE * 400]


async def test_a_server_that_answers_before_the_body_ends_stops_the_upload(
    server: tuple[int, asyncio.Event, list[bytes]],
) -> None:
    port, _, _ = server
    body = Body(pieces=400)
    upstream = pool(port)
    connection = await asyncio.wait_for(upstream.exchange_upload(HEAD.replace(b"/v1", b"/refuse"), body.stream()), 30)
    assert connection.status == 413
    assert await connection.read_all() == b"{}"
    assert body.taken < 400  # the rest of the audio was never read from the client
    upstream.release(connection)
    assert upstream.open_connections == 0  # a connection whose request was cut carries no other
