"""The dispatch stage: candidates in order, the next one only when the request never reached a model server."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from asgiref.sync import sync_to_async
from django.test import AsyncClient

from gateway.asgi import http_application
from resource_server.bootstrap import runtime
from resource_server.models import Cluster, Endpoint, RequestLog
from tests.conftest import Seeded
from tests.gateway.test_asgi import call
from tests.servers import fake_stats, free_port

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
