"""A PostgreSQL outage, as the gateway's workers live through it.

Usage records wait in memory, then in a spool file across a restart. Keys, Globus users and routes a
worker knows keep being served during the outage, and every worker reads the database again within 5 s
of its return, without a restart. The gateway reaches PostgreSQL through a TCP proxy that the test can
cut, which is what an outage looks like from the gateway: connections refused and open ones dropped; or
stall, which is a database that stops answering.
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
from django.db import connection

from fakes.globus import DEMO_CLIENT_ID, DEMO_CLIENT_SECRET
from resource_server.models import Endpoint
from resource_server.services.api_keys import api_key_create
from tests.conftest import seed
from tests.integration.conftest import CHAT, chat, gateway_env, wait_for_rows
from tests.proc import worker_answering, worker_pids
from tests.servers import fake_globus_server, gateway_server
from tests.tcp_proxy import TcpProxy

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(connection.vendor != "postgresql", reason="needs DATABASE_URL pointing at PostgreSQL"),
]


def test_usage_written_during_an_outage_arrives_when_the_database_returns(
    proxy: TcpProxy, model_server: str, tmp_path: Path
) -> None:
    seeded = seed(model_server)
    with gateway_server(gateway_env(proxy, tmp_path)) as url:
        assert wait_for_rows([chat(url, seeded.auth)], timeout=10)
        proxy.cut()
        during = [chat(url, seeded.auth), chat(url, seeded.auth)]
        assert not wait_for_rows(during, timeout=1), "rows cannot be written while the database is away"
        proxy.restore()
        assert wait_for_rows(during, timeout=40)


def test_usage_left_at_shutdown_is_spooled_and_replayed_by_the_next_start(
    proxy: TcpProxy, model_server: str, tmp_path: Path
) -> None:
    seeded = seed(model_server)
    with gateway_server(gateway_env(proxy, tmp_path)) as url:
        chat(url, seeded.auth)
        proxy.cut()
        stranded = chat(url, seeded.auth)
    assert list((tmp_path / "usage-spool").glob("usage-*.jsonl")), "unwritten records must be spooled at shutdown"
    proxy.restore()
    with gateway_server(gateway_env(proxy, tmp_path)) as url:
        fresh = chat(url, seeded.auth)
        assert wait_for_rows([stranded, fresh], timeout=20)
    assert not list((tmp_path / "usage-spool").iterdir())


def _until_every_worker_answered(
    url: str, workers: set[int], auth: dict[str, str], body: dict[str, object], deadline: float
) -> dict[int, list[httpx.Response]]:
    """Requests on new connections until each worker has answered 200 (or the deadline), by worker."""
    answers: dict[int, list[httpx.Response]] = {pid: [] for pid in workers}
    while time.monotonic() < deadline and not all(
        any(answer.status_code == 200 for answer in worker_answers) for worker_answers in answers.values()
    ):
        with httpx.Client(timeout=20) as client:
            response = client.post(f"{url}/resource_server/v1/chat/completions", json=body, headers=auth)
            answers[worker_answering(response, workers)].append(response)
    return answers


def test_cached_keys_and_routes_are_served_through_an_outage_on_every_worker(
    proxy: TcpProxy, model_server: str, tmp_path: Path
) -> None:
    seeded = seed(model_server)
    # Both caches expire within the outage: what is served then is what the workers knew before it.
    env = gateway_env(proxy, tmp_path) | {"ROUTING_CACHE_SECONDS": "1", "API_KEY_CACHE_SECONDS": "1"}
    with gateway_server(env, workers=2) as url:
        workers = worker_pids(url)
        assert len(workers) == 2
        warm = _until_every_worker_answered(url, workers, seeded.auth, CHAT, time.monotonic() + 60)
        assert all(response.status_code == 200 for answers in warm.values() for response in answers)
        proxy.cut()
        time.sleep(3)
        during = _until_every_worker_answered(url, workers, seeded.auth, CHAT, time.monotonic() + 30)
        refused = [(pid, r.status_code, r.text) for pid, answers in during.items() for r in answers if r.is_error]
        assert not refused, "a key and a route used before the outage must keep being served during it"
        # Django's side (the ninja views) too: the same key, the same routing table.
        models = httpx.get(f"{url}/resource_server/v1/models", headers=seeded.auth, timeout=20)
        assert models.status_code == 200, models.text
        assert [model["id"] for model in models.json()["data"]] == ["demo-model"]
        request_ids = [response.headers["x-gateway-request-id"] for answers in during.values() for response in answers]
        assert not wait_for_rows(request_ids, timeout=1), "rows cannot be written while the database is away"
        proxy.restore()
        assert wait_for_rows(request_ids, timeout=40)


def test_every_worker_reads_the_database_again_within_5_s_of_its_return(
    proxy: TcpProxy, model_server: str, tmp_path: Path
) -> None:
    seeded = seed(model_server)
    env = gateway_env(proxy, tmp_path) | {"ROUTING_CACHE_SECONDS": "1", "API_KEY_CACHE_SECONDS": "1"}
    with gateway_server(env, workers=2) as url:
        workers = worker_pids(url)
        assert len(workers) == 2
        warm = _until_every_worker_answered(url, workers, seeded.auth, CHAT, time.monotonic() + 60)
        assert all(answers for answers in warm.values())
        proxy.cut()  # drops the connections every worker holds open
        time.sleep(3)  # long enough for each worker to try its routing table again and fail
        proxy.restore()
        back = time.monotonic()
        # Only the database knows these: a key created and a model added after the outage.
        _, new_key = api_key_create(owner=seeded.user, name="made after the outage")
        Endpoint.objects.create(
            cluster=seeded.cluster,
            framework="vllm",
            model="org/model.v1",
            backend="direct",
            backend_config={"base_url": model_server, "read_timeout": 5},
        )
        body = {**CHAT, "model": "org/model.v1"}
        answers = _until_every_worker_answered(url, workers, {"Authorization": f"Bearer {new_key}"}, body, back + 5)
        late = {pid: [r.status_code for r in got] for pid, got in answers.items() if all(r.is_error for r in got)}
        assert not late, f"workers still failing 5 s after the database returned: {late}"


def test_a_globus_user_checked_before_the_outage_keeps_being_served_during_it(
    proxy: TcpProxy, model_server: str, tmp_path: Path
) -> None:
    seed(model_server)
    with fake_globus_server() as globus_url:
        token = httpx.post(
            f"{globus_url}fake/tokens", json={"identity": {"username": "ada@anl.gov", "name": "Ada Lovelace"}}
        ).json()["token"]
        env = gateway_env(proxy, tmp_path) | {
            "GLOBUS_SDK_SERVICE_URL_AUTH": globus_url,
            "GLOBUS_SDK_SERVICE_URL_GROUPS": globus_url,
            "GLOBUS_CLIENT_ID": DEMO_CLIENT_ID,
            "GLOBUS_CLIENT_SECRET": DEMO_CLIENT_SECRET,
            # The token is checked again at Globus during the outage; only the database is away.
            "GLOBUS_TOKEN_CACHE_SECONDS": "1",
        }
        with gateway_server(env) as url:
            assert wait_for_rows([chat(url, {"Authorization": f"Bearer {token}"})], timeout=10)
            proxy.cut()
            time.sleep(2)
            during = chat(url, {"Authorization": f"Bearer {token}"})
            proxy.restore()
            assert wait_for_rows([during], timeout=40)


def test_a_database_that_stops_answering_does_not_hold_requests_with_cached_keys_and_routes(
    proxy: TcpProxy, model_server: str, tmp_path: Path
) -> None:
    seeded = seed(model_server)
    env = gateway_env(proxy, tmp_path) | {"ROUTING_CACHE_SECONDS": "1", "API_KEY_CACHE_SECONDS": "1"}
    with gateway_server(env, workers=2) as url:
        workers = worker_pids(url)
        assert len(workers) == 2
        warm = _until_every_worker_answered(url, workers, seeded.auth, CHAT, time.monotonic() + 60)
        assert all(response.status_code == 200 for answers in warm.values() for response in answers)
        proxy.stall()
        time.sleep(2)  # both caches are past their lifetime: each worker asks the database, which never answers
        # Each request must be answered (a hung one fails with httpx's ReadTimeout after 20 s).
        during = _until_every_worker_answered(url, workers, seeded.auth, CHAT, time.monotonic() + 30)
        refused = [(pid, r.status_code, r.text) for pid, answers in during.items() for r in answers if r.is_error]
        assert not refused, "a stalled database must not hold or fail requests whose key and route are cached"
        request_ids = [response.headers["x-gateway-request-id"] for answers in during.values() for response in answers]
        proxy.resume()
        assert wait_for_rows(request_ids, timeout=40)
