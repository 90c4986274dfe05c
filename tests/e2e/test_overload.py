"""Admission control under load, against gunicorn as deployed and the fake model server.

A closed loop (each client waits for its answer before it asks again) cannot overload a worker: it holds
at most one request per client. Up to MAX_PENDING_PER_WORKER such clients are queued and served, however
slow or busy the worker's core is; only more than that is refused.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import httpx
import orjson
import pytest

from tests.conftest import Seeded, seed
from tests.e2e.conftest import e2e_gateway
from tests.proc import worker_pid
from tests.servers import ROOT

pytestmark = pytest.mark.django_db(transaction=True)

PER_CLIENT = 8  # requests per client in the closed loop at the pending bound: 2,048 in all

CHAT_PATH = "/resource_server/v1/chat/completions"
CHAT = {"model": "demo-model", "messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 16}
# A bound on a load generator job that never comes near it, however slow the machine: a job that reaches it hangs.
LOADGEN_DEADLINE_SECONDS = 300


@pytest.fixture(scope="module")
def gateway_url(django_db_setup: None, model_server: str, tmp_path_factory: Any) -> Iterator[str]:
    # Keys and routes cached as in production: the per-request cost is the warm path's.
    with e2e_gateway(tmp_path_factory, API_KEY_CACHE_SECONDS="30", ROUTING_CACHE_SECONDS="5") as url:
        yield url


def _wait_until_served(url: str, seeded: Seeded) -> None:
    """Until the worker's routing table has the test's model (it was loaded before the rows existed)."""
    deadline = time.monotonic() + 20
    while True:
        response = httpx.post(url + CHAT_PATH, json=CHAT, headers=seeded.auth, timeout=10)
        if response.status_code == 200:
            return
        assert time.monotonic() < deadline, response.text
        time.sleep(0.25)


def _closed_loop(
    url: str, seeded: Seeded, *, concurrency: int, cpus: set[int], length: dict[str, float], body: dict[str, Any] = CHAT
) -> dict[str, Any]:
    """The benchmarks' load generator (a lean keep-alive client) running one closed-loop job, as long as
    `length` says: {"duration": seconds, "warmup": seconds} (answers within that window are counted), or
    {"per_client": n} (every client asks n times, and every answer is counted)."""
    parts = urlsplit(url)
    job = {
        "kind": "closed",
        "host": parts.hostname,
        "port": parts.port,
        "path": CHAT_PATH,
        "body": body,
        "authorizations": [seeded.auth["Authorization"]],
        "concurrency": concurrency,
        **length,
        "deadline": LOADGEN_DEADLINE_SECONDS,
    }
    loadgen = subprocess.run(
        [sys.executable, "-m", "benchmarks.loadgen"],
        input=orjson.dumps(job) + b"\n",
        capture_output=True,
        cwd=ROOT,
        timeout=LOADGEN_DEADLINE_SECONDS + 30,
        check=True,
        preexec_fn=lambda: os.sched_setaffinity(0, cpus),
    )
    result: dict[str, Any] = orjson.loads(loadgen.stdout)
    assert "failed" not in result, result
    return result


@pytest.fixture
def patient_seeded(transactional_db: None, model_server: str) -> Seeded:
    """The seeded endpoint, waiting for the model server as long as a starved worker may need: on a core shared
    with busy processes, a request can wait seconds for its answer to be read, and the seeded 5 s would turn
    that wait into a 504 (or 503), which is not what the test is about."""
    return seed(model_server, wait_seconds=120)


def test_256_clients_in_a_closed_loop_on_a_contended_core_are_served_without_refusals(
    gateway_url: str, patient_seeded: Seeded
) -> None:
    seeded = patient_seeded
    _wait_until_served(gateway_url, seeded)
    worker = worker_pid(gateway_url)
    cpus = sorted(os.sched_getaffinity(0))
    core = cpus[0]
    others = set(cpus[1:]) or {core}
    # Three processes as busy as can be on the worker's core: the worker gets about a quarter of it, and
    # waits for its turn between time slices, as on a crowded host.
    spinners = [
        subprocess.Popen([sys.executable, "-c", "while True: pass"], preexec_fn=lambda: os.sched_setaffinity(0, {core}))
        for _ in range(3)
    ]
    worker_cpus = os.sched_getaffinity(worker)
    try:
        os.sched_setaffinity(worker, {core})
        # Every client asks PER_CLIENT times, however long that takes on the contended core: each of those
        # requests must be answered 200, whatever the machine's load (a count of answers within a window
        # of time would depend on it).
        result = _closed_loop(gateway_url, seeded, concurrency=256, cpus=others, length={"per_client": PER_CLIENT})
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()
        os.sched_setaffinity(worker, worker_cpus)
    assert result["errors"] == {}
    assert result["statuses"] == {"200": 256 * PER_CLIENT}


@pytest.fixture(scope="module")
def small_gateway_url(django_db_setup: None, model_server: str, tmp_path_factory: Any) -> Iterator[str]:
    with e2e_gateway(
        tmp_path_factory, API_KEY_CACHE_SECONDS="30", ROUTING_CACHE_SECONDS="5", MAX_PENDING_PER_WORKER="8"
    ) as url:
        yield url


def test_clients_beyond_the_pending_bound_are_refused_with_503_and_the_rest_served(
    small_gateway_url: str, seeded: Seeded
) -> None:
    _wait_until_served(small_gateway_url, seeded)
    slow = {**CHAT, "fake_vllm": {"latency": 0.2}}
    result = _closed_loop(
        small_gateway_url,
        seeded,
        concurrency=32,
        cpus=os.sched_getaffinity(0),
        length={"duration": 2.0, "warmup": 1.0},
        body=slow,
    )
    assert result["errors"] == {}
    assert set(result["statuses"]) == {"200", "503"}, result["statuses"]
    # 8 held at a time, 0.2 s each, over 2 s: about 80 answered; the other clients were refused meanwhile.
    assert result["statuses"]["503"] > result["statuses"]["200"] >= 8
