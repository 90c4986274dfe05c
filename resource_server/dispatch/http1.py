"""A small pooled HTTP/1.1 client for the direct backend: keep-alive connections parsed by httptools.

httpx spent more CPU per relayed request than the rest of the gateway together (see docs/performance.md).
This client does only what the direct backend needs: requests with a Content-Length body, responses with a
Content-Length or chunked body, a bounded pool with a wait limit, a read timeout that is the longest wait
between two bytes, and streamed bodies with backpressure. httptools is uvicorn's parser, already installed
with uvicorn[standard]. A forward proxy (http:// only) is reached as curl does: plain-HTTP requests go to it
with absolute-form targets, TLS goes through a CONNECT tunnel.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections import deque
from collections.abc import AsyncGenerator
from dataclasses import dataclass

import httptools

_PAUSE_AT = 256 * 1024  # buffered response bytes at which reading stops until the consumer catches up


class HttpError(Exception):
    """The exchange with the server failed; subclasses say how."""


class ConnectError(HttpError):
    """The server refused or could not be reached."""


class ConnectTimeout(HttpError):
    """No connection within the connect timeout."""


class PoolTimeout(HttpError):
    """Every connection stayed busy for longer than the connect timeout."""


class ReadTimeout(HttpError):
    """No byte from the server within the read timeout."""


class RemoteProtocolError(HttpError):
    """The server closed the connection mid-response or sent something that is not HTTP/1.1."""


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    content: bytes


@dataclass(frozen=True, slots=True)
class Proxy:
    """A forward proxy at http://host:port; `authorization` is its Proxy-Authorization header value, if any."""

    host: str
    port: int
    authorization: str | None = None


class Connection(asyncio.Protocol):
    """One keep-alive connection, one exchange at a time."""

    def __init__(self, loop: asyncio.AbstractEventLoop, read_timeout: float) -> None:
        self._loop = loop
        self._read_timeout = read_timeout
        self._parser = httptools.HttpResponseParser(self)
        self._transport: asyncio.Transport | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._last_data = 0.0
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._paused = False
        self._writable: asyncio.Future[None] | None = None  # set while the transport asks us to stop writing
        self._error: HttpError | None = None
        self.closed = False
        self.reused = False
        self.got_bytes = False
        self.status = 0
        self.head_done = False
        self.complete = False
        self._reusable = False
        self.request_cut = False  # its request's body was not sent whole: it cannot carry another request

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # a stream transport, whatever its class

    def data_received(self, data: bytes) -> None:
        self._last_data = self._loop.time()
        self.got_bytes = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(RemoteProtocolError(f"invalid HTTP response: {exc}"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.complete:
            self._fail(RemoteProtocolError("the server closed the connection"))
        self.resume_writing()

    def pause_writing(self) -> None:
        if self._writable is None:
            self._writable = self._loop.create_future()

    def resume_writing(self) -> None:
        if self._writable is not None:
            if not self._writable.done():
                self._writable.set_result(None)
            self._writable = None

    # httptools callbacks

    def on_headers_complete(self) -> None:
        self.status = self._parser.get_status_code()
        # Read here: once the message is complete the parser has reset and always says "close".
        self._reusable = self._parser.should_keep_alive()
        self.head_done = True
        self._wake()
        self.resume_writing()  # an answer ends an upload: a sender waiting for the server to read stops waiting

    def on_body(self, body: bytes) -> None:
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > _PAUSE_AT and not self._paused and self._transport is not None:
            self._paused = True
            self._transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        self.complete = True
        self._wake()

    # the exchange

    def send(self, data: bytes) -> None:
        self.status, self.head_done, self.complete, self.got_bytes, self._reusable = 0, False, False, False, False
        self._chunks, self._buffered = [], 0
        self._last_data = self._loop.time()
        assert self._transport is not None
        self._transport.write(data)

    def send_chunk(self, data: bytes) -> None:
        """One chunk of a request body sent with `Transfer-Encoding: chunked` (b"": the last)."""
        assert self._transport is not None
        self._transport.writelines((b"%x\r\n" % len(data), data, b"\r\n"))

    async def drain(self) -> None:
        """Wait until the server has taken what was sent (within the read timeout), so that a large body is
        never held in the gateway's buffers."""
        if self._writable is None:
            return
        try:
            async with asyncio.timeout(self._read_timeout):
                await self._writable
        except TimeoutError:
            raise ReadTimeout("the server took no data within the read timeout") from None

    async def head(self) -> int:
        while not self.head_done:
            await self._wait()
        return self.status

    async def read_all(self) -> bytes:
        # Drained as it arrives: reading pauses at _PAUSE_AT buffered bytes, so waiting for the end of a
        # larger body without taking it would wait until the read timeout.
        parts = []
        while (part := await self.read_some()) is not None:
            parts.append(part)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def read_some(self) -> bytes | None:
        """The body bytes that arrived since the last call, waiting for some; None at the end."""
        while not self._chunks:
            if self.complete:
                return None
            await self._wait()
        return self.take()

    def take(self) -> bytes | None:
        chunks, self._chunks, self._buffered = self._chunks, [], 0
        if self._paused and self._transport is not None:
            self._paused = False
            self._transport.resume_reading()
        return chunks[0] if len(chunks) == 1 else b"".join(chunks) if chunks else None

    @property
    def keep_alive(self) -> bool:
        return self.complete and not self.closed and self._reusable and not self.request_cut

    def close(self) -> None:
        self.closed = True
        if self._transport is not None:
            self._transport.close()

    async def _wait(self) -> None:
        if self._error is not None:
            raise self._error
        self._waiter = self._loop.create_future()
        if self._timer is None:
            self._timer = self._loop.call_at(self._last_data + self._read_timeout, self._check_timeout)
        try:
            await self._waiter
        finally:
            self._waiter = None

    def _check_timeout(self) -> None:
        # One timer per read-timeout period, re-armed from the last byte, instead of one per wait.
        self._timer = None
        if self._waiter is None or self._waiter.done():
            return
        due = self._last_data + self._read_timeout
        if self._loop.time() >= due:
            self._fail(ReadTimeout("no data from the server within the read timeout"))
        else:
            self._timer = self._loop.call_at(due, self._check_timeout)

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _fail(self, error: HttpError) -> None:
        self._error = error
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(error)


class Pool:
    """Up to `max_connections` keep-alive connections to one server, for one event loop.

    With a `proxy`, a TLS pool opens each connection as a CONNECT tunnel through it; a plain pool connects
    to the proxy itself, and its requests must then carry absolute-form targets (the caller writes them).
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        tls: ssl.SSLContext | None,
        max_connections: int,
        connect_timeout: float,
        read_timeout: float,
        proxy: Proxy | None = None,
    ) -> None:
        self._host, self._port, self._tls, self._proxy = host, port, tls, proxy
        self._max = max_connections
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._idle: list[Connection] = []
        self._open = 0  # open or opening
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._loop = asyncio.get_running_loop()

    @property
    def open_connections(self) -> int:
        """Connections open or opening, idle ones included."""
        return self._open

    async def request(self, data: bytes) -> Response:
        """Send a whole request; the whole response."""
        connection = await self.exchange(data)
        try:
            content = await connection.read_all()
        except BaseException:
            self.release(connection)
            raise
        self.release(connection)
        return Response(connection.status, content)

    async def exchange(self, data: bytes) -> Connection:
        """Send a request and wait for the response head; the caller reads the body, then releases."""
        for attempt in range(2):
            connection = await self._acquire()
            connection.send(data)
            try:
                await connection.head()
            except RemoteProtocolError:
                self.release(connection)
                # A kept-alive connection the server closed just as we reused it: the request never
                # reached the application, so sending it again on a fresh connection is safe.
                if attempt == 0 and connection.reused and not connection.got_bytes:
                    continue
                raise
            except BaseException:
                self.release(connection)
                raise
            return connection
        raise AssertionError("unreachable")

    async def exchange_upload(self, head: bytes, body: AsyncGenerator[bytes, None]) -> Connection:
        """Send a request head and then `body` as it comes (chunked), and wait for the response head.

        The body is read only as fast as the server takes it, on a new connection: it cannot be sent again,
        so it never goes on a kept-alive one the server may have just closed. If the server answers before
        the body is complete (a refusal), sending stops and the answer is read.
        """
        connection = await self._acquire(reuse=False)
        try:
            connection.send(head)
            async with contextlib.aclosing(body):
                async for data in body:
                    if connection.head_done or connection.closed:
                        connection.request_cut = True
                        break
                    if data:
                        connection.send_chunk(data)
                        await connection.drain()
                else:
                    connection.send_chunk(b"")
            await connection.head()
        except BaseException:
            connection.request_cut = True
            self.release(connection)
            raise
        return connection

    def release(self, connection: Connection) -> None:
        """Give a connection back: kept if its response was read to the end, closed otherwise."""
        if connection.keep_alive:
            connection.reused = True
            self._idle.append(connection)
        else:
            connection.close()
            self._open -= 1
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                break

    async def _acquire(self, *, reuse: bool = True) -> Connection:
        while True:
            while reuse and self._idle:
                connection = self._idle.pop()
                if not connection.closed:
                    return connection
                self._open -= 1  # closed by the server while idle
            if not reuse and self._idle and self._open >= self._max:
                self._idle.pop(0).close()  # the oldest idle connection makes room for the new one
                self._open -= 1
            if self._open < self._max:
                break
            waiter = self._loop.create_future()
            self._waiters.append(waiter)
            try:
                async with asyncio.timeout(self._connect_timeout):
                    await waiter
            except TimeoutError:
                raise PoolTimeout("no free connection within the connect timeout") from None
        self._open += 1
        try:
            async with asyncio.timeout(self._connect_timeout):
                if self._proxy is None:
                    _, connection = await self._loop.create_connection(
                        lambda: Connection(self._loop, self._read_timeout),
                        self._host,
                        self._port,
                        ssl=self._tls,
                        server_hostname=self._host if self._tls else None,
                    )
                elif self._tls is None:
                    _, connection = await self._loop.create_connection(
                        lambda: Connection(self._loop, self._read_timeout), self._proxy.host, self._proxy.port
                    )
                else:
                    connection = await self._tunnel(self._proxy, self._tls)
        except BaseException as exc:
            self._open -= 1
            if isinstance(exc, TimeoutError):
                raise ConnectTimeout("no connection within the connect timeout") from None
            if isinstance(exc, OSError):
                raise ConnectError(str(exc)) from None
            raise
        return connection

    async def _tunnel(self, proxy: Proxy, tls: ssl.SSLContext) -> Connection:
        """A connection to the server through a CONNECT tunnel, TLS running inside it."""
        transport, handshake = await self._loop.create_connection(
            lambda: Connection(self._loop, self._read_timeout), proxy.host, proxy.port
        )
        try:
            authority = f"[{self._host}]:{self._port}" if ":" in self._host else f"{self._host}:{self._port}"
            lines = [f"CONNECT {authority} HTTP/1.1", f"Host: {authority}"]
            if proxy.authorization:
                lines.append(f"Proxy-Authorization: {proxy.authorization}")
            handshake.send("".join(f"{line}\r\n" for line in [*lines, ""]).encode("latin1"))
            try:
                status = await handshake.head()
            except HttpError as exc:
                raise ConnectError(f"the proxy {proxy.host}:{proxy.port} failed the CONNECT: {exc}") from None
            if not 200 <= status < 300:
                raise ConnectError(f"the proxy {proxy.host}:{proxy.port} answered CONNECT with HTTP {status}")
            # The handshake's parser is done with (it took the 2xx as the head of a body read to the end);
            # a fresh Connection parses what comes out of the tunnel.
            connection = Connection(self._loop, self._read_timeout)
            tls_transport = await self._loop.start_tls(transport, connection, tls, server_hostname=self._host)
            if tls_transport is None:  # typed as possible; asyncio and uvloop return a transport or raise
                raise ConnectError("TLS did not start in the proxy tunnel")
        except BaseException:
            transport.close()
            raise
        # start_tls does not call connection_made on the protocol it wraps.
        connection.connection_made(tls_transport)
        return connection

    async def aclose(self) -> None:
        for connection in self._idle:
            connection.close()
        self._idle.clear()
