"""End to end: every request leaves its own usage row, whatever the client sends and however the gateway stops.

Runs on SQLite, and on PostgreSQL when DATABASE_URL is set (PostgreSQL is where NUL is refused).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from resource_server.models import RequestLog
from tests.conftest import Seeded, seed
from tests.e2e.conftest import e2e_gateway, usage_row
from tests.servers import free_port, server_database_url, wait_until_up

pytestmark = pytest.mark.django_db(transaction=True)

CHAT_PATH = "/resource_server/v1/chat/completions"
HELLO = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def gateway_url(django_db_setup: None, model_server: str, tmp_path_factory: Any) -> Iterator[str]:
    # Bodies are kept too: PostgreSQL's jsonb refuses NUL as its text columns do.
    with e2e_gateway(tmp_path_factory, LOG_REQUEST_BODIES="true") as url:
        yield url


def _post(url: str, seeded: Seeded, body: bytes, **headers: str) -> httpx.Response:
    headers = {**seeded.auth, "Content-Type": "application/json", **headers}
    return httpx.post(f"{url}{CHAT_PATH}", content=body, headers=headers, timeout=20)


def _chat(model: str = "demo-model", user: str = "ada") -> bytes:
    # Built by hand so that the escapes reach the gateway exactly as a client may send them.
    return b'{"model": "%s", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "user": "%s"}' % (
        model.encode(),
        user.encode(),
    )


def test_a_model_name_with_nul_leaves_a_row_and_later_requests_still_do(
    gateway_url: str, model_server: str, transactional_db: None
) -> None:
    seeded = seed(model_server)
    odd = _post(gateway_url, seeded, _chat("demo-model\\u0000"))
    assert odd.status_code == 404, odd.text
    row = usage_row(request_id=odd.headers["x-gateway-request-id"])
    assert (row.status_code, row.model) == (404, "demo-model\ufffd")
    assert row.request_body["model"] == "demo-model\ufffd"
    long = _post(gateway_url, seeded, _chat(user="ada\\u0000" + "u" * 1024 * 1024))
    assert long.status_code == 200, long.text
    assert (
        usage_row(request_id=long.headers["x-gateway-request-id"]).request_body["user"]
        == "ada\ufffd" + "u" * 1024 * 1024
    )
    too_long = _post(gateway_url, seeded, _chat("m" * 1024 * 1024))  # no such model, as vLLM would say too
    assert too_long.status_code == 404, too_long.text
    assert usage_row(request_id=too_long.headers["x-gateway-request-id"]).status_code == 404
    for _ in range(3):
        answer = _post(gateway_url, seeded, _chat())
        assert answer.status_code == 200, answer.text
        assert usage_row(request_id=answer.headers["x-gateway-request-id"]).status_code == 200


def test_four_requests_with_one_request_id_leave_four_rows(
    gateway_url: str, model_server: str, transactional_db: None
) -> None:
    seeded = seed(model_server)
    answers = [_post(gateway_url, seeded, _chat(), **{"X-Request-ID": "client-trace-0001"}) for _ in range(4)]
    assert [answer.status_code for answer in answers] == [200] * 4
    assert {answer.headers["x-request-id"] for answer in answers} == {"client-trace-0001"}  # echoed as before
    ours = {answer.headers["x-gateway-request-id"] for answer in answers}
    assert len(ours) == 4
    for request_id in ours:
        assert usage_row(request_id=request_id).client_request_id == "client-trace-0001"
    assert RequestLog.objects.filter(client_request_id="client-trace-0001").count() == 4


def test_an_error_answer_quotes_the_gateways_own_id(
    gateway_url: str, model_server: str, transactional_db: None
) -> None:
    seeded = seed(model_server)
    answer = _post(gateway_url, seeded, _chat("no-such-model"), **{"X-Request-ID": "client-trace-0002"})
    assert answer.status_code == 404
    assert answer.headers["x-request-id"] == "client-trace-0002"
    row = usage_row(request_id=answer.headers["x-gateway-request-id"])
    assert row.client_request_id == "client-trace-0002"


def test_sigterm_with_a_stream_open_cuts_it_in_time_and_records_it(
    model_server: str, transactional_db: None, tmp_path: Path
) -> None:
    """gunicorn SIGKILLs workers still busy after graceful_timeout: the stream must be cut before that."""
    seeded = seed(model_server)
    graceful = 6
    port = free_port()
    env = {
        **os.environ,
        "DATABASE_URL": server_database_url(),
        "DATA_DIR": str(tmp_path),
        "USAGE_FLUSH_SECONDS": "0.05",
        "ROUTING_CACHE_SECONDS": "0",
        "API_KEY_CACHE_SECONDS": "0",
    }
    gunicorn = str(Path(sys.executable).with_name("gunicorn"))
    args = [gunicorn, "-c", "deploy/gunicorn.conf.py", "--bind", f"127.0.0.1:{port}", "--workers", "1"]
    process = subprocess.Popen([*args, "--graceful-timeout", str(graceful)], cwd=Path(__file__).parents[2], env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(f"{url}/resource_server/health", process)
        # One token a second for a minute: far longer than the worker may take to stop.
        body = {
            "model": "demo-model",
            "messages": HELLO,
            "max_tokens": 60,
            "stream": True,
            "fake_vllm": {"tokens_per_second": 1},
        }
        with httpx.stream("POST", f"{url}{CHAT_PATH}", json=body, headers=seeded.auth, timeout=30) as stream:
            assert stream.status_code == 200
            request_id = stream.headers["x-gateway-request-id"]
            lines = stream.iter_lines()
            next(lines)  # the stream is open
            process.send_signal(signal.SIGTERM)
            with pytest.raises(httpx.HTTPError):
                for _ in lines:
                    pass  # cut by the gateway, not ended
        assert process.wait(timeout=graceful + 10) == 0, "the worker had to be killed"
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    row = usage_row(request_id=request_id)
    assert (row.status_code, row.error_code) == (499, "client_disconnected")
    assert not list((tmp_path / "usage-spool").glob("usage-*.jsonl")), "everything was written before exit"
