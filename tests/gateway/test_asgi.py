"""The lean inference routes answer exactly as the Django path does, and hand everything else to Django."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import MutableMapping
from dataclasses import dataclass
from typing import Any

import orjson
import pytest
from asgiref.sync import sync_to_async
from django.conf import settings
from django.test import override_settings

from gateway.asgi import AdmissionControl, django_application, http_application, inference_app, worker_settle
from resource_server.adapters.relay import RelayMessage
from resource_server.api.fast import InferenceApp
from resource_server.bootstrap import Runtime, runtime
from resource_server.models import RequestLog
from tests.conftest import Seeded

pytestmark = pytest.mark.django_db(transaction=True)

CHAT = {"model": "demo-model", "messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 5}
CHAT_PATH = "/resource_server/v1/chat/completions"


@dataclass
class Answer:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes

    def header_names(self) -> list[bytes]:
        return [name.lower() for name, _ in self.headers]

    def header(self, name: bytes) -> bytes | None:
        return next((value for key, value in self.headers if key.lower() == name), None)


async def call(
    app: Any,
    path: str,
    body: bytes = b"",
    *,
    method: str = "POST",
    headers: dict[str, str] | None = None,
    started: asyncio.Event | None = None,
) -> Answer:
    """One request through an ASGI app, as uvicorn would deliver it; `started` is set when its answer starts."""
    fields = {"host": "127.0.0.1:8000", "content-type": "application/json"}
    fields |= {name.lower(): value for name, value in (headers or {}).items()}
    fields["content-length"] = str(len(body))
    raw_headers = [(name.encode(), value.encode()) for name, value in fields.items()]
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": raw_headers,
        "client": ("127.0.0.1", 40000),
        "server": ("127.0.0.1", 8000),
    }
    messages: list[MutableMapping[str, Any]] = []
    delivered = False
    finished = asyncio.Event()

    async def receive() -> dict[str, Any]:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await finished.wait()  # the client stays until the whole answer is in
        return {"type": "http.disconnect"}

    async def send(message: MutableMapping[str, Any]) -> None:
        messages.append(message)
        if started is not None and message["type"] == "http.response.start":
            started.set()
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            finished.set()

    await app(scope, receive, send)
    start = messages[0]
    content = b"".join(message.get("body", b"") for message in messages[1:])
    return Answer(start["status"], list(start["headers"]), content)


async def both(path: str, body: bytes = b"", **options: Any) -> tuple[Answer, Answer]:
    lean = await call(http_application, path, body, **options)
    django = await call(django_application, path, body, **options)
    return lean, django


def assert_same_head(lean: Answer, django: Answer) -> None:
    assert lean.status == django.status
    assert lean.header_names() == django.header_names()
    for name in lean.header_names():
        if name not in (b"x-request-id", b"x-gateway-request-id", b"content-length"):
            assert lean.header(name) == django.header(name), name


def test_the_lean_routes_are_on_with_the_configured_middleware() -> None:
    assert inference_app.enabled


def test_the_lean_routes_turn_off_when_middleware_changes() -> None:
    with override_settings(MIDDLEWARE=["django.middleware.common.CommonMiddleware"]):
        assert not InferenceApp(django_application).enabled


async def test_a_completion_gets_the_same_head_and_shape(seeded: Seeded) -> None:
    lean, django = await both(CHAT_PATH, orjson.dumps(CHAT), headers=seeded.auth)
    assert lean.status == 200
    assert_same_head(lean, django)
    assert set(orjson.loads(lean.body)) == set(orjson.loads(django.body))
    assert lean.header(b"content-length") == str(len(lean.body)).encode()


async def test_a_stream_gets_the_same_head_and_events(seeded: Seeded) -> None:
    body = orjson.dumps({**CHAT, "stream": True, "stream_options": {"include_usage": True}})
    lean, django = await both(CHAT_PATH, body, headers=seeded.auth)
    assert lean.status == 200
    assert_same_head(lean, django)
    lean_events, django_events = (answer.body.split(b"\n\n") for answer in (lean, django))
    assert len(lean_events) == len(django_events)
    assert lean_events[-2:] == django_events[-2:] == [b"data: [DONE]", b""]


@pytest.mark.parametrize(
    ("path", "body", "authorization"),
    [
        (CHAT_PATH, orjson.dumps(CHAT), None),
        (CHAT_PATH, orjson.dumps(CHAT), "Bearer igw_000000000000_unknownunknownunknownunknown"),
        (CHAT_PATH, b'{"model": ', "seeded"),
        (CHAT_PATH, orjson.dumps({**CHAT, "temperature": -1}), "seeded"),  # vLLM refuses it: its body passes
        (CHAT_PATH, orjson.dumps({**CHAT, "model": "nope"}), "seeded"),
        ("/resource_server/nowhere/vllm/v1/chat/completions", orjson.dumps(CHAT), "seeded"),
        ("/resource_server/polaris/sglang/v1/completions", orjson.dumps({"model": "demo-model"}), "seeded"),
        (CHAT_PATH, orjson.dumps({**CHAT, "fake_vllm": {"status": 500, "message": "CUDA error"}}), "seeded"),
        (
            CHAT_PATH,
            orjson.dumps({**CHAT, "stream": True, "messages": [{"role": "user", "content": "w " * 600}]}),
            "seeded",
        ),
    ],
)
async def test_errors_are_answered_byte_for_byte_alike(
    seeded: Seeded, path: str, body: bytes, authorization: str | None
) -> None:
    headers = seeded.auth if authorization == "seeded" else {"Authorization": authorization} if authorization else {}
    lean, django = await both(path, body, headers=headers)
    assert lean.status >= 400
    assert_same_head(lean, django)
    assert lean.body == django.body


async def test_a_body_over_the_limit_gets_the_same_413(seeded: Seeded) -> None:
    with override_settings(DATA_UPLOAD_MAX_MEMORY_SIZE=1024):
        lean, django = await both(CHAT_PATH, orjson.dumps({**CHAT, "pad": "x" * 2048}), headers=seeded.auth)
    assert lean.status == 413
    assert_same_head(lean, django)
    assert lean.body == django.body


async def test_a_sane_client_request_id_is_echoed_by_both(seeded: Seeded) -> None:
    headers = {**seeded.auth, "X-Request-ID": "client-chosen-id-42"}
    lean, django = await both(CHAT_PATH, orjson.dumps(CHAT), headers=headers)
    assert lean.header(b"x-request-id") == django.header(b"x-request-id") == b"client-chosen-id-42"
    # The gateway's own id, the usage row's key, is returned beside it; the client's is stored in the row.
    ours = {lean.header(b"x-gateway-request-id").decode(), django.header(b"x-gateway-request-id").decode()}
    assert len(ours) == 2
    assert await sync_to_async(runtime().usage_sink.flush)(timeout=10)
    rows = RequestLog.objects.filter(request_id__in=ours).values_list("client_request_id", flat=True)
    assert await sync_to_async(list)(rows) == ["client-chosen-id-42"] * 2


@pytest.mark.parametrize(
    ("method", "path", "headers"),
    [
        ("GET", CHAT_PATH, {}),
        ("POST", "/resource_server/v1/nothing-here", {}),
        ("POST", CHAT_PATH, {"host": "evil.example.org"}),
    ],
)
async def test_other_requests_are_left_to_django(
    seeded: Seeded, method: str, path: str, headers: dict[str, str]
) -> None:
    lean, django = await both(path, orjson.dumps(CHAT), method=method, headers={**seeded.auth, **headers})
    assert lean.status in (400, 404, 405)
    assert_same_head(lean, django)
    assert lean.body == django.body


def _app_with(**limits: int) -> AdmissionControl:
    with override_settings(GATEWAY=settings.GATEWAY.model_copy(update=limits)):
        return AdmissionControl(InferenceApp(django_application))


async def _until(condition: Any) -> None:
    async with asyncio.timeout(10):
        while not condition():  # noqa: ASYNC110 (the app keeps a count, and has no event to wait on)
            await asyncio.sleep(0.01)


SLOW_CHAT = orjson.dumps({**CHAT, "fake_vllm": {"latency": 1.0}})
SLOW_STREAM = orjson.dumps({**CHAT, "max_tokens": 10, "stream": True, "fake_vllm": {"tokens_per_second": 5}})


def assert_overloaded(answer: Answer) -> None:
    assert answer.status == 503
    assert answer.header(b"retry-after") == b"1"
    assert answer.header(b"x-request-id")
    error = orjson.loads(answer.body)["error"]
    assert (error["code"], error["type"]) == ("gateway_overloaded", "service_unavailable")


async def test_a_worker_holding_its_most_pending_requests_refuses_more_with_503(seeded: Seeded) -> None:
    app = _app_with(MAX_PENDING_PER_WORKER=2)
    held = [asyncio.ensure_future(call(app, CHAT_PATH, SLOW_CHAT, headers=seeded.auth)) for _ in range(2)]
    await _until(lambda: app.pending == 2)
    assert_overloaded(await call(app, CHAT_PATH, orjson.dumps(CHAT), headers=seeded.auth))
    assert [answer.status for answer in await asyncio.gather(*held)] == [200, 200]
    assert (await call(app, CHAT_PATH, orjson.dumps(CHAT), headers=seeded.auth)).status == 200


async def test_open_streams_are_not_pending_work(seeded: Seeded) -> None:
    app = _app_with(MAX_PENDING_PER_WORKER=1)
    started = asyncio.Event()
    stream = asyncio.ensure_future(call(app, CHAT_PATH, SLOW_STREAM, headers=seeded.auth, started=started))
    await started.wait()
    assert (await call(app, CHAT_PATH, orjson.dumps(CHAT), headers=seeded.auth)).status == 200
    assert not stream.done()
    assert (await stream).status == 200


async def test_open_streams_count_against_the_in_flight_bound(seeded: Seeded) -> None:
    app = _app_with(MAX_PENDING_PER_WORKER=10, MAX_IN_FLIGHT_PER_WORKER=1)
    started = asyncio.Event()
    stream = asyncio.ensure_future(call(app, CHAT_PATH, SLOW_STREAM, headers=seeded.auth, started=started))
    await started.wait()
    assert_overloaded(await call(app, CHAT_PATH, orjson.dumps(CHAT), headers=seeded.auth))
    assert (await stream).status == 200


async def test_overload_is_shed_even_when_the_lean_routes_are_off(seeded: Seeded) -> None:
    with override_settings(MIDDLEWARE=["django.middleware.common.CommonMiddleware"]):
        door = InferenceApp(django_application)
    assert not door.enabled
    with override_settings(GATEWAY=settings.GATEWAY.model_copy(update={"MAX_PENDING_PER_WORKER": 2})):
        app = AdmissionControl(door)
    held = [asyncio.ensure_future(call(app, CHAT_PATH, SLOW_CHAT, headers=seeded.auth)) for _ in range(2)]
    await _until(lambda: app.pending == 2)
    assert_overloaded(await call(app, CHAT_PATH, orjson.dumps(CHAT), headers=seeded.auth))
    # Only inference POSTs are shed: the rest still reaches Django.
    assert (await call(app, "/resource_server/v1/models", method="GET", headers=seeded.auth)).status == 200
    assert [answer.status for answer in await asyncio.gather(*held)] == [200, 200]
    assert (app.pending, app.in_flight) == (0, 0)


async def test_requests_in_flight_are_counted_back_down(seeded: Seeded) -> None:
    app = AdmissionControl(InferenceApp(django_application))
    for body in (orjson.dumps(CHAT), b"not json", orjson.dumps({**CHAT, "stream": True}), SLOW_STREAM):
        await call(app, CHAT_PATH, body, headers=seeded.auth)
    assert (app.pending, app.in_flight) == (0, 0)


RELAY_MESSAGE = orjson.dumps({"seq": 0, "events": ['data: {"choices":[{"index":0,"delta":{"content":"hi"}}]}\n\n']})


async def _refuse_fallback(scope: Any, receive: Any, send: Any) -> None:
    raise AssertionError(f"{scope['path']} went to Django")


@pytest.mark.parametrize(
    ("case", "body"),
    [
        ("accepted", RELAY_MESSAGE),
        ("wrong token", RELAY_MESSAGE),
        ("not json", b"{"),
        ("too large", orjson.dumps({"seq": 0, "events": ["data: " + "x" * 4096 + "\n\n"]})),
    ],
)
async def test_relay_messages_are_answered_alike_and_by_the_lean_app(
    transactional_db: None, case: str, body: bytes
) -> None:
    channel = await runtime().relay_hub.open(lifetime=30)
    token = "a-guessed-token" if case == "wrong token" else channel.token
    path = f"/resource_server/internal/relay/{channel.task_id}"
    try:
        with override_settings(GATEWAY=settings.GATEWAY.model_copy(update={"RELAY_MAX_MESSAGE_BYTES": 1024})):
            headers = {"Authorization": f"Bearer {token}"}
            lean_only = await call(InferenceApp(_refuse_fallback), path, body, headers=headers)
            lean, django = await both(path, body, headers=headers)
            delivered = await channel.read(0)
    finally:
        await channel.close()
    expected = {"accepted": 204, "wrong token": 403, "not json": 400, "too large": 413}[case]
    assert lean_only.status == lean.status == django.status == expected
    assert_same_head(lean, django)
    assert lean.body == django.body
    assert delivered == ([RelayMessage.parse(body)] * 3 if case == "accepted" else [])


async def test_start_up_loads_the_routing_table_then_freezes_what_the_worker_keeps(
    seeded: Seeded, runtime: Runtime
) -> None:
    assert runtime.routing.current.loaded_at == float("-inf")
    try:
        await worker_settle(runtime)
        assert "demo-model" in runtime.routing.current.by_model, "the first request must not pay for the table"
        assert gc.get_freeze_count() > 0, "full collections would walk every long-lived object"
    finally:
        gc.unfreeze()
