"""Schemathesis against the OpenAPI the gateway serves, on a real gateway process: a short run of `make fuzz`.

`python -m benchmarks.fuzz` runs the long one (500 generated cases per operation, on a fresh database).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from benchmarks.fuzz import CHECKS, OPENAPI_PATH, schemathesis_run
from resource_server.models import Cluster, Endpoint
from tests.conftest import Seeded, seed
from tests.e2e.conftest import e2e_gateway, usage_row
from tests.servers import free_port, running, server_database_url

pytestmark = pytest.mark.django_db(transaction=True)


def test_short_fuzz_run_finds_no_5xx_and_answers_as_documented(tmp_path_factory: Any, model_server: str) -> None:
    seeded: Seeded = seed(model_server)
    # As `make demo` registers it, which the documented examples name.
    demo = Cluster.objects.create(name="demo")
    config = {"base_url": model_server, "read_timeout": 5}
    Endpoint.objects.create(cluster=demo, framework="vllm", model="demo-model", backend="direct", backend_config=config)
    # And a model served through the compute function and the stream relay.
    vllm = urlsplit(model_server)
    hpc = Cluster.objects.create(name="local-hpc")
    config = {"vllm": {"host": vllm.hostname, "port": vllm.port}, "workers": 4}
    hpc_endpoint = Endpoint.objects.create(
        cluster=hpc, framework="vllm", model="org/model.v1", backend="local", backend_config=config
    )
    served = (f"demo-model@{seeded.cluster.name}/{seeded.endpoint.framework}", "org/model.v1@local-hpc/vllm")
    with e2e_gateway(tmp_path_factory) as url:
        spec = httpx.get(url + OPENAPI_PATH, timeout=10).json()
        outcome = schemathesis_run(url, api_key=seeded.key, cases=3, served=served, seed=1)
    print(outcome.summary())
    assert "not_a_server_error" in CHECKS and "response_schema_conformance" in CHECKS
    assert outcome.server_errors == 0
    assert outcome.returncode == 0, "a check failed: see the Schemathesis report above"
    documented = {f"{method.upper()} {path}" for path, item in spec["paths"].items() for method in item}
    assert documented <= set(outcome.statuses), "every operation is fuzzed"
    inference = [name for name in documented if name.startswith("POST") and "api-keys" not in name]
    for name in inference:
        # The served model was drawn often enough to get through routing to the model server and back.
        assert outcome.statuses[name][200] > 0, (name, outcome.statuses[name])
    # Some went through the compute function (streams through the relay too, in the longer `make fuzz`).
    assert usage_row(endpoint=hpc_endpoint, status_code=200)


def test_compute_streams_hold_with_the_default_worker_count_without_redis(
    tmp_path: Path, model_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by the fuzz run: with no REDIS_URL the relay is per worker, yet gunicorn started one worker per CPU,
    so a compute task's relay POSTs could reach a worker other than the one holding its client (502)."""
    seeded = seed(model_server)
    vllm = urlsplit(model_server)
    hpc = Cluster.objects.create(name="local-hpc")
    config = {"vllm": {"host": vllm.hostname, "port": vllm.port}, "workers": 4}
    Endpoint.objects.create(cluster=hpc, framework="vllm", model="demo-model", backend="local", backend_config=config)
    monkeypatch.delenv("GATEWAY_WORKERS", raising=False)  # the deployed default, not a test's choice
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        "DATABASE_URL": server_database_url(),
        "REDIS_URL": "",
        "DATA_DIR": str(tmp_path),
        "RELAY_PUBLIC_URL": url,
        "USAGE_FLUSH_SECONDS": "0.05",
    }
    gunicorn = str(Path(sys.executable).with_name("gunicorn"))
    args = [gunicorn, "-c", "deploy/gunicorn.conf.py", "--bind", f"127.0.0.1:{port}"]
    body = {"model": "demo-model", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "stream": True}
    with running(args, f"{url}/resource_server/health", env):
        outcomes = []
        for _ in range(30):
            # A new connection each time, as separate clients make: each may reach any worker.
            answer = httpx.post(
                f"{url}/resource_server/local-hpc/vllm/v1/chat/completions", json=body, headers=seeded.auth, timeout=30
            )
            outcomes.append((answer.status_code, '"error"' in answer.text, answer.text.rstrip().endswith("[DONE]")))
    assert outcomes == [(200, False, True)] * 30


# About 1.8 MB each, which arrive from the model server in many reads.
LARGE_ANSWERS = {
    # 4 prompts x 128 answers x 480 words (the session's model server has a context of 512 tokens)
    "completions": {"prompt": ["Once", "upon", "a", "time"], "n": 128, "max_tokens": 480, "ignore_eos": True},
    "embeddings": {"input": [f"text number {index}" for index in range(6000)]},
}


@pytest.mark.parametrize("route", sorted(LARGE_ANSWERS))
def test_an_answer_larger_than_the_upstream_read_buffer_arrives_whole(
    tmp_path_factory: Any, model_server: str, route: str
) -> None:
    """Found by the fuzz run: a JSON answer over 512 KiB hung until the upstream read timeout (600 s)."""
    seeded = seed(model_server)
    body = {"model": "demo-model", **LARGE_ANSWERS[route]}
    with e2e_gateway(tmp_path_factory) as url:
        answer = httpx.post(f"{url}/resource_server/v1/{route}", json=body, headers=seeded.auth, timeout=30)
    assert answer.status_code == 200, answer.text[:500]
    assert len(answer.content) > 1024 * 1024
    items = answer.json()["choices" if route == "completions" else "data"]
    assert [item["index"] for item in items] == list(range(4 * 128 if route == "completions" else 6000))
