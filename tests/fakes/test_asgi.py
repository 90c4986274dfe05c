"""The ASGI plumbing the fakes share, driven with ASGI messages as a server would send them."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

import pytest

from fakes import asgi
from fakes.asgi import Message, Receive, Scope, Send


def receiving(messages: Iterable[Message]) -> Receive:
    queue: asyncio.Queue[Message] = asyncio.Queue()
    for message in messages:
        queue.put_nowait(message)
    return queue.get


def recording() -> tuple[list[Message], Send]:
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    return sent, send


class Echo(asgi.App):
    """Answers every request with its body."""

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        await asgi.send_response(send, 200, await asgi.read_body(receive), [asgi.JSON_TYPE])


async def test_a_body_in_several_messages_is_read_whole_and_answered_with_its_length() -> None:
    parts: list[Message] = [
        {"type": "http.request", "body": b'{"a":', "more_body": True},
        {"type": "http.request", "body": b"1}"},
    ]
    sent, send = recording()

    await Echo()({"type": "http"}, receiving(parts), send)

    assert sent == [
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/json"), (b"content-length", b"7")],
        },
        {"type": "http.response.body", "body": b'{"a":1}'},
    ]


async def test_the_app_completes_startup_and_shutdown_itself() -> None:
    sent, send = recording()

    await Echo()({"type": "lifespan"}, receiving([{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]), send)

    assert sent == [{"type": "lifespan.startup.complete"}, {"type": "lifespan.shutdown.complete"}]


async def test_waiting_for_a_disconnect_passes_over_other_messages() -> None:
    receive = receiving([{"type": "http.request", "body": b""}, {"type": "http.disconnect"}])

    await asyncio.wait_for(asgi.wait_disconnect(receive), 1)


async def test_waiting_for_a_disconnect_waits_while_the_client_stays() -> None:
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(asgi.wait_disconnect(receiving([{"type": "http.request", "body": b""}])), 0.05)


def test_allow_header_lists_the_methods_in_order() -> None:
    assert asgi.allow_header(["GET", "POST"]) == (b"allow", b"GET, POST")


def test_command_line_defaults_to_loopback_and_the_fakes_port() -> None:
    parser = asgi.command_line(prog="fake", description="a fake", port=8009)

    defaults = parser.parse_args([])
    given = parser.parse_args(["--host", "::1", "--port", "1234"])

    assert (defaults.host, defaults.port) == ("127.0.0.1", 8009)
    assert (given.host, given.port) == ("::1", 1234)
