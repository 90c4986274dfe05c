"""The `direct` backend: async HTTP to an OpenAI-compatible server such as vLLM."""

from __future__ import annotations

import asyncio
import logging
import os
import weakref
from collections.abc import AsyncIterator
from typing import Annotated

import httpx
import orjson
from pydantic import BaseModel, ConfigDict, Field, HttpUrl, StringConstraints

from resource_server.dispatch.base import BackendHealth, SseSplitter, UpstreamRequest, upstream_error
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


class DirectBackend:
    """Talks to one model server over pooled HTTP connections (one pool per event loop)."""

    config_model = DirectConfig

    def __init__(self, config: DirectConfig) -> None:
        self.config = config
        self._base_url = str(config.base_url).rstrip("/") + "/"
        self._headers = {"content-type": "application/json", "accept-encoding": "identity"}
        if config.api_key_env:
            secret = os.environ.get(config.api_key_env)
            if not secret:
                raise UpstreamError(
                    "This model's server is misconfigured on the gateway. Please tell the administrators.",
                    code="backend_misconfigured",
                )
            self._headers["authorization"] = f"Bearer {secret}"
        # httpx pools belong to one event loop; tests and management commands may run several.
        self._clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, httpx.AsyncClient] = (
            weakref.WeakKeyDictionary()
        )

    def _client(self) -> httpx.AsyncClient:
        loop = asyncio.get_running_loop()
        client = self._clients.get(loop)
        if client is None:
            client = httpx.AsyncClient(
                base_url=self._base_url,
                headers=self._headers,
                timeout=httpx.Timeout(
                    connect=self.config.connect_timeout,
                    read=self.config.read_timeout,
                    write=self.config.read_timeout,
                    pool=self.config.connect_timeout,
                ),
                limits=httpx.Limits(
                    max_connections=self.config.max_connections,
                    max_keepalive_connections=self.config.max_connections,
                ),
            )
            self._clients[loop] = client
        return client

    def _transport_error(self, exc: httpx.HTTPError) -> UpstreamError | ServiceUnavailable:
        logger.warning("model server %s: %s", self._base_url, type(exc).__name__)
        if isinstance(exc, httpx.ReadTimeout | httpx.WriteTimeout):
            return UpstreamError(
                f"The model server did not answer within {self.config.read_timeout:g} s.",
                status=504,
                code="upstream_timeout",
            )
        if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout):
            return ServiceUnavailable(
                "The model server cannot be reached right now. Please retry shortly.",
                retry_after=5,
                code="upstream_unreachable",
            )
        return UpstreamError("The connection to the model server failed.", code="upstream_connection_failed")

    async def submit(self, request: UpstreamRequest) -> bytes:
        try:
            response = await self._client().post(
                request.route.value, content=orjson.dumps(request.body), headers={"x-request-id": request.request_id}
            )
        except httpx.HTTPError as exc:
            raise self._transport_error(exc) from None
        if response.status_code >= 300:
            raise upstream_error(response.status_code, response.content, model_server=self._base_url)
        return response.content

    async def open_stream(self, request: UpstreamRequest) -> DirectStream:
        client = self._client()
        outgoing = client.build_request(
            "POST",
            request.route.value,
            content=orjson.dumps(request.body),
            headers={"x-request-id": request.request_id},
        )
        try:
            response = await client.send(outgoing, stream=True)
        except httpx.HTTPError as exc:
            raise self._transport_error(exc) from None
        if response.status_code >= 300:
            try:
                content = await response.aread()
            except httpx.HTTPError:
                content = b""
            finally:
                await response.aclose()
            raise upstream_error(response.status_code, content, model_server=self._base_url)
        return DirectStream(response, self)

    async def health(self) -> BackendHealth:
        try:
            response = await self._client().get("models")
        except httpx.HTTPError as exc:
            return BackendHealth(ok=False, detail=type(exc).__name__)
        return BackendHealth(ok=response.status_code == 200, detail=f"HTTP {response.status_code}")

    async def aclose(self) -> None:
        clients = list(self._clients.values())
        self._clients.clear()
        for client in clients:
            await client.aclose()


class DirectStream:
    """An open streamed response; closing it closes the upstream request."""

    def __init__(self, response: httpx.Response, backend: DirectBackend) -> None:
        self._response = response
        self._backend = backend

    async def __aiter__(self) -> AsyncIterator[bytes]:
        splitter = SseSplitter()
        try:
            async for chunk in self._response.aiter_raw():
                for event in splitter.feed(chunk):
                    yield event
        except httpx.HTTPError as exc:
            raise self._backend._transport_error(exc) from None

    async def aclose(self) -> None:
        await self._response.aclose()
