"""The gateway's way to PostgreSQL for outage tests: a TcpProxy the test cuts or stalls, never the server."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from django.db import connection

from resource_server.models import RequestLog
from tests.tcp_proxy import TcpProxy, proxy_to

# Usage rows are written within this long of a request's end, so tests wait little for them.
FLUSH_SECONDS = 0.05
CHAT = {"model": "demo-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


REDIS_URL = os.environ.get("REDIS_URL", "")


@pytest.fixture
def proxy() -> Iterator[TcpProxy]:
    """A proxy in front of the test database's PostgreSQL server."""
    config = connection.settings_dict
    tcp = TcpProxy((config["HOST"] or "127.0.0.1", int(config["PORT"] or 5432)))
    tcp.restore()
    yield tcp
    tcp.resume()
    tcp.cut()


@pytest.fixture(scope="module")
def redis_proxy() -> Iterator[TcpProxy]:
    """A proxy in front of the tests' Redis (REDIS_URL), shared by a module's tests and gateways."""
    with proxy_to(REDIS_URL, 6379) as tcp:
        yield tcp


@pytest.fixture
def redis_up(redis_proxy: TcpProxy) -> TcpProxy:
    """The module's Redis proxy, passing traffic again (an earlier test may have left it cut)."""
    if not redis_proxy.is_open:
        redis_proxy.restore()
    return redis_proxy


def redis_through(proxy: TcpProxy) -> str:
    """REDIS_URL, by way of `proxy`."""
    return urlsplit(REDIS_URL)._replace(netloc=f"127.0.0.1:{proxy.port}").geturl()


def gateway_env(proxy: TcpProxy, data_dir: Path) -> dict[str, str]:
    """Environment for a gateway process that reaches the test database through `proxy`."""
    config = connection.settings_dict
    password = f":{config['PASSWORD']}" if config["PASSWORD"] else ""
    return {
        "DATABASE_URL": f"postgres://{config['USER']}{password}@127.0.0.1:{proxy.port}/{config['NAME']}",
        "DATA_DIR": str(data_dir),
        "USAGE_FLUSH_SECONDS": str(FLUSH_SECONDS),
        "ROUTING_CACHE_SECONDS": "300",
        "API_KEY_CACHE_SECONDS": "300",
    }


def chat(url: str, auth: dict[str, str]) -> str:
    """A chat request that must succeed; returns the gateway's id for it (its usage row's key)."""
    response = httpx.post(f"{url}/resource_server/v1/chat/completions", json=CHAT, headers=auth, timeout=20)
    assert response.status_code == 200, response.text
    return response.headers["x-gateway-request-id"]


def wait_for_rows(request_ids: list[str], timeout: float) -> bool:
    """Whether every one of these requests has its usage row within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if RequestLog.objects.filter(request_id__in=request_ids).count() == len(request_ids):
            return True
        time.sleep(0.1)
    return False
