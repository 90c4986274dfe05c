"""The dispatch stage: candidates in order, the next one only when the request never reached a model server."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest
from asgiref.sync import sync_to_async
from django.conf import settings
from django.test import AsyncClient

from gateway.asgi import http_application
from resource_server.bootstrap import Runtime, runtime
from resource_server.models import Cluster, Endpoint, RequestLog
from resource_server.status.base import State
from tests.conftest import Seeded
from tests.gateway.test_asgi import call
from tests.servers import fake_model_server, fake_stats, free_port
from tests.status import scripted_status

pytestmark = pytest.mark.django_db(transaction=True)

CHAT_PATH = "/resource_server/v1/chat/completions"
CHAT = {"model": "demo-model", "messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 5}


async def _endpoint_before(seeded: Seeded, base_url: str) -> Endpoint:
    """A second endpoint for demo-model, on a cluster that sorts before the seeded one (so it is tried first)."""
    cluster = await Cluster.objects.acreate(name="aurora", description="tried first")
    return await Endpoint.objects.acreate(
        cluster=cluster, framework="vllm", model="demo-model", backend="direct", backend_config={"base_url": base_url}
    )


async def _row(request_id: str) -> RequestLog:
    assert await sync_to_async(runtime().usage_sink.flush)(timeout=10)
    return await RequestLog.objects.aget(request_id=request_id)


def _served(model_server: str) -> int:
    requests = fake_stats(model_server)["requests"]
    assert isinstance(requests, dict)
    return sum(requests.values())


async def _post(door: str, seeded: Seeded, body: dict[str, Any]) -> tuple[int, dict[str, str], bytes]:
    raw = orjson.dumps(body)
    if door == "ninja":
        response = await AsyncClient().post(CHAT_PATH, raw, content_type="application/json", headers=seeded.auth)
        content = b"".join([chunk async for chunk in response]) if response.streaming else response.content
        return response.status_code, {name.lower(): value for name, value in response.headers.items()}, content
    answer = await call(http_application, CHAT_PATH, raw, headers=seeded.auth)
    headers = {name.decode().lower(): value.decode() for name, value in answer.headers}
    return answer.status, headers, answer.body


@pytest.mark.parametrize("door", ["lean", "ninja"])
@pytest.mark.parametrize("streamed", [False, True])
async def test_an_unreachable_first_endpoint_is_skipped_for_the_next(
    seeded: Seeded, model_server: str, door: str, streamed: bool
) -> None:
    await _endpoint_before(seeded, f"http://127.0.0.1:{free_port()}/v1")  # nothing listens there
    status, headers, content = await _post(door, seeded, {**CHAT, "stream": streamed})
    assert status == 200, content
    if streamed:
        assert content.endswith(b"data: [DONE]\n\n") and b'"error"' not in content
    else:
        assert orjson.loads(content)["choices"]
    row = await _row(headers["x-gateway-request-id"])
    assert (row.status_code, row.endpoint_id, row.streamed) == (200, seeded.endpoint.pk, streamed)


@pytest.mark.parametrize("streamed", [False, True])
async def test_a_refusal_of_the_model_server_is_not_tried_on_the_next_endpoint(
    seeded: Seeded, model_server: str, streamed: bool
) -> None:
    # The same fake model server under another name: both endpoints would answer.
    first = await _endpoint_before(seeded, model_server.replace("127.0.0.1", "localhost"))
    before = _served(model_server)
    body = {**CHAT, "stream": streamed, "fake_vllm": {"status": 400, "message": "bad sampling parameters"}}
    status, headers, content = await _post("lean", seeded, body)
    assert status == 400, content
    assert orjson.loads(content)["error"]["message"] == "bad sampling parameters"
    assert _served(model_server) == before + 1, "the request ran once, on the first endpoint only"
    row = await _row(headers["x-gateway-request-id"])
    assert (row.status_code, row.endpoint_id) == (400, first.pk)


async def test_when_every_candidate_is_unreachable_the_last_error_is_the_answer(seeded: Seeded) -> None:
    await _endpoint_before(seeded, f"http://127.0.0.1:{free_port()}/v1")
    seeded.endpoint.backend_config = {"base_url": f"http://127.0.0.1:{free_port()}/v1"}
    await seeded.endpoint.asave()
    status, headers, content = await _post("lean", seeded, CHAT)
    assert status == 503
    assert orjson.loads(content)["error"]["code"] == "upstream_unreachable"
    row = await _row(headers["x-gateway-request-id"])
    assert (row.status_code, row.endpoint_id) == (503, seeded.endpoint.pk)


def _route(cluster: str, endpoint: int, reason: str) -> str:
    return f"cluster={cluster}; endpoint={endpoint}; reason={reason}"


@pytest.mark.parametrize("door", ["lean", "ninja"])
@pytest.mark.parametrize("streamed", [False, True])
async def test_every_answer_names_its_route(seeded: Seeded, door: str, streamed: bool) -> None:
    status, headers, content = await _post(door, seeded, {**CHAT, "stream": streamed})
    assert status == 200, content
    route = _route("polaris", seeded.endpoint.pk, "unknown,only")
    assert headers["x-gateway-route"] == route
    assert (await _row(headers["x-gateway-request-id"])).gateway_route == route

    status, headers, content = await _post(door, seeded, {**CHAT, "fake_vllm": {"status": 400, "message": "no"}})
    assert (status, headers["x-gateway-route"]) == (400, route), "an error answer names it too"


@pytest.mark.parametrize("streamed", [False, True])
async def test_a_model_server_answering_503_hands_the_request_to_the_next_endpoint(
    seeded: Seeded, model_server: str, streamed: bool
) -> None:
    with fake_model_server("--model=demo-model", "--error-rate=1", "--error-status=503") as unavailable:
        first = await _endpoint_before(seeded, unavailable)
        before = _served(model_server)
        status, headers, content = await _post("lean", seeded, {**CHAT, "stream": streamed})
        refused = fake_stats(unavailable)["requests"]["/v1/chat/completions"]  # type: ignore[index]
    assert status == 200, content
    assert (refused, _served(model_server)) == (1, before + 1)
    route = _route("polaris", seeded.endpoint.pk, f"unknown,failover_from={first.pk}")
    assert headers["x-gateway-route"] == route
    row = await _row(headers["x-gateway-request-id"])
    assert (row.status_code, row.endpoint_id, row.gateway_route) == (200, seeded.endpoint.pk, route)


async def test_no_more_than_route_max_tries_endpoints_are_tried(
    seeded: Seeded, model_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(settings.GATEWAY, "ROUTE_MAX_TRIES", 2)
    dead = []
    for name in ("aurora", "crux", "edith"):  # each before polaris in the registry's order
        cluster = await Cluster.objects.acreate(name=name)
        dead.append(
            await Endpoint.objects.acreate(
                cluster=cluster,
                model="demo-model",
                backend="direct",
                backend_config={"base_url": f"http://127.0.0.1:{free_port()}/v1"},
            )
        )
    before = _served(model_server)
    status, headers, content = await _post("lean", seeded, CHAT)
    assert status == 503
    assert orjson.loads(content)["error"]["code"] == "upstream_unreachable"
    assert _served(model_server) == before, "the fourth candidate, which would answer, is never tried"
    route = _route("crux", dead[1].pk, f"unknown,failover_from={dead[0].pk}")
    assert headers["x-gateway-route"] == route
    row = await _row(headers["x-gateway-request-id"])
    assert (row.endpoint_id, row.gateway_route) == (dead[1].pk, route)
    assert runtime().in_flight.mine() == {}


async def test_an_endpoint_found_offline_is_not_sent_the_request(
    seeded: Seeded, model_server: str, runtime: Runtime
) -> None:
    status = scripted_status(runtime)
    # The same model server under another name: it would answer, but its endpoint was found offline.
    offline = await _endpoint_before(seeded, model_server.replace("127.0.0.1", "localhost"))
    status.set(offline.pk, State.OFFLINE)
    status.set(seeded.endpoint.pk, State.LIVE)
    before = _served(model_server)
    code, headers, content = await _post("lean", seeded, CHAT)
    assert code == 200, content
    assert _served(model_server) == before + 1
    assert headers["x-gateway-route"] == _route("polaris", seeded.endpoint.pk, "live,best_state")


async def test_a_stream_is_never_failed_over_once_its_first_event_is_sent(seeded: Seeded, model_server: str) -> None:
    await _endpoint_before(seeded, model_server.replace("127.0.0.1", "localhost"))
    before = _served(model_server)
    body = {**CHAT, "stream": True, "fake_vllm": {"fail_after_tokens": 2}}
    status, headers, content = await _post("lean", seeded, body)
    assert status == 200
    assert b'"error"' in content and content.endswith(b"data: [DONE]\n\n")
    assert _served(model_server) == before + 1, "cut after its first events: not sent anywhere else"
    assert "failover_from" not in headers["x-gateway-route"]


async def test_least_loaded_spreads_concurrent_requests_over_live_endpoints(
    seeded: Seeded, model_server: str, runtime: Runtime
) -> None:
    status = scripted_status(runtime)
    other = await _endpoint_before(seeded, model_server.replace("127.0.0.1", "localhost"))
    await Endpoint.objects.filter(pk=seeded.endpoint.pk).aupdate(preference=1)
    for endpoint_id in (other.pk, seeded.endpoint.pk):
        status.set(endpoint_id, State.LIVE)
    # Slow answers, so that all four are in flight at once.
    body = {**CHAT, "fake_vllm": {"latency": 2.0}}
    answers = await asyncio.gather(*(_post("lean", seeded, body) for _ in range(4)))
    routes = sorted(headers["x-gateway-route"] for _, headers, _ in answers)
    assert routes == [
        _route("aurora", other.pk, "live,least_loaded"),
        _route("aurora", other.pk, "live,least_loaded"),
        _route("polaris", seeded.endpoint.pk, "live,preferred"),
        _route("polaris", seeded.endpoint.pk, "live,preferred"),
    ]
