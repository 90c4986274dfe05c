"""Usage survives a SIGKILL: records are journaled as they arrive, and the next start writes each exactly once.

PostgreSQL is reached through a TCP proxy that the test cuts, so that nothing can be written before the kill.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx
import pytest
from django.db import connection

from benchmarks.procfs import children
from resource_server.models import RequestLog
from tests.conftest import seed
from tests.integration.conftest import CHAT, FLUSH_SECONDS, chat, gateway_env, wait_for_rows
from tests.servers import gateway_server
from tests.tcp_proxy import TcpProxy

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(connection.vendor != "postgresql", reason="needs DATABASE_URL pointing at PostgreSQL"),
]

SLOW_STREAM = {**CHAT, "max_tokens": 100, "stream": True, "fake_vllm": {"tokens_per_second": 2}}


def _gunicorn_master() -> int:
    """The one gunicorn master this test runs (gunicorn renames its processes "gunicorn: master [...]")."""
    (master,) = [pid for pid in children(os.getpid()) if b"gunicorn" in Path(f"/proc/{pid}/cmdline").read_bytes()]
    return master


def test_rows_journaled_before_a_sigkill_are_written_exactly_once_and_cut_requests_recorded_lost(
    proxy: TcpProxy, model_server: str, tmp_path: Path
) -> None:
    seeded = seed(model_server)
    with gateway_server(gateway_env(proxy, tmp_path)) as url:
        before = chat(url, seeded.auth)  # also caches the key and the route for the outage
        assert wait_for_rows([before], timeout=10)
        proxy.cut()
        stranded = [chat(url, seeded.auth) for _ in range(20)]
        with (
            httpx.Client(timeout=20) as client,
            client.stream(
                "POST", f"{url}/resource_server/v1/chat/completions", json=SLOW_STREAM, headers=seeded.auth
            ) as stream,
        ):
            assert stream.status_code == 200
            cut = stream.headers["x-gateway-request-id"]
            lines = stream.iter_lines()  # kept: a dropped iterator closes the response
            next(lines)  # under way on the model server when the worker dies
            time.sleep(FLUSH_SECONDS * 20)  # well past the journal's batch interval
            master = _gunicorn_master()
            workers = children(master)
            assert workers
            os.kill(master, signal.SIGKILL)  # first, so it cannot start a new worker
            for worker in workers:
                os.kill(worker, signal.SIGKILL)
    assert RequestLog.objects.filter(request_id__in=stranded).count() == 0, "nothing could be written before"
    assert list((tmp_path / "usage-spool").glob("usage-*.jsonl")), "the killed worker's journal is left"
    proxy.restore()
    with gateway_server(gateway_env(proxy, tmp_path)) as url:
        after = chat(url, seeded.auth)
        assert wait_for_rows([*stranded, after], timeout=30)
    # The stream cut by the kill is recorded as lost with its worker, once.
    assert wait_for_rows([cut], timeout=10)
    lost = RequestLog.objects.get(request_id=cut)
    assert (lost.status_code, lost.error_code, lost.streamed) == (500, "worker_lost", True)
    # Exactly once: one row per request, the one written before the kill included.
    assert RequestLog.objects.filter(user=seeded.user).count() == len(stranded) + 3
    assert not list((tmp_path / "usage-spool").glob("opened-*.jsonl")), "the open marks are gone"
    assert not list((tmp_path / "usage-spool").glob("usage-*.jsonl")), "the replayed journal is gone"
