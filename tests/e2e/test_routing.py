"""End to end: one model on two clusters, a model server killed, and a stream held for a model that is down.

The gateway as deployed (gunicorn + uvicorn worker) on the tests' database, fake vLLM servers as processes,
driven with the stock `openai` client and raw HTTP.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from resource_server.models import Cluster, Endpoint
from tests.conftest import Seeded, seed
from tests.e2e.conftest import e2e_gateway, usage_row
from tests.servers import free_port, running

pytestmark = pytest.mark.django_db(transaction=True)

HELLO = [{"role": "user", "content": "Hello there"}]


def _client(url: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/resource_server/v1", api_key=key, max_retries=0, timeout=60)


def _model_server_args(port: int) -> list[str]:
    return [sys.executable, "-m", "fakes.model_server", "--port", str(port), "--model=demo-model"]


def _route(cluster: str, endpoint: int, reason: str) -> str:
    return f"cluster={cluster}; endpoint={endpoint}; reason={reason}"


@pytest.fixture(scope="module")
def unprobed_gateway(django_db_setup: None, tmp_path_factory: Any) -> Iterator[str]:
    """Health checks off: a model server that dies is found only by the request sent to it."""
    with e2e_gateway(tmp_path_factory, HEALTH_PROBE_SECONDS="0") as url:
        yield url


@pytest.fixture(scope="module")
def probing_gateway(django_db_setup: None, tmp_path_factory: Any) -> Iterator[str]:
    """Health checks (and a held stream's looks) every 0.2 s."""
    with e2e_gateway(tmp_path_factory, HEALTH_PROBE_SECONDS="0.2", MAX_WAIT_PROGRESS_SECONDS="0.2") as url:
        yield url


def test_when_a_model_server_is_killed_the_same_model_on_another_cluster_answers(
    transactional_db: None, unprobed_gateway: str
) -> None:
    first_port, second_port = free_port(), free_port()
    with (
        running(_model_server_args(first_port), f"http://127.0.0.1:{first_port}/health") as first_server,
        running(_model_server_args(second_port), f"http://127.0.0.1:{second_port}/health"),
    ):
        seeded = seed(f"http://127.0.0.1:{first_port}/v1", username="katherine@anl.gov")
        Endpoint.objects.filter(pk=seeded.endpoint.pk).update(preference=10)  # polaris first while it answers
        sophia = Cluster.objects.create(name="sophia")
        second = Endpoint.objects.create(
            cluster=sophia,
            model="demo-model",
            backend="direct",
            backend_config={"base_url": f"http://127.0.0.1:{second_port}/v1", "connect_timeout": 5},
        )
        client = _client(unprobed_gateway, seeded.key)
        before = client.chat.completions.with_raw_response.create(model="demo-model", messages=HELLO, max_tokens=5)
        assert before.headers["x-gateway-route"] == _route("polaris", seeded.endpoint.pk, "unknown,preferred")

        first_server.kill()
        first_server.wait()

        raw = client.chat.completions.with_raw_response.create(model="demo-model", messages=HELLO, max_tokens=5)
        reply = raw.parse()  # no exception: the client saw no error
        assert reply.choices[0].message.content
        failed_over = _route("sophia", second.pk, f"unknown,failover_from={seeded.endpoint.pk}")
        assert raw.headers["x-gateway-route"] == failed_over
        row = usage_row(request_id=raw.headers["x-gateway-request-id"])
        assert (row.status_code, row.endpoint_id, row.gateway_route) == (200, second.pk, failed_over)

        streamed = client.chat.completions.with_raw_response.create(
            model="demo-model", messages=HELLO, max_tokens=5, stream=True
        )
        assert streamed.headers["x-gateway-route"] == failed_over
        text = "".join(chunk.choices[0].delta.content or "" for chunk in streamed.parse() if chunk.choices)
        assert text
        row = usage_row(request_id=streamed.headers["x-gateway-request-id"])
        assert (row.status_code, row.streamed, row.gateway_route) == (200, True, failed_over)


def _until_found_offline(url: str, seeded: Seeded) -> None:
    """Until the gateway's health checks have found the endpoint down (before, it is tried, and refused)."""
    deadline = time.monotonic() + 30
    while True:
        answer = httpx.post(
            f"{url}/resource_server/v1/chat/completions",
            json={"model": "demo-model", "messages": HELLO},
            headers=seeded.auth,
            timeout=10,
        )
        assert answer.status_code == 503, answer.text
        if answer.json()["error"]["code"] == "model_offline":
            return
        assert time.monotonic() < deadline, "the gateway did not find the endpoint offline within 30 s"
        time.sleep(0.1)


def test_a_held_stream_reaches_the_stock_client_as_the_models_events_once_it_is_up(
    transactional_db: None, probing_gateway: str
) -> None:
    port = free_port()
    seeded = seed(f"http://127.0.0.1:{port}/v1", username="dorothy@anl.gov")  # nothing listens there yet
    _until_found_offline(probing_gateway, seeded)
    held = _route("polaris", seeded.endpoint.pk, "offline,only,held")
    served = _route("polaris", seeded.endpoint.pk, "live,only,held")
    wait = {"X-Gateway-Max-Wait": "120"}

    with httpx.Client(timeout=60) as http:
        body = {"model": "demo-model", "messages": HELLO, "max_tokens": 5, "stream": True}
        request = http.build_request(
            "POST",
            f"{probing_gateway}/resource_server/v1/chat/completions",
            json=body,
            headers={**seeded.auth, **wait},
        )
        raw_stream = http.send(request, stream=True)
        lines = raw_stream.iter_lines()
        assert raw_stream.status_code == 200
        assert next(lines) == ": status=offline", "the answer starts at once, with the model's state"

        # The stock client: its call returns with the answer's head, while the model is still down.
        stream = _client(probing_gateway, seeded.key).chat.completions.with_raw_response.create(
            model="demo-model", messages=HELLO, max_tokens=5, stream=True, extra_headers=wait
        )
        assert stream.headers["x-gateway-route"] == held

        with running(_model_server_args(port), f"http://127.0.0.1:{port}/health"):
            chunks = list(stream.parse())  # the comments before the events are ignored by the client
            rest = list(lines)
        raw_stream.close()

    assert chunks and all(chunk.object == "chat.completion.chunk" for chunk in chunks)
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    comments = [line for line in rest if line.startswith(":")]
    assert set(comments[:-1]) <= {": status=offline"}
    assert comments[-1] == f": x-gateway-route: {served}"
    data = [line for line in rest if line.startswith("data: ")]
    assert data[-1] == "data: [DONE]" and not any('"error"' in line for line in data)
    for request_id in (raw_stream.headers["x-gateway-request-id"], stream.headers["x-gateway-request-id"]):
        row = usage_row(request_id=request_id)
        assert (row.status_code, row.streamed, row.gateway_route) == (200, True, served)


def test_a_held_stream_whose_wait_ends_is_an_error_the_stock_client_raises(
    transactional_db: None, probing_gateway: str
) -> None:
    seeded = seed(f"http://127.0.0.1:{free_port()}/v1", username="mary@anl.gov")  # nothing will listen there
    _until_found_offline(probing_gateway, seeded)
    stream = _client(probing_gateway, seeded.key).chat.completions.create(
        model="demo-model", messages=HELLO, stream=True, extra_headers={"X-Gateway-Max-Wait": "0.5"}
    )
    with pytest.raises(openai.APIError) as ended:
        list(stream)
    assert isinstance(ended.value.body, dict)
    assert (ended.value.body["code"], ended.value.body["status"]) == ("model_offline", "offline")
    assert "did not answer within the 0.5 s you asked to wait" in ended.value.message
