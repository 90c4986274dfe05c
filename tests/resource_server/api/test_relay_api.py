"""The internal relay route through the full Django stack, with the configured hub (Redis when REDIS_URL is set)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from django.test import AsyncClient

from resource_server.adapters.relay import RedisRelayHub, RelayChannel, RelayMessage, relay_url
from resource_server.bootstrap import runtime

CHUNK = 'data: {"choices":[{"index":0,"delta":{"content":"hi"}}]}\n\n'


@pytest.fixture
async def channel() -> AsyncIterator[RelayChannel]:
    relay_hub = runtime().relay_hub
    opened = await relay_hub.open(lifetime=30)
    yield opened
    await opened.close()
    if isinstance(relay_hub, RedisRelayHub):
        await relay_hub.aclose()


async def post(channel: RelayChannel, body: Any, *, token: str | None = None, task_id: str | None = None) -> Any:
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    headers = {} if token == "" else {"Authorization": f"Bearer {channel.token if token is None else token}"}
    path = f"/resource_server/internal/relay/{task_id or channel.task_id}"
    return await AsyncClient().post(path, raw, content_type="application/json", headers=headers)


def error_code(response: Any) -> str:
    return str(orjson.loads(response.content)["error"]["code"])


async def test_a_message_with_the_tasks_token_reaches_the_waiting_handler(channel: RelayChannel) -> None:
    message = {"seq": 0, "events": [CHUNK]}

    response = await post(channel, message)

    assert response.status_code == 204
    assert await channel.read(1) == [RelayMessage(0, events=(CHUNK.encode(),))]


@pytest.mark.parametrize("presented", ["a guessed token", "no token", "another task's token"])
async def test_a_bad_relay_token_gets_403_and_no_data_is_accepted(channel: RelayChannel, presented: str) -> None:
    other = await runtime().relay_hub.open(lifetime=30)  # a real token, but of another task
    token = {"a guessed token": "wrong-token", "no token": "", "another task's token": other.token}[presented]
    try:
        response = await post(channel, {"seq": 0, "events": [CHUNK]}, token=token)
    finally:
        await other.close()

    assert response.status_code == 403
    assert error_code(response) == "relay_forbidden"
    assert await channel.read(0) == []


async def test_an_unknown_task_gets_403(channel: RelayChannel) -> None:
    response = await post(channel, {"seq": 0, "done": True}, task_id="f" * 32)
    assert response.status_code == 403


async def test_the_token_stops_working_when_the_stream_ends(channel: RelayChannel) -> None:
    assert (await post(channel, {"seq": 0, "events": [CHUNK]})).status_code == 204
    await channel.close()

    response = await post(channel, {"seq": 1, "done": True})

    assert response.status_code == 403


async def test_an_oversized_message_gets_413_and_is_not_accepted(channel: RelayChannel, settings: Any) -> None:
    settings.GATEWAY = settings.GATEWAY.model_copy(update={"RELAY_MAX_MESSAGE_BYTES": 1024})

    response = await post(channel, {"seq": 0, "events": ["data: " + "x" * 2000 + "\n\n"]})

    assert response.status_code == 413
    assert await channel.read(0) == []


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        [1, 2],
        {"events": [CHUNK]},
        {"seq": -1, "events": [CHUNK]},
        {"seq": True, "events": [CHUNK]},
        {"seq": 0},
        {"seq": 0, "events": [CHUNK], "done": True},
        {"seq": 0, "events": []},
        {"seq": 0, "events": ["data: no blank line\n"]},
        {"seq": 0, "events": ["data: a\n\ndata: two events in one\n\n"]},
        {"seq": 0, "done": False},
        {"seq": 0, "error": {"status": "500", "code": "x", "message": "y"}},
        {"seq": 0, "extra": 1},
    ],
)
async def test_a_malformed_message_gets_400_and_is_not_accepted(channel: RelayChannel, body: Any) -> None:
    response = await post(channel, body)

    assert response.status_code == 400
    assert await channel.read(0) == []


async def test_a_handler_far_behind_answers_429_so_the_function_backs_off(
    channel: RelayChannel, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(runtime().relay_hub, "max_pending", 2)
    for seq in range(2):
        assert (await post(channel, {"seq": seq, "events": [CHUNK]})).status_code == 204

    response = await post(channel, {"seq": 2, "events": [CHUNK]})

    assert response.status_code == 429
    assert response.headers["Retry-After"] == "1"


async def test_the_relay_route_is_not_in_the_public_api_docs() -> None:
    schema = orjson.loads((await AsyncClient().get("/resource_server/openapi.json")).content)
    assert not [path for path in schema["paths"] if "relay" in path]


def test_the_relay_url_needs_the_public_url_setting(settings: Any) -> None:
    settings.GATEWAY = settings.GATEWAY.model_copy(update={"RELAY_PUBLIC_URL": "https://gw.example.org/"})
    assert relay_url("abc") == "https://gw.example.org/resource_server/internal/relay/abc"

    settings.GATEWAY = settings.GATEWAY.model_copy(update={"RELAY_PUBLIC_URL": ""})
    with pytest.raises(Exception, match="RELAY_PUBLIC_URL"):
        relay_url("abc")
