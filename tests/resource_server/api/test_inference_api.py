"""The API through the full Django stack (middleware included), against the fake model server."""

from __future__ import annotations

import urllib.error
import urllib.request
from datetime import timedelta
from typing import Any

import orjson
import pytest
from asgiref.sync import sync_to_async
from django.conf import settings
from django.test import AsyncClient
from django.utils import timezone

from resource_server.bootstrap import runtime
from resource_server.models import Cluster, Endpoint, MaintenanceWindow, RequestLog
from tests.conftest import Seeded
from tests.servers import fake_stats, free_port

pytestmark = pytest.mark.django_db(transaction=True)

BASE = "/resource_server/v1"
CHAT = {"model": "demo-model", "messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 5}


async def post(path: str, body: Any, seeded: Seeded | None = None, **headers: str) -> Any:
    if seeded is not None:
        headers = {**seeded.auth, **headers}
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    return await AsyncClient().post(path, raw, content_type="application/json", headers=headers)


async def rows() -> list[RequestLog]:
    assert await sync_to_async(runtime().usage_sink.flush)(timeout=10)
    return [row async for row in RequestLog.objects.order_by("created_at")]


def error_of(response: Any) -> dict[str, Any]:
    body = orjson.loads(response.content)
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return dict(body["error"])


async def test_health_needs_no_credentials() -> None:
    response = await AsyncClient().get("/resource_server/health")
    assert response.status_code == 200
    assert orjson.loads(response.content) == {"status": "ok"}


@pytest.mark.parametrize(
    ("authorization", "code"),
    [
        (None, "missing_credentials"),
        ("Basic abc", "missing_credentials"),
        ("Bearer ", "missing_credentials"),
        ("Bearer igw_000000000000_unknownunknownunknownunknown", "invalid_api_key"),
        ("Bearer not-a-key", "invalid_api_key"),
    ],
)
async def test_bad_credentials_get_401_and_no_usage_row(seeded: Seeded, authorization: str | None, code: str) -> None:
    headers = {"Authorization": authorization} if authorization else {}
    response = await post(f"{BASE}/chat/completions", CHAT, **headers)
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"].startswith("Bearer ")
    assert error_of(response)["code"] == code
    assert await rows() == []


async def test_tampered_key_with_known_prefix_is_refused(seeded: Seeded) -> None:
    tampered = seeded.key[:-4] + ("AAAA" if not seeded.key.endswith("AAAA") else "BBBB")
    response = await post(f"{BASE}/chat/completions", CHAT, Authorization=f"Bearer {tampered}")
    assert response.status_code == 401


async def test_expired_and_revoked_keys_are_refused(seeded: Seeded) -> None:
    seeded.api_key.expires_at = timezone.now() - timedelta(seconds=1)
    await seeded.api_key.asave()
    response = await post(f"{BASE}/chat/completions", CHAT, seeded)
    assert (response.status_code, error_of(response)["code"]) == (401, "expired_api_key")

    seeded.api_key.expires_at = None
    seeded.api_key.revoked_at = timezone.now()
    await seeded.api_key.asave()
    # A fresh key row is needed to bypass the per-worker cache of the earlier (expired) lookup.
    response = await post(f"{BASE}/chat/completions", CHAT, seeded)
    assert response.status_code == 401
    assert await RequestLog.objects.acount() == 0


async def test_chat_completion_is_relayed_and_logged_with_upstream_usage(seeded: Seeded) -> None:
    response = await post(f"{BASE}/chat/completions", CHAT, seeded)
    assert response.status_code == 200, response.content
    body = orjson.loads(response.content)
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["finish_reason"] == "length"
    [row] = await rows()
    assert row.request_id == response.headers["X-Request-ID"]
    assert (row.user_id, row.api_key_id, row.endpoint_id) == (seeded.user.pk, seeded.api_key.pk, seeded.endpoint.pk)
    assert (row.status_code, row.error_code, row.streamed, row.route) == (200, "", False, "chat/completions")
    usage = body["usage"]
    assert (row.prompt_tokens, row.completion_tokens, row.total_tokens) == (
        usage["prompt_tokens"],
        usage["completion_tokens"],
        usage["total_tokens"],
    )
    assert 0 < row.completion_tokens <= 5
    assert row.request_body is None, "bodies are not stored unless LOG_REQUEST_BODIES is on"
    await seeded.api_key.arefresh_from_db()
    assert seeded.api_key.last_used_at is not None


async def test_unknown_fields_reach_the_model_server_unchanged(seeded: Seeded, model_server: str) -> None:
    extras = {"top_k": 5, "min_p": 0.1, "repetition_penalty": 1.1, "guided_json": {"type": "object"}}
    response = await post(f"{BASE}/chat/completions", {**CHAT, **extras}, seeded)
    assert response.status_code == 200
    forwarded = fake_stats(model_server)["last_request"]
    assert isinstance(forwarded, dict)
    assert {name: forwarded[name] for name in extras} == extras


async def test_completions_and_embeddings(seeded: Seeded) -> None:
    response = await post(
        f"{BASE}/completions", {"model": "demo-model", "prompt": "Once upon", "max_tokens": 3}, seeded
    )
    assert response.status_code == 200
    assert orjson.loads(response.content)["usage"]["completion_tokens"] == 3

    response = await post(f"{BASE}/embeddings", {"model": "demo-model", "input": ["a b", "c"]}, seeded)
    assert response.status_code == 200
    body = orjson.loads(response.content)
    assert [item["index"] for item in body["data"]] == [0, 1]
    logged = await rows()
    assert [row.route for row in logged] == ["completions", "embeddings"]
    assert logged[1].prompt_tokens == body["usage"]["prompt_tokens"]


def direct(model_server: str, path: str, body: dict[str, Any]) -> tuple[int, bytes]:
    """What the fake vLLM answers `body` itself, for comparison with what the gateway answers."""
    request = urllib.request.Request(
        f"{model_server}/{path}", orjson.dumps(body), {"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as refused:
        return refused.code, refused.read()


@pytest.mark.parametrize(
    "body",
    [
        {"model": "demo-model"},  # no messages
        {**CHAT, "messages": [{"content": "x"}]},
        {**CHAT, "temperature": -1},
        {**CHAT, "max_tokens": "ten"},
        {**CHAT, "stream": "maybe"},
    ],
)
async def test_what_the_model_server_refuses_reaches_the_client_in_its_own_words(
    seeded: Seeded, model_server: str, body: dict[str, Any]
) -> None:
    response = await post(f"{BASE}/chat/completions", body, seeded)
    status, content = direct(model_server, "chat/completions", body)
    assert (response.status_code, orjson.loads(response.content)) == (status, orjson.loads(content))
    assert status == 400 and error_of(response)["param"] is not None, "vLLM's param is kept"
    [row] = await rows()
    assert (row.status_code, row.error_code) == (400, "invalid_request")


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("completions", {"model": "demo-model", "prompt": "score me", "echo": True, "max_tokens": 0, "logprobs": 1}),
        ("completions", {"model": "demo-model", "prompt": "x", "max_tokens": 4.0}),
        ("completions", {"model": "demo-model", "prompt": "x", "max_tokens": 3, "seed": 1.0}),
        ("completions", {"model": "demo-model", "prompt": "x", "max_tokens": 3, "best_of": -1}),
        ("chat/completions", {**CHAT, "temperature": "0.5"}),
        ("chat/completions", {**CHAT, "logprobs": 1}),
    ],
)
async def test_what_vllm_accepts_reaches_the_model_server_unchanged(
    seeded: Seeded, model_server: str, path: str, body: dict[str, Any]
) -> None:
    response = await post(f"{BASE}/{path}", body, seeded)
    assert response.status_code == 200, response.content
    assert fake_stats(model_server)["last_request"] == body
    status, content = direct(model_server, path, body)
    mine, theirs = orjson.loads(response.content), orjson.loads(content)
    assert status == 200 and mine["choices"] == theirs["choices"] and mine["usage"] == theirs["usage"]


async def test_a_stream_asked_for_with_true_as_a_string_streams(seeded: Seeded) -> None:
    events = await read_events(await post(f"{BASE}/chat/completions", {**CHAT, "stream": "true"}, seeded))
    assert events[-1] == b"data: [DONE]"
    [row] = await rows()
    assert (row.streamed, row.status_code, row.completion_tokens) == (True, 200, len(events) - 2)


async def test_a_body_without_model_is_a_400_on_the_generic_path(seeded: Seeded) -> None:
    response = await post(f"{BASE}/chat/completions", {"messages": CHAT["messages"]}, seeded)
    assert response.status_code == 400
    error = error_of(response)
    assert (error["code"], error["param"]) == ("missing_required_parameter", "model")
    [row] = await rows()
    assert (row.status_code, row.model) == (400, "")


async def test_a_first_path_without_model_uses_the_only_model_it_serves(seeded: Seeded, model_server: str) -> None:
    path = "/resource_server/polaris/vllm/v1/chat/completions"
    response = await post(path, {"messages": CHAT["messages"], "max_tokens": 3}, seeded)
    assert response.status_code == 200
    assert orjson.loads(response.content)["model"] == "demo-model"
    assert fake_stats(model_server)["last_request"]["model"] == "demo-model"
    await Endpoint.objects.acreate(
        cluster=seeded.cluster, model="org/model.v1", backend="direct", backend_config={"base_url": model_server}
    )
    runtime().routing.forget()
    response = await post(path, {"messages": CHAT["messages"]}, seeded)
    assert response.status_code == 400
    assert "demo-model, org/model.v1" in error_of(response)["message"]
    assert [(row.status_code, row.model) for row in await rows()] == [(200, "demo-model"), (400, "")]


async def test_malformed_json_gets_400(seeded: Seeded) -> None:
    response = await post(f"{BASE}/chat/completions", b'{"model": ', seeded)
    assert response.status_code == 400
    assert error_of(response)["code"] == "invalid_json"


async def test_unknown_model_gets_404_model_not_found(seeded: Seeded) -> None:
    response = await post(f"{BASE}/chat/completions", {**CHAT, "model": "demo_model"}, seeded)
    assert response.status_code == 404
    error = error_of(response)
    assert (error["code"], error["param"]) == ("model_not_found", "model")
    [row] = await rows()
    assert (row.status_code, row.model, row.endpoint_id) == (404, "demo_model", None)


async def test_model_names_that_differ_by_dot_or_slash_stay_distinct(seeded: Seeded, model_server: str) -> None:
    await Endpoint.objects.acreate(
        cluster=seeded.cluster, model="org/model.v1", backend="direct", backend_config={"base_url": model_server}
    )
    for lookalike in ("org/model-v1", "org-model.v1", "org/model_v1", "org_model_v1"):
        response = await post(f"{BASE}/chat/completions", {**CHAT, "model": lookalike}, seeded)
        assert response.status_code == 404, lookalike
    response = await post(f"{BASE}/chat/completions", {**CHAT, "model": "org/model.v1"}, seeded)
    assert response.status_code == 200
    assert orjson.loads(response.content)["model"] == "org/model.v1"


async def test_prompt_longer_than_the_context_reaches_the_client_as_vllms_400(
    seeded: Seeded, model_server: str
) -> None:
    long_chat = {**CHAT, "messages": [{"role": "user", "content": "word " * 600}]}
    response = await post(f"{BASE}/chat/completions", long_chat, seeded)
    assert response.status_code == 400
    assert response.content == direct(model_server, "chat/completions", long_chat)[1]
    error = error_of(response)
    assert (error["type"], error["param"], error["code"]) == ("BadRequestError", "input_tokens", 400)
    assert "maximum context length is 512" in error["message"]
    [row] = await rows()
    assert row.error_code == "context_length_exceeded", "the row names it in the gateway's words"


async def test_upstream_500_becomes_502_without_internals(seeded: Seeded) -> None:
    body = {**CHAT, "fake_vllm": {"status": 500, "message": "CUDA error at /opt/vllm/worker.py:42"}}
    response = await post(f"{BASE}/chat/completions", body, seeded)
    assert response.status_code == 502
    assert "/opt/vllm" not in response.content.decode()
    [row] = await rows()
    assert (row.status_code, row.error_code) == (502, "upstream_error")


async def test_unreachable_model_server_gets_503_with_retry_after(seeded: Seeded) -> None:
    seeded.endpoint.backend_config = {"base_url": f"http://127.0.0.1:{free_port()}/v1"}
    await seeded.endpoint.asave()
    response = await post(f"{BASE}/chat/completions", CHAT, seeded)
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "5"
    assert error_of(response)["code"] == "upstream_unreachable"


async def test_model_server_timeout_gets_504(seeded: Seeded, model_server: str) -> None:
    seeded.endpoint.backend_config = {"base_url": model_server, "read_timeout": 0.5}
    await seeded.endpoint.asave()
    response = await post(f"{BASE}/chat/completions", {**CHAT, "fake_vllm": {"hang": True}}, seeded)
    assert response.status_code == 504
    [row] = await rows()
    assert (row.status_code, row.error_code) == (504, "upstream_timeout")


async def read_events(response: Any) -> list[bytes]:
    assert response["Content-Type"] == "text/event-stream"
    data = b"".join([chunk async for chunk in response.streaming_content])
    return [event for event in data.split(b"\n\n") if event]


async def test_stream_relays_every_chunk_then_done_and_hides_usage_not_asked_for(seeded: Seeded) -> None:
    response = await post(f"{BASE}/chat/completions", {**CHAT, "stream": True}, seeded)
    assert response.status_code == 200
    events = await read_events(response)
    assert events[-1] == b"data: [DONE]"
    chunks = [orjson.loads(event.removeprefix(b"data: ")) for event in events[:-1]]
    assert all(chunk["choices"] for chunk in chunks), "the usage-only chunk was not asked for"
    text = "".join(chunk["choices"][0]["delta"].get("content", "") for chunk in chunks)
    reference = orjson.loads((await post(f"{BASE}/chat/completions", CHAT, seeded)).content)
    assert text == reference["choices"][0]["message"]["content"]
    streamed_row = (await rows())[0]
    assert streamed_row.streamed
    assert (streamed_row.prompt_tokens, streamed_row.completion_tokens) == (
        reference["usage"]["prompt_tokens"],
        reference["usage"]["completion_tokens"],
    )
    assert streamed_row.time_to_first_token_ms is not None


async def test_stream_keeps_the_usage_chunk_when_asked(seeded: Seeded, model_server: str) -> None:
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    events = await read_events(await post(f"{BASE}/chat/completions", body, seeded))
    last = orjson.loads(events[-2].removeprefix(b"data: "))
    assert last["choices"] == []
    token_chunks = [event for event in events[:-2] if b'"content":""' not in event]
    assert last["usage"]["completion_tokens"] == len(token_chunks)
    assert (await rows())[0].completion_tokens == len(token_chunks)


async def test_stream_always_asks_upstream_for_usage_on_every_chunk(seeded: Seeded, model_server: str) -> None:
    await read_events(await post(f"{BASE}/completions", {"model": "demo-model", "prompt": "x", "stream": True}, seeded))
    forwarded = fake_stats(model_server)["last_request"]
    assert isinstance(forwarded, dict)
    assert forwarded["stream_options"] == {"include_usage": True, "continuous_usage_stats": True}


def _chunks(events: list[bytes]) -> list[dict[str, Any]]:
    """The chunks of a stream without what differs between two runs (id, created)."""
    chunks = [orjson.loads(event.removeprefix(b"data: ")) for event in events if event != b"data: [DONE]"]
    return [{key: value for key, value in chunk.items() if key not in ("id", "created")} for chunk in chunks]


def _direct_events(model_server: str, path: str, body: dict[str, Any]) -> list[bytes]:
    status, content = direct(model_server, path, body)
    assert status == 200
    return [event for event in content.split(b"\n\n") if event]


@pytest.mark.parametrize(
    "options",
    [None, {"include_usage": True}, {"continuous_usage_stats": True}, {"include_usage": False}],
)
@pytest.mark.parametrize("path", ["chat/completions", "completions"])
async def test_a_stream_is_exactly_what_vllm_sends_for_the_options_the_client_gave(
    seeded: Seeded, model_server: str, path: str, options: dict[str, bool] | None
) -> None:
    prompt = {"messages": CHAT["messages"]} if path == "chat/completions" else {"prompt": "Hello there"}
    body = {"model": "demo-model", **prompt, "max_tokens": 5, "n": 2, "stream": True}
    if options is not None:
        body["stream_options"] = options
    events = await read_events(await post(f"{BASE}/{path}", body, seeded))
    expected = _direct_events(model_server, path, body)
    assert _chunks(events) == _chunks(expected)
    assert events[-1] == b"data: [DONE]"
    fingerprinted = [chunk for chunk in _chunks(events) if "system_fingerprint" in chunk]
    assert fingerprinted, "system_fingerprint is where vLLM puts it"
    [row] = await rows()
    assert (row.prompt_tokens, row.completion_tokens) == (2 if path == "completions" else 5, 10)


async def test_stream_refused_upstream_gets_vllms_json_error(seeded: Seeded, model_server: str) -> None:
    long_chat = {**CHAT, "stream": True, "messages": [{"role": "user", "content": "word " * 600}]}
    response = await post(f"{BASE}/chat/completions", long_chat, seeded)
    assert response.status_code == 400
    assert orjson.loads(response.content) == orjson.loads(direct(model_server, "chat/completions", long_chat)[1])


async def test_stream_cut_upstream_records_the_tokens_sent_so_far(seeded: Seeded) -> None:
    body = {**CHAT, "max_tokens": 20, "stream": True, "fake_vllm": {"fail_after_tokens": 3}}
    events = await read_events(await post(f"{BASE}/chat/completions", body, seeded))
    assert orjson.loads(events[-2].removeprefix(b"data: "))["error"]["code"] in {
        "upstream_stream_truncated",
        "upstream_connection_failed",
    }
    [row] = await rows()
    assert (row.status_code, row.prompt_tokens, row.completion_tokens, row.total_tokens) == (502, 5, 3, 8)


async def test_stream_broken_midway_ends_with_an_error_event_and_done(seeded: Seeded) -> None:
    body = {**CHAT, "stream": True, "fake_vllm": {"fail_after_tokens": 2}}
    events = await read_events(await post(f"{BASE}/chat/completions", body, seeded))
    assert events[-1] == b"data: [DONE]"
    error = orjson.loads(events[-2].removeprefix(b"data: "))["error"]
    assert error["code"] in {"upstream_stream_truncated", "upstream_connection_failed"}
    [row] = await rows()
    assert row.status_code == 502


async def test_models_lists_only_what_the_caller_may_use(seeded: Seeded, model_server: str) -> None:
    restricted = await Cluster.objects.acreate(name="aurora", allowed_domains=["uchicago.edu"])
    await Endpoint.objects.acreate(
        cluster=restricted, model="secret-model", backend="direct", backend_config={"base_url": model_server}
    )
    response = await AsyncClient().get(f"{BASE}/models", headers=seeded.auth)
    assert response.status_code == 200
    body = orjson.loads(response.content)
    assert body["object"] == "list"
    assert [item["id"] for item in body["data"]] == ["demo-model"]
    assert body["data"][0]["owned_by"] == "polaris"

    response = await post(f"{BASE}/chat/completions", {**CHAT, "model": "secret-model"}, seeded)
    assert response.status_code == 403
    assert error_of(response)["code"] == "model_access_denied"


async def test_first_paths_route_by_cluster_and_framework(seeded: Seeded) -> None:
    response = await post("/resource_server/polaris/vllm/v1/chat/completions", CHAT, seeded)
    assert response.status_code == 200
    response = await post("/resource_server/polaris/sglang/v1/chat/completions", CHAT, seeded)
    assert (response.status_code, error_of(response)["code"]) == (404, "model_not_found")
    response = await post("/resource_server/nowhere/vllm/v1/chat/completions", CHAT, seeded)
    assert (response.status_code, error_of(response)["code"]) == (404, "cluster_not_found")
    response = await AsyncClient().get("/resource_server/polaris/vllm/v1/models", headers=seeded.auth)
    assert [item["id"] for item in orjson.loads(response.content)["data"]] == ["demo-model"]


async def test_cluster_in_maintenance_gets_503_with_its_message_and_the_windows_end(seeded: Seeded) -> None:
    ends = timezone.now() + timedelta(hours=2)
    await MaintenanceWindow.objects.acreate(
        cluster=seeded.cluster,
        starts_at=timezone.now() - timedelta(minutes=1),
        ends_at=ends,
        message="Polaris is down for upgrades until Monday.",
    )
    response = await post(f"{BASE}/chat/completions", CHAT, seeded)
    assert response.status_code == 503
    assert error_of(response)["code"] == "cluster_maintenance"
    assert "until Monday" in error_of(response)["message"]
    assert 7000 < int(response.headers["Retry-After"]) <= 7200, "seconds to the window's end"


async def test_an_open_ended_window_on_the_endpoint_says_retry_in_five_minutes(seeded: Seeded) -> None:
    await MaintenanceWindow.objects.acreate(
        endpoint=seeded.endpoint, starts_at=timezone.now() - timedelta(minutes=1), message="Reloading weights."
    )
    response = await post(f"{BASE}/chat/completions", CHAT, seeded)
    assert (response.status_code, response.headers["Retry-After"]) == (503, "300")
    assert "Reloading weights." in error_of(response)["message"]


async def test_a_window_not_yet_started_or_already_ended_changes_nothing(seeded: Seeded) -> None:
    now = timezone.now()
    await MaintenanceWindow.objects.acreate(
        cluster=seeded.cluster, starts_at=now + timedelta(hours=1), ends_at=now + timedelta(hours=2), message="Later."
    )
    await MaintenanceWindow.objects.acreate(
        cluster=seeded.cluster, starts_at=now - timedelta(hours=2), ends_at=now - timedelta(hours=1), message="Past."
    )
    response = await post(f"{BASE}/chat/completions", CHAT, seeded)
    assert response.status_code == 200, response.content


async def test_unknown_route_and_wrong_method_use_the_envelope(seeded: Seeded) -> None:
    response = await AsyncClient().get(f"{BASE}/nothing-here", headers=seeded.auth)
    assert (response.status_code, error_of(response)["code"]) == (404, "unknown_route")
    response = await AsyncClient().get(f"{BASE}/chat/completions", headers=seeded.auth)
    assert (response.status_code, error_of(response)["code"]) == (405, "method_not_allowed")


async def test_openapi_schema_and_docs_are_served() -> None:
    schema = orjson.loads((await AsyncClient().get("/resource_server/openapi.json")).content)
    assert "/resource_server/v1/chat/completions" in schema["paths"]
    assert "/resource_server/{cluster}/{framework}/v1/chat/completions" in schema["paths"]
    docs = await AsyncClient().get("/resource_server/docs")
    assert docs.status_code == 200


async def test_bodies_are_stored_only_when_the_setting_allows(seeded: Seeded, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(settings.GATEWAY, "LOG_REQUEST_BODIES", True)
    response = await post(f"{BASE}/chat/completions", CHAT, seeded)
    [row] = await rows()
    assert row.request_body == CHAT
    assert row.response_body == orjson.loads(response.content)


RESPONSE = {"model": "demo-model", "input": "Hello there", "max_output_tokens": 5}
MESSAGE = {"model": "demo-model", "max_tokens": 5, "messages": [{"role": "user", "content": "Hello there"}]}


@pytest.mark.parametrize(
    ("route", "body", "final"),
    [("responses", RESPONSE, b"event: response.completed"), ("messages", MESSAGE, b"event: message_stop")],
)
async def test_named_event_streams_are_relayed_whole_without_a_done_event(
    seeded: Seeded, route: str, body: dict[str, Any], final: bytes
) -> None:
    events = await read_events(await post(f"{BASE}/{route}", {**body, "stream": True}, seeded))
    assert events[-1].startswith(final)
    assert b"data: [DONE]" not in events
    [row] = await rows()
    assert (row.status_code, row.route, row.streamed) == (200, route, True)
    assert row.prompt_tokens and row.completion_tokens


@pytest.mark.parametrize(("route", "body"), [("responses", RESPONSE), ("messages", MESSAGE)])
async def test_a_named_event_stream_cut_midway_ends_with_an_error_event(
    seeded: Seeded, route: str, body: dict[str, Any]
) -> None:
    streamed = {**body, "stream": True, "fake_vllm": {"fail_after_tokens": 2}}
    events = await read_events(await post(f"{BASE}/{route}", streamed, seeded))
    kind, data = events[-1].split(b"\n", 1)
    assert kind == b"event: error"
    assert orjson.loads(data.removeprefix(b"data: "))["error"]["code"] in {
        "upstream_stream_truncated",
        "upstream_connection_failed",
    }
    [row] = await rows()
    assert row.status_code == 502


async def test_an_x_api_key_header_is_taken_as_the_bearer_credential(seeded: Seeded) -> None:
    response = await post(f"{BASE}/messages", MESSAGE, None, **{"X-Api-Key": seeded.key})
    assert response.status_code == 200
    assert orjson.loads(response.content)["type"] == "message"
    response = await post(f"{BASE}/messages", MESSAGE, None, **{"X-Api-Key": "not-a-key"})
    assert response.status_code == 401


async def test_models_carry_the_model_card_of_their_server_once_probed(seeded: Seeded) -> None:
    before = orjson.loads((await AsyncClient().get(f"{BASE}/models", headers=seeded.auth)).content)["data"]
    unprobed = {"cluster": "polaris", "framework": "vllm", "status": "unknown", "since": None}
    assert before == [
        {
            "id": "demo-model",
            "object": "model",
            "created": before[0]["created"],
            "owned_by": "polaris",
            "status": "unknown",
            "clusters": [{**unprobed, "eta_seconds": None, "queue_position": None}],
        }
    ]

    await runtime().status.probe()
    [card] = orjson.loads((await AsyncClient().get(f"{BASE}/models", headers=seeded.auth)).content)["data"]

    # The gateway's own fields (its cluster as owner, its registration time), beside vLLM's card fields.
    assert {key: card[key] for key in ("id", "object", "owned_by", "created")} == {
        key: before[0][key] for key in ("id", "object", "owned_by", "created")
    }
    assert (card["max_model_len"], card["root"], card["parent"]) == (512, "demo-model", None)
    assert card["status"] == "live" and card["clusters"][0]["status"] == "live", "the probe found it answering"
    assert card["permission"][0]["object"] == "model_permission"
