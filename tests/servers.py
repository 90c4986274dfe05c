"""Real server processes on free loopback ports, for API and end-to-end tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

if TYPE_CHECKING:
    from fakes.model_server import FakeServerConfig

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until_up(url: str, process: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args} exited with {process.returncode} before answering {url}")
        try:
            if httpx.get(url, timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{url} did not come up within {timeout} s")


@contextmanager
def running(
    args: Sequence[str], health_url: str, env: dict[str, str] | None = None, timeout: float = 30.0
) -> Iterator[subprocess.Popen[bytes]]:
    process = subprocess.Popen(list(args), cwd=ROOT, env={**os.environ, **(env or {})})
    try:
        wait_until_up(health_url, process, timeout)
        yield process
    finally:
        stop(process)


def stop(process: subprocess.Popen[bytes]) -> None:
    """End a server: SIGTERM, then SIGKILL if it has not exited within 15 s."""
    process.terminate()
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@contextmanager
def fake_model_server(*options: str) -> Iterator[str]:
    """The project's fake vLLM server; yields its OpenAI base URL (ending in /v1)."""
    port = free_port()
    args = [sys.executable, "-m", "fakes.model_server", "--port", str(port), *options]
    with running(args, f"http://127.0.0.1:{port}/health"):
        yield f"http://127.0.0.1:{port}/v1"


@contextmanager
def gateway_server(env: dict[str, str], *, workers: int = 1) -> Iterator[str]:
    """The gateway as deployed: gunicorn with uvicorn workers (one unless told). Yields its root URL."""
    port = free_port()
    args = [
        str(Path(sys.executable).with_name("gunicorn")),
        "-c",
        "deploy/gunicorn.conf.py",
        "--bind",
        f"127.0.0.1:{port}",
        "--workers",
        str(workers),
    ]
    # Compute functions (the `local` backend) stream back to this gateway's own relay route.
    env = {"RELAY_PUBLIC_URL": f"http://127.0.0.1:{port}", **env}
    with running(args, f"http://127.0.0.1:{port}/resource_server/health", env):
        yield f"http://127.0.0.1:{port}"


def fake_stats(base_url: str) -> dict[str, object]:
    response = httpx.get(base_url.removesuffix("/v1") + "/fake/stats", timeout=5)
    response.raise_for_status()
    data: dict[str, object] = response.json()
    return data


@contextmanager
def fake_globus_server(*options: str) -> Iterator[str]:
    """The project's fake Globus Auth + Groups; yields its root URL (for GLOBUS_SDK_SERVICE_URL_*)."""
    port = free_port()
    args = [sys.executable, "-m", "fakes.globus", "--port", str(port), *options]
    with running(args, f"http://127.0.0.1:{port}/fake/stats"):
        yield f"http://127.0.0.1:{port}/"


def server_database_url() -> str:
    """A URL for the test database pytest-django set up, so server processes use the tests' rows."""
    from django.db import connection

    config = connection.settings_dict
    if config["ENGINE"].endswith("sqlite3"):
        return f"sqlite:///{config['NAME']}"
    password = f":{config['PASSWORD']}" if config["PASSWORD"] else ""
    return f"postgres://{config['USER']}{password}@{config['HOST']}:{config['PORT'] or 5432}/{config['NAME']}"


@contextmanager
def fake_model_server_in_thread(config: FakeServerConfig, *, port: int = 0) -> Iterator[str]:
    """The fake model server under uvicorn in a thread of this process on `port` (0: a free one; a given port may
    be served again after it stops); yields its base URL (without /v1)."""
    import uvicorn  # here: most tests that import this module start no server in-process

    from fakes.model_server import create_app

    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    bound = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(config), log_level="warning", access_log=False, lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the fake model server did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{bound}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
