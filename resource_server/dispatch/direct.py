"""The `direct` backend: async HTTP/1.1 to an OpenAI-compatible server such as vLLM."""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
import weakref
from collections.abc import AsyncIterator
from typing import Annotated

import orjson
from pydantic import BaseModel, ConfigDict, Field, HttpUrl, StringConstraints

from resource_server.dispatch.base import BackendHealth, SseSplitter, UpstreamRequest, upstream_error
from resource_server.dispatch.http1 import (
    ConnectError,
    Connection,
    ConnectTimeout,
    HttpError,
    Pool,
    PoolTimeout,
    ReadTimeout,
)
from resource_server.errors import ServiceUnavailable, UpstreamError

logger = logging.getLogger(__name__)

EnvVarName = Annotated[str, StringConstraints(pattern=r"^[A-Z_][A-Z0-9_]*$", max_length=128)]


class DirectConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    base_url: HttpUrl = Field(description="OpenAI-compatible base URL ending in /v1, e.g. http://node12:8000/v1")
    api_key_env: EnvVarName | None = Field(
        default=None, description="Name of the environment variable holding the server's API key, if it needs one."
    )
    connect_timeout: float = Field(default=5.0, gt=0, le=120)
    read_timeout: float = Field(default=600.0, gt=0, le=3600, description="Longest wait between two bytes.")
    max_connections: int = Field(default=256, ge=1, le=10_000)


def _tls_context() -> ssl.SSLContext:
    # httpx's default context: the certificate authorities of SSL_CERT_FILE / SSL_CERT_DIR or certifi's
    # bundle, as when httpx carried these requests. Imported here: plain-HTTP gateways never load httpx.
    import httpx

    return httpx.create_ssl_context()


class DirectBackend:
    """Talks to one model server over pooled keep-alive HTTP/1.1 connections (one pool per event loop)."""

    config_model = DirectConfig

    def __init__(self, config: DirectConfig) -> None:
        self.config = config
        url = config.base_url
        self._base_url = str(url).rstrip("/") + "/"
        self._host = url.host or ""
        self._port = url.port or (443 if url.scheme == "https" else 80)
        self._tls = _tls_context() if url.scheme == "https" else None
        self._path = (url.path or "/").rstrip("/") + "/"
        host = self._host if self._port in (80, 443) else f"{self._host}:{self._port}"
        fixed = [f"Host: {host}", "Content-Type: application/json", "Accept-Encoding: identity"]
        if config.api_key_env:
            secret = os.environ.get(config.api_key_env)
            if not secret:
                raise UpstreamError(
                    "This model's server is misconfigured on the gateway. Please tell the administrators.",
                    code="backend_misconfigured",
                )
            fixed.append(f"Authorization: Bearer {secret}")
        self._fixed_headers = "".join(f"{line}\r\n" for line in fixed).encode("latin1")
        # Pools belong to one event loop; tests and management commands may run several.
        self._pools: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Pool] = weakref.WeakKeyDictionary()

    def _pool(self) -> Pool:
        loop = asyncio.get_running_loop()
        pool = self._pools.get(loop)
        if pool is None:
            pool = Pool(
                self._host,
                self._port,
                tls=self._tls,
                max_connections=self.config.max_connections,
                connect_timeout=self.config.connect_timeout,
                read_timeout=self.config.read_timeout,
            )
            self._pools[loop] = pool
        return pool

    def _request(self, method: str, route: str, request_id: str = "", body: bytes = b"") -> bytes:
        head = f"{method} {self._path}{route} HTTP/1.1\r\n".encode("latin1") + self._fixed_headers
        if request_id:
            head += f"X-Request-ID: {request_id}\r\n".encode("latin1")
        return head + f"Content-Length: {len(body)}\r\n\r\n".encode("latin1") + body

    def _transport_error(self, exc: HttpError) -> UpstreamError | ServiceUnavailable:
        logger.warning("model server %s: %s", self._base_url, type(exc).__name__)
        if isinstance(exc, ReadTimeout):
            return UpstreamError(
                f"The model server did not answer within {self.config.read_timeout:g} s.",
                status=504,
                code="upstream_timeout",
            )
        if isinstance(exc, ConnectError | ConnectTimeout | PoolTimeout):
            return ServiceUnavailable(
                "The model server cannot be reached right now. Please retry shortly.",
                retry_after=5,
                code="upstream_unreachable",
            )
        return UpstreamError("The connection to the model server failed.", code="upstream_connection_failed")

    async def submit(self, request: UpstreamRequest) -> bytes:
        data = self._request("POST", request.route.value, request.request_id, orjson.dumps(request.body))
        try:
            response = await self._pool().request(data)
        except HttpError as exc:
            raise self._transport_error(exc) from None
        if response.status >= 300:
            raise upstream_error(response.status, response.content, model_server=self._base_url)
        return response.content

    async def open_stream(self, request: UpstreamRequest) -> DirectStream:
        pool = self._pool()
        data = self._request("POST", request.route.value, request.request_id, orjson.dumps(request.body))
        try:
            connection = await pool.exchange(data)
        except HttpError as exc:
            raise self._transport_error(exc) from None
        if connection.status >= 300:
            try:
                content = await connection.read_all()
            except HttpError:
                content = b""
            finally:
                pool.release(connection)
            raise upstream_error(connection.status, content, model_server=self._base_url)
        return DirectStream(connection, pool, self)

    async def health(self) -> BackendHealth:
        try:
            response = await self._pool().request(self._request("GET", "models"))
        except HttpError as exc:
            return BackendHealth(ok=False, detail=type(exc).__name__)
        return BackendHealth(ok=response.status == 200, detail=f"HTTP {response.status}")

    async def aclose(self) -> None:
        pools = list(self._pools.values())
        self._pools.clear()
        for pool in pools:
            await pool.aclose()


class DirectStream:
    """An open streamed response; closing it before the end closes the upstream connection."""

    def __init__(self, connection: Connection, pool: Pool, backend: DirectBackend) -> None:
        self._connection = connection
        self._pool = pool
        self._backend = backend
        self._released = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        splitter = SseSplitter()
        try:
            while (data := await self._connection.read_some()) is not None:
                for event in splitter.feed(data):
                    yield event
        except HttpError as exc:
            raise self._backend._transport_error(exc) from None

    async def aclose(self) -> None:
        if not self._released:
            self._released = True
            self._pool.release(self._connection)
