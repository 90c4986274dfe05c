"""A cold model (no endpoint serving it): 503 with its state and numbers, or held with X-Gateway-Max-Wait.

Through both doors as an ASGI server drives them (the lean app, and Django with the ninja views), with the
endpoint states set at the route stage's seam (`tests/status.py`: the scheduler behind them cannot run here).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import MutableMapping
from dataclasses import dataclass
from typing import Any

import orjson
import pytest
from asgiref.sync import sync_to_async
from django.conf import settings

from gateway.asgi import django_application, http_application
from resource_server.bootstrap import Runtime, runtime
from resource_server.models import Cluster, Endpoint, RequestLog
from resource_server.status.base import State
from tests.conftest import Seeded, seed
from tests.gateway.test_asgi import assert_same_head, both
from tests.resource_server.status.test_board_health import _model_server
from tests.servers import free_port
from tests.status import ScriptedStatus, scripted_status

pytestmark = pytest.mark.django_db(transaction=True)

CHAT_PATH = "/resource_server/v1/chat/completions"
CHAT = {"model": "demo-model", "messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 5}
DOORS = {"lean": http_application, "ninja": django_application}


@dataclass
class Answer:
    status: int | None  # None: no answer (the client had left)
    headers: dict[str, str]
    body: bytes

    def error(self) -> dict[str, Any]:
        error: dict[str, Any] = orjson.loads(self.body)["error"]
        return error


async def ask(
    door: str,
    seeded: Seeded,
    body: dict[str, Any],
    *,
    max_wait: str | None = None,
    leave: asyncio.Event | None = None,
) -> Answer:
    """One request through a door, as uvicorn delivers it; the client leaves when `leave` is set, if given."""
    raw = orjson.dumps(body)
    headers = {"host": "127.0.0.1:8000", "content-type": "application/json", "content-length": str(len(raw))}
    headers |= {name.lower(): value for name, value in seeded.auth.items()}
    if max_wait is not None:
        headers["x-gateway-max-wait"] = max_wait
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": CHAT_PATH,
        "raw_path": CHAT_PATH.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(name.encode(), value.encode()) for name, value in headers.items()],
        "client": ("127.0.0.1", 40000),
        "server": ("127.0.0.1", 8000),
    }
    messages: list[MutableMapping[str, Any]] = []
    finished = asyncio.Event()
    delivered = False

    async def receive() -> dict[str, Any]:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": raw, "more_body": False}
        await (leave or finished).wait()
        return {"type": "http.disconnect"}

    async def send(message: MutableMapping[str, Any]) -> None:
        messages.append(message)
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            finished.set()

    await DOORS[door](scope, receive, send)
    if not messages:
        return Answer(None, {}, b"")
    start = messages[0]
    answer_headers = {name.decode().lower(): value.decode() for name, value in start["headers"]}
    return Answer(start["status"], answer_headers, b"".join(message.get("body", b"") for message in messages[1:]))


async def row_of(answer: Answer) -> RequestLog:
    assert await sync_to_async(runtime().usage_sink.flush)(timeout=10)
    return await RequestLog.objects.aget(request_id=answer.headers["x-gateway-request-id"])


async def only_row() -> RequestLog:
    assert await sync_to_async(runtime().usage_sink.flush)(timeout=10)
    [row] = [row async for row in RequestLog.objects.all()]
    return row


@pytest.fixture
def status(runtime: Runtime) -> ScriptedStatus:
    return scripted_status(runtime)


@pytest.fixture
def cold(transactional_db: None) -> Seeded:
    """Rows whose endpoint's model server is never reached: the model is cold."""
    return seed("http://127.0.0.1:9/v1")


@pytest.fixture
def quick_looks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(settings.GATEWAY, "MAX_WAIT_PROGRESS_SECONDS", 0.05)


@pytest.fixture
def rare_looks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Progress only on changes while the test runs: what a held stream gets is then what the test did."""
    monkeypatch.setattr(settings.GATEWAY, "MAX_WAIT_PROGRESS_SECONDS", 120.0)


IN_AN_HOUR = "in an hour"
COLD_CASES = [
    pytest.param(
        {"state": State.STARTING, "eta_seconds": 75.2},
        ("model_starting", "76", 76, None),
        "is starting on polaris; expected to answer in about 76 s.",
        id="starting",
    ),
    pytest.param(
        {"state": State.QUEUED, "eta_seconds": 240.0, "queue_position": 3},
        ("model_queued", "240", 240, 3),
        "is queued on polaris (position 3); expected to answer in about 4 min.",
        id="queued",
    ),
    pytest.param(
        {"state": State.OFFLINE},
        ("model_offline", "60", None, None),
        "is offline on polaris; no estimate yet of when it answers.",
        id="offline",
    ),
    pytest.param(
        {"state": State.MAINTENANCE, "maintenance_message": "Scheduled upgrade.", "maintenance_ends": IN_AN_HOUR},
        ("cluster_maintenance", IN_AN_HOUR, IN_AN_HOUR, None),
        "is unavailable: polaris is in maintenance (Scheduled upgrade) until ",
        id="maintenance",
    ),
    pytest.param(
        {"state": State.MAINTENANCE, "maintenance_message": "Cooling repairs"},
        ("cluster_maintenance", "300", None, None),
        "is unavailable: polaris is in maintenance (Cooling repairs).",
        id="maintenance-without-end",
    ),
]


@pytest.mark.parametrize("door", DOORS)
@pytest.mark.parametrize(("state", "expected", "message"), COLD_CASES)
async def test_a_cold_model_is_answered_503_with_its_state_and_numbers(
    cold: Seeded, status: ScriptedStatus, door: str, state: dict[str, Any], expected: tuple[Any, ...], message: str
) -> None:
    endpoint_id = cold.endpoint.pk
    ends = time.time() + 3600
    if state.get("maintenance_ends") == IN_AN_HOUR:
        state = {**state, "maintenance_ends": ends}
    status.set(endpoint_id, **state)

    answer = await ask(door, cold, CHAT)

    code, retry_after, eta, position = expected
    assert answer.status == 503
    error = answer.error()
    assert set(error) == {"message", "type", "param", "code", "status", "eta_seconds", "queue_position"}
    assert (error["code"], error["type"], error["param"]) == (code, "service_unavailable", None)
    assert (error["status"], error["queue_position"]) == (state["state"].value, position)
    assert error["message"].startswith(f"The model `demo-model` {message}")
    if retry_after == IN_AN_HOUR:  # the seconds left of the window, counted when the answer was made
        assert 3590 <= int(answer.headers["retry-after"]) <= 3600
        assert error["eta_seconds"] == int(answer.headers["retry-after"])
        assert error["message"].endswith(" UTC.")
    else:
        assert (answer.headers["retry-after"], error["eta_seconds"]) == (retry_after, eta)
    route = f"cluster=polaris; endpoint={endpoint_id}; reason={state['state']},only"
    assert answer.headers["x-gateway-route"] == route
    row = await row_of(answer)
    assert (row.status_code, row.error_code, row.endpoint_id, row.gateway_route) == (503, code, endpoint_id, route)
    assert status.turned_away_counts == {endpoint_id: 1}


async def test_the_best_cold_endpoint_speaks_for_the_model(cold: Seeded, status: ScriptedStatus) -> None:
    sophia = await Cluster.objects.acreate(name="sophia")
    starting = await Endpoint.objects.acreate(
        cluster=sophia, model="demo-model", backend="direct", backend_config={"base_url": "http://127.0.0.1:9/v1"}
    )
    status.set(cold.endpoint.pk, State.QUEUED, queue_position=1, eta_seconds=30)
    status.set(starting.pk, State.STARTING, eta_seconds=600)

    answer = await ask("lean", cold, CHAT)

    assert (answer.status, answer.error()["code"], answer.headers["retry-after"]) == (503, "model_starting", "600")
    assert "starting on sophia; expected to answer in about 10 min." in answer.error()["message"]
    assert answer.headers["x-gateway-route"] == f"cluster=sophia; endpoint={starting.pk}; reason=starting,best_state"
    assert status.turned_away_counts == {starting.pk: 1}


@pytest.mark.parametrize("door", DOORS)
@pytest.mark.parametrize("value", ["-1", "abc", "1e3", "901", "nan", "inf", "10s", "0x10"])
async def test_a_max_wait_that_is_not_seconds_within_the_limit_is_refused(
    cold: Seeded, status: ScriptedStatus, door: str, value: str
) -> None:
    answer = await ask(door, cold, CHAT, max_wait=value)
    assert answer.status == 400
    error = answer.error()
    assert (error["code"], error["param"]) == ("invalid_max_wait", "X-Gateway-Max-Wait")
    assert "from 0 to 900" in error["message"]
    assert (await row_of(answer)).status_code == 400
    assert status.turned_away_counts == {}


async def test_a_max_wait_of_zero_does_not_wait(cold: Seeded, status: ScriptedStatus) -> None:
    status.set(cold.endpoint.pk, State.QUEUED)
    answer = await ask("lean", cold, CHAT, max_wait="0")
    assert (answer.status, answer.error()["code"]) == (503, "model_queued")
    assert "X-Gateway-Max-Wait" in answer.error()["message"], "the message says how to wait instead"


@pytest.mark.parametrize("door", DOORS)
async def test_a_held_request_is_answered_once_its_model_is_live(
    seeded: Seeded, status: ScriptedStatus, door: str
) -> None:
    status.set(seeded.endpoint.pk, State.QUEUED, queue_position=2)
    asked = asyncio.ensure_future(ask(door, seeded, CHAT, max_wait="60"))
    await status.until_waiting(1)
    assert not asked.done()

    status.set(seeded.endpoint.pk, State.LIVE)
    answer = await asked

    assert answer.status == 200, answer.body
    assert orjson.loads(answer.body)["choices"]
    route = f"cluster=polaris; endpoint={seeded.endpoint.pk}; reason=live,only,held"
    assert answer.headers["x-gateway-route"] == route
    row = await row_of(answer)
    assert (row.status_code, row.gateway_route) == (200, route)
    assert status.turned_away_counts == {}


@pytest.mark.parametrize("door", DOORS)
async def test_a_held_request_whose_wait_ends_gets_the_cold_answer(
    cold: Seeded, status: ScriptedStatus, door: str, quick_looks: None
) -> None:
    status.set(cold.endpoint.pk, State.QUEUED, queue_position=4, eta_seconds=1800)
    answer = await ask(door, cold, CHAT, max_wait="0.3")
    assert answer.status == 503
    error = answer.error()
    assert (error["code"], error["queue_position"], answer.headers["retry-after"]) == ("model_queued", 4, "1800")
    assert error["message"].endswith("about 30 min. It did not answer within the 0.3 s you asked to wait.")
    route = f"cluster=polaris; endpoint={cold.endpoint.pk}; reason=queued,only,held"
    assert answer.headers["x-gateway-route"] == route
    assert (await row_of(answer)).gateway_route == route
    assert status.turned_away_counts == {cold.endpoint.pk: 1}


@pytest.mark.parametrize("door", DOORS)
@pytest.mark.parametrize("streamed", [False, True])
async def test_a_client_that_leaves_while_held_is_recorded_499_and_let_go(
    cold: Seeded, status: ScriptedStatus, door: str, streamed: bool
) -> None:
    status.set(cold.endpoint.pk, State.STARTING)
    leave = asyncio.Event()
    asked = asyncio.ensure_future(ask(door, cold, {**CHAT, "stream": streamed}, max_wait="600", leave=leave))
    await status.until_waiting(1)

    leave.set()
    answer = await asked

    await status.until_waiting(0)  # nothing of it waits any more
    row = await only_row()
    assert (row.status_code, row.error_code, row.streamed) == (499, "client_disconnected", streamed)
    if streamed:  # its answer had started: 200, then its progress
        assert (answer.status, answer.body) == (200, b": status=starting\n\n")
    assert runtime().in_flight.mine() == {}


@pytest.mark.parametrize("door", DOORS)
async def test_a_held_stream_gets_progress_comments_then_the_models_events(
    seeded: Seeded, status: ScriptedStatus, door: str, rare_looks: None
) -> None:
    status.set(seeded.endpoint.pk, State.QUEUED, queue_position=3, eta_seconds=240)
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    asked = asyncio.ensure_future(ask(door, seeded, body, max_wait="60"))
    await status.until_waiting(1)
    status.set(seeded.endpoint.pk, State.STARTING, eta_seconds=30)  # a change: progress at once
    await status.until_waiting(0)
    await status.until_waiting(1)
    status.set(seeded.endpoint.pk, State.LIVE)
    answer = await asked

    assert answer.status == 200
    assert answer.headers["content-type"] == "text/event-stream"
    held = f"cluster=polaris; endpoint={seeded.endpoint.pk}; reason=queued,only,held"
    assert answer.headers["x-gateway-route"] == held, "the header names the route when the answer starts"
    events = answer.body.split(b"\n\n")
    assert events[0] == b": status=queued position=3 eta=240"
    assert events[1] == b": status=starting eta=30"
    route = f"cluster=polaris; endpoint={seeded.endpoint.pk}; reason=live,only,held"
    assert events[2] == f": x-gateway-route: {route}".encode()
    data = [event for event in events[3:] if event]
    assert all(event.startswith(b"data: ") for event in data)
    assert data[-1] == b"data: [DONE]" and b'"error"' not in answer.body
    assert orjson.loads(data[-2].removeprefix(b"data: "))["usage"]["completion_tokens"] > 0
    row = await row_of(answer)
    assert (row.status_code, row.streamed, row.gateway_route, row.endpoint_id) == (200, True, route, seeded.endpoint.pk)
    assert row.completion_tokens is not None and row.completion_tokens > 0


@pytest.mark.parametrize("door", DOORS)
async def test_a_held_stream_whose_wait_ends_ends_with_an_error_event(
    cold: Seeded, status: ScriptedStatus, door: str, quick_looks: None
) -> None:
    status.set(cold.endpoint.pk, State.OFFLINE)
    answer = await ask(door, cold, {**CHAT, "stream": True}, max_wait="0.3")

    assert answer.status == 200  # the answer started when the hold did
    events = [event for event in answer.body.split(b"\n\n") if event]
    assert events[0] == b": status=offline"
    assert set(events[:-2]) == {b": status=offline"}, "a comment at each look, and nothing else"
    assert events[-1] == b"data: [DONE]"
    error = orjson.loads(events[-2].removeprefix(b"data: "))["error"]
    assert (error["code"], error["status"], error["eta_seconds"]) == ("model_offline", "offline", None)
    row = await row_of(answer)
    assert (row.status_code, row.error_code, row.streamed) == (503, "model_offline", True)
    assert row.gateway_route == f"cluster=polaris; endpoint={cold.endpoint.pk}; reason=offline,only,held"


@pytest.mark.parametrize("streamed", [False, True])
async def test_a_request_asked_to_wait_is_held_while_its_endpoint_refuses_connections(
    transactional_db: None, status: ScriptedStatus, streamed: bool
) -> None:
    # Not probed yet (unknown: sent requests), and nothing listens: the request is held, not answered 503.
    port = free_port()
    seeded = await sync_to_async(seed)(f"http://127.0.0.1:{port}/v1")
    asked = asyncio.ensure_future(ask("lean", seeded, {**CHAT, "stream": streamed}, max_wait="60"))
    await status.until_waiting(1)
    with _model_server(port):
        status.set(seeded.endpoint.pk, State.LIVE)  # as the prober would find it
        answer = await asked
    assert answer.status == 200, answer.body
    route = f"cluster=polaris; endpoint={seeded.endpoint.pk}; reason=live,only,held"
    assert (await row_of(answer)).gateway_route == route
    if streamed:
        assert answer.body.startswith(b": status=unknown\n\n")
        assert answer.body.endswith(b"data: [DONE]\n\n") and b'"error"' not in answer.body
    else:
        assert answer.headers["x-gateway-route"] == route


async def test_both_doors_answer_a_cold_model_alike(cold: Seeded, status: ScriptedStatus) -> None:
    status.set(cold.endpoint.pk, State.QUEUED, queue_position=2, eta_seconds=90)
    lean, django = await both(CHAT_PATH, orjson.dumps(CHAT), headers=cold.auth)
    assert lean.status == 503
    assert_same_head(lean, django)
    assert lean.body == django.body
