"""Usage survives a PostgreSQL outage: records wait in memory, then in a spool file across a restart.

The gateway reaches PostgreSQL through a TCP proxy that the test can cut, which is what an outage
looks like from the gateway: connections refused and open ones dropped.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from django.db import connection

from resource_server.models import RequestLog
from tests.conftest import Seeded, seed
from tests.servers import gateway_server
from tests.tcp_proxy import TcpProxy

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(connection.vendor != "postgresql", reason="needs DATABASE_URL pointing at PostgreSQL"),
]

CHAT = {"model": "demo-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@pytest.fixture
def proxy() -> Iterator[TcpProxy]:
    config = connection.settings_dict
    tcp = TcpProxy((config["HOST"] or "127.0.0.1", int(config["PORT"] or 5432)))
    tcp.restore()
    yield tcp
    tcp.cut()


def _env(proxy: TcpProxy, data_dir: Path) -> dict[str, str]:
    config = connection.settings_dict
    password = f":{config['PASSWORD']}" if config["PASSWORD"] else ""
    return {
        "DATABASE_URL": f"postgres://{config['USER']}{password}@127.0.0.1:{proxy.port}/{config['NAME']}",
        "DATA_DIR": str(data_dir),
        "USAGE_FLUSH_SECONDS": "0.05",
        "ROUTING_CACHE_SECONDS": "300",
        "API_KEY_CACHE_SECONDS": "300",
    }


def _chat(url: str, seeded: Seeded) -> str:
    response = httpx.post(f"{url}/resource_server/v1/chat/completions", json=CHAT, headers=seeded.auth, timeout=20)
    assert response.status_code == 200, response.text
    return response.headers["x-request-id"]


def _wait_for_rows(request_ids: list[str], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if RequestLog.objects.filter(request_id__in=request_ids).count() == len(request_ids):
            return True
        time.sleep(0.1)
    return False


def test_usage_written_during_an_outage_arrives_when_the_database_returns(
    proxy: TcpProxy, model_server: str, tmp_path: Path
) -> None:
    seeded = seed(model_server)
    with gateway_server(_env(proxy, tmp_path)) as url:
        assert _wait_for_rows([_chat(url, seeded)], timeout=10)
        proxy.cut()
        during = [_chat(url, seeded), _chat(url, seeded)]
        assert not _wait_for_rows(during, timeout=1), "rows cannot be written while the database is away"
        proxy.restore()
        assert _wait_for_rows(during, timeout=40)


def test_usage_left_at_shutdown_is_spooled_and_replayed_by_the_next_start(
    proxy: TcpProxy, model_server: str, tmp_path: Path
) -> None:
    seeded = seed(model_server)
    with gateway_server(_env(proxy, tmp_path)) as url:
        _chat(url, seeded)
        proxy.cut()
        stranded = _chat(url, seeded)
    assert list((tmp_path / "usage-spool").glob("usage-*.jsonl")), "unwritten records must be spooled at shutdown"
    proxy.restore()
    with gateway_server(_env(proxy, tmp_path)) as url:
        fresh = _chat(url, seeded)
        assert _wait_for_rows([stranded, fresh], timeout=20)
    assert not list((tmp_path / "usage-spool").iterdir())
