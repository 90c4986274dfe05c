"""The ASGI plumbing the fakes share: message types, reading a body, answering, and serving under uvicorn.

The fakes are pure ASGI apps, so that they need only the standard library and orjson to run inside a
test's event loop; uvicorn is imported only to serve one from the command line.
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import sys
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Iterable, Iterator, MutableMapping
from typing import Any

import orjson

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
JSON = dict[str, Any]
Header = tuple[bytes, bytes]

JSON_TYPE: Header = (b"content-type", b"application/json")
# Starlette's answers to an unknown path or method, as vLLM (on FastAPI) sends them.
NOT_FOUND = orjson.dumps({"detail": "Not Found"})
METHOD_NOT_ALLOWED = orjson.dumps({"detail": "Method Not Allowed"})


class App(ABC):
    """An ASGI app that completes the lifespan protocol itself and answers HTTP in `http`."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self.http(scope, receive, send)
        elif scope["type"] == "lifespan":
            await _lifespan(receive, send)

    @abstractmethod
    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Answer one HTTP request."""


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def read_body(receive: Receive) -> bytes:
    """The whole request body, however many messages it came in."""
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(chunks)


async def wait_disconnect(receive: Receive) -> None:
    """Return when the client has gone away (after the body has been read)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def send_response(send: Send, status: int, body: bytes, headers: Iterable[Header] = ()) -> None:
    """A complete response in two messages, with its content-length."""
    length: Header = (b"content-length", str(len(body)).encode())
    await send({"type": "http.response.start", "status": status, "headers": [*headers, length]})
    await send({"type": "http.response.body", "body": body})


def allow_header(methods: Iterable[str]) -> Header:
    """The `allow` header of a 405 answer."""
    return (b"allow", ", ".join(methods).encode())


def command_line(*, prog: str, description: str, port: int) -> argparse.ArgumentParser:
    """A parser with the options every fake takes: --host (loopback by default) and --port."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--host", default="127.0.0.1", help="interface (default: %(default)s)")
    parser.add_argument("--port", type=int, default=port, help="port (default: %(default)s)")
    return parser


def serve(app: App, *, host: str, port: int, banner: str) -> None:
    """Run `app` under uvicorn (uvloop and httptools when installed) until interrupted; `banner` goes to stderr."""
    import uvicorn  # only serving needs uvicorn; the apps themselves do not

    print(banner, file=sys.stderr, flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)


@contextlib.contextmanager
def serve_in_thread(app: App, *, timeout: float = 10.0) -> Iterator[str]:
    """Serve `app` under uvicorn in a thread of this process, on a free loopback port; yields its URL.

    For fakes whose state the caller reads and arranges directly (in-process), unlike `serve`.
    """
    import uvicorn

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, daemon=True, name=f"{type(app).__name__}:{port}")
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError(f"{type(app).__name__} did not start serving on port {port}")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=timeout)
