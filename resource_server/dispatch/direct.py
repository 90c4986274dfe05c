"""The `direct` backend: async HTTP/1.1 to an OpenAI-compatible server such as vLLM."""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import ssl
import urllib.request
import weakref
from collections.abc import AsyncIterator
from urllib.parse import unquote, urlsplit

import orjson
from pydantic import BaseModel, ConfigDict, Field, HttpUrl

from resource_server.dispatch.base import (
    BackendHealth,
    SseSplitter,
    UpstreamRequest,
    json_or_none,
    model_cards,
    upstream_error,
)
from resource_server.dispatch.fields import EnvVarName
from resource_server.dispatch.http1 import (
    ConnectError,
    Connection,
    ConnectTimeout,
    HttpError,
    Pool,
    PoolTimeout,
    Proxy,
    ReadTimeout,
)
from resource_server.errors import ErrorCode, ServiceUnavailable, UpstreamError
from resource_server.routes import ROUTES

logger = logging.getLogger(__name__)

# After [DONE] the end of the response (the chunked terminator) is normally already in flight; waiting
# this long for it keeps the connection for the next request instead of opening a new one.
_END_WAIT_SECONDS = 0.5


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


def _misconfigured() -> UpstreamError:
    return UpstreamError(
        "This model's server is misconfigured on the gateway. Please tell the administrators.",
        code=ErrorCode.BACKEND_MISCONFIGURED,
    )


def _proxy_for(scheme: str, host: str, port: int) -> Proxy | None:
    """The forward proxy the gateway's environment names for this server, as curl and httpx read it.

    HTTPS_PROXY / HTTP_PROXY by the server's scheme, else ALL_PROXY; none for a server NO_PROXY covers.
    """
    proxies = urllib.request.getproxies_environment()
    key = scheme if scheme in proxies else "all"
    proxy_url = proxies.get(key)
    if not proxy_url:
        return None
    # host:port, so that NO_PROXY entries with a port match too. The function is missing from typeshed.
    bypass = urllib.request.proxy_bypass_environment  # type: ignore[attr-defined]  # see the line above
    if bypass(f"{host}:{port}", proxies):
        return None
    parts = urlsplit(proxy_url if "://" in proxy_url else f"http://{proxy_url}")
    try:
        proxy_port = parts.port or 80
    except ValueError:
        proxy_port = 0
    if parts.scheme != "http" or not parts.hostname or not proxy_port:
        variable = f"{key}_proxy" if os.environ.get(f"{key}_proxy") else f"{key}_proxy".upper()
        # The URL itself stays out of the log: it may carry credentials.
        logger.error(
            "direct backend for %s://%s:%s: %s is not an http://host:port proxy (it says %s://); "
            "only http:// proxies are supported",
            scheme,
            host,
            port,
            variable,
            parts.scheme,
        )
        raise _misconfigured()
    authorization = None
    if parts.username is not None:
        credentials = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
        authorization = f"Basic {base64.b64encode(credentials).decode('ascii')}"
    return Proxy(parts.hostname, proxy_port, authorization)


class DirectBackend:
    """Talks to one model server over pooled keep-alive HTTP/1.1 connections (one pool per event loop)."""

    config_model = DirectConfig

    def __init__(self, config: DirectConfig) -> None:
        self.config = config
        url = config.base_url
        self._base_url = str(url).rstrip("/") + "/"
        named = url.host or ""  # as URLs and Host headers write it: an IPv6 address in brackets
        self._host = named.strip("[]")  # as sockets and TLS want it
        default_port = 443 if url.scheme == "https" else 80
        self._port = url.port or default_port
        self._tls = _tls_context() if url.scheme == "https" else None
        path = (url.path or "/").rstrip("/") + "/"
        host = named if self._port == default_port else f"{named}:{self._port}"
        fixed = [f"Host: {host}", "Accept-Encoding: identity"]
        # Decided once here, so a request without a proxy costs nothing more (per-request CPU is benchmarked).
        self._proxy = _proxy_for(url.scheme, named, self._port)
        # What follows the method in the request line: the path of base_url for the /v1 routes, and for the
        # few that vLLM serves at its root (/tokenize, /pooling, ...) that path without its final `v1/`.
        root = path.removesuffix("v1/") if path.endswith("/v1/") else path
        self._target = path
        root_target = root
        if self._proxy is not None and self._tls is None:
            # Plain HTTP goes to the proxy whole: absolute-form target, the proxy's credentials in the head.
            # (HTTPS instead tunnels with CONNECT, and the proxy never sees the requests.)
            self._target = f"http://{named}:{self._port}{path}"
            root_target = f"http://{named}:{self._port}{root}"
            if self._proxy.authorization:
                fixed.append(f"Proxy-Authorization: {self._proxy.authorization}")
        if config.api_key_env:
            secret = os.environ.get(config.api_key_env)
            if not secret:
                raise _misconfigured()
            fixed.append(f"Authorization: Bearer {secret}")
        self._route_targets = {
            route: (root_target if descriptor.at_server_root else self._target) + route.value
            for route, descriptor in ROUTES.items()
        }
        self._form_headers = "".join(f"{line}\r\n" for line in [*fixed, "Transfer-Encoding: chunked"]).encode("latin1")
        self._fixed_headers = "".join(f"{line}\r\n" for line in [*fixed, "Content-Type: application/json"]).encode(
            "latin1"
        )
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
                proxy=self._proxy,
            )
            self._pools[loop] = pool
        return pool

    def _request(self, method: str, target: str, request_id: str = "", body: bytes = b"") -> bytes:
        head = f"{method} {target} HTTP/1.1\r\n".encode("latin1") + self._fixed_headers
        if request_id:
            head += f"X-Request-ID: {request_id}\r\n".encode("latin1")
        return head + f"Content-Length: {len(body)}\r\n\r\n".encode("latin1") + body

    def _transport_error(self, exc: HttpError) -> UpstreamError | ServiceUnavailable:
        # The message names hosts and statuses (a proxy's refusal, for one), never credentials.
        logger.warning("model server %s: %s: %s", self._base_url, type(exc).__name__, exc)
        if isinstance(exc, ReadTimeout):
            return UpstreamError(
                f"The model server did not answer within {self.config.read_timeout:g} s.",
                code=ErrorCode.UPSTREAM_TIMEOUT,
            )
        if isinstance(exc, ConnectError | ConnectTimeout | PoolTimeout):
            unreachable = ServiceUnavailable(
                "The model server cannot be reached right now. Please retry shortly.",
                retry_after=5,
                code=ErrorCode.UPSTREAM_UNREACHABLE,
            )
            unreachable.never_reached = True  # no connection, so no byte of the request was sent
            return unreachable
        return UpstreamError("The connection to the model server failed.", code=ErrorCode.UPSTREAM_CONNECTION_FAILED)

    async def _exchange(self, pool: Pool, request: UpstreamRequest) -> Connection:
        """Send the request (a form as it arrives, chunked); the connection, its response head read."""
        target = self._route_targets[request.route]
        try:
            if request.form is None:
                return await pool.exchange(
                    self._request("POST", target, request.request_id, orjson.dumps(request.body))
                )
            head = f"POST {target} HTTP/1.1\r\n".encode("latin1") + self._form_headers
            head += f"X-Request-ID: {request.request_id}\r\nContent-Type: {request.form.content_type}\r\n\r\n".encode(
                "latin1"
            )
            return await pool.exchange_upload(head, request.form.chunks())
        except HttpError as exc:
            raise self._transport_error(exc) from None

    async def submit(self, request: UpstreamRequest) -> bytes:
        pool = self._pool()
        connection = await self._exchange(pool, request)
        try:
            content = await connection.read_all()
        except HttpError as exc:
            raise self._transport_error(exc) from None
        finally:
            pool.release(connection)
        if connection.status >= 300:
            raise upstream_error(connection.status, content, model_server=self._base_url)
        return content

    async def open_stream(self, request: UpstreamRequest) -> DirectStream:
        pool = self._pool()
        connection = await self._exchange(pool, request)
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
            response = await self._pool().request(self._request("GET", self._target + "models"))
        except HttpError as exc:
            return BackendHealth(ok=False, detail=type(exc).__name__)
        ok = response.status == 200
        cards = model_cards(json_or_none(response.content)) if ok else ()
        return BackendHealth(ok=ok, detail=f"HTTP {response.status}", models=cards)

    async def wake(self) -> None:
        """A model server reached directly is started by its admins, not by the gateway."""
        return None

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
        self._saw_done = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        splitter = SseSplitter()
        try:
            while (data := await self._connection.read_some()) is not None:
                for event in splitter.feed(data):
                    if event.startswith(b"data: [DONE]"):
                        self._saw_done = True
                    yield event
        except HttpError as exc:
            raise self._backend._transport_error(exc) from None

    async def aclose(self) -> None:
        if self._released:
            return
        self._released = True
        connection = self._connection
        try:
            if self._saw_done and not connection.complete:
                async with asyncio.timeout(_END_WAIT_SECONDS):
                    await connection.read_all()
        except (HttpError, TimeoutError):
            pass  # released below, which closes a connection whose response did not end
        finally:
            self._pool.release(connection)
