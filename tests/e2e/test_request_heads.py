"""The gateway's own server limits request heads, for clients that reach its port without nginx.

A head (request line and headers) over MAX_HEADER_BYTES gets 431 and a closed connection, and costs the
worker no more memory than the limit; a head that has not arrived within HEADER_TIMEOUT_SECONDS gets its
connection closed. Everything runs against gunicorn as deployed (deploy/gunicorn.conf.py).
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from benchmarks.procfs import memory_kb
from tests.conftest import Seeded
from tests.e2e.conftest import e2e_gateway
from tests.proc import worker_pid

pytestmark = pytest.mark.django_db(transaction=True)

HEAD_TIMEOUT = 2.0  # seconds; the default is 10, shortened here so the test waits less
CHAT_PATH = "/resource_server/v1/chat/completions"
HELLO = b'{"model": "demo-model", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}'
MB = 1024 * 1024


@pytest.fixture(scope="module")
def gateway_url(django_db_setup: None, model_server: str, tmp_path_factory: Any) -> Iterator[str]:
    with e2e_gateway(tmp_path_factory, HEADER_TIMEOUT_SECONDS=str(HEAD_TIMEOUT)) as url:
        yield url


def _connect(url: str) -> socket.socket:
    parts = urlsplit(url)
    sock = socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 80), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _answer_or_close(sock: socket.socket, deadline: float) -> bytes | None:
    """What the server sends before it closes the connection; None if it neither answers nor closes."""
    received = b""
    while time.monotonic() < deadline:
        sock.settimeout(max(0.05, deadline - time.monotonic()))
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            break
        except ConnectionResetError:
            return received
        if not chunk:
            return received
        received += chunk
    return None


def _send_huge_head(url: str, size: int) -> bytes | None:
    """Send a request whose headers go on for `size` bytes; what came back before the connection closed."""
    sock = _connect(url)
    try:
        sock.sendall(f"POST {CHAT_PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\n".encode())
        line = b"X-Filler-%06d: " + b"a" * 1000 + b"\r\n"
        sent = 0
        try:
            while sent < size:
                block = b"".join(line % (sent // len(line) + i) for i in range(64))
                sock.sendall(block)
                sent += len(block)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server closed the connection while we were still sending: what we want
        return _answer_or_close(sock, time.monotonic() + 10)
    finally:
        sock.close()


def test_headers_over_the_limit_get_431_and_cost_the_worker_no_memory(gateway_url: str) -> None:
    worker = worker_pid(gateway_url)
    httpx.get(f"{gateway_url}/resource_server/health", timeout=10).raise_for_status()
    before = memory_kb(worker, "VmHWM")
    answers: list[bytes | None] = []

    def attack() -> None:
        answers.append(_send_huge_head(gateway_url, 16 * MB))

    # Four at once, as in the report, so that a worker buffering heads would hold all four together.
    attackers = [threading.Thread(target=attack) for _ in range(4)]
    for thread in attackers:
        thread.start()
    for thread in attackers:
        thread.join(timeout=60)
    grown_kb = memory_kb(worker, "VmHWM") - before
    # Buffering the heads would take 64 MB; the limit allows 64 KB plus one read per connection.
    assert grown_kb < 16 * 1024, f"the worker's peak memory grew by {grown_kb} KB"
    assert len(answers) == 4
    # 431 if the answer reached us, or b"" when the close reset the connection before we read it.
    assert all(answer is not None for answer in answers), "a connection was still open after 16 MB of headers"
    assert all(answer == b"" or answer.startswith(b"HTTP/1.1 431 ") for answer in answers), answers
    assert any(answer and answer.startswith(b"HTTP/1.1 431 ") for answer in answers)
    assert httpx.get(f"{gateway_url}/resource_server/health", timeout=10).status_code == 200


def test_a_silent_connection_is_closed(gateway_url: str) -> None:
    sock = _connect(gateway_url)
    try:
        assert _answer_or_close(sock, time.monotonic() + HEAD_TIMEOUT + 5) == b"", "still open"
    finally:
        sock.close()


def test_headers_sent_a_byte_at_a_time_are_cut_off(gateway_url: str) -> None:
    sock = _connect(gateway_url)
    head = f"POST {CHAT_PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ".encode() + b"z" * 10_000
    started = time.monotonic()
    try:
        try:
            for byte in head:
                sock.sendall(bytes([byte]))
                time.sleep(0.05)
                if time.monotonic() - started > HEAD_TIMEOUT + 5:
                    break
        except (BrokenPipeError, ConnectionResetError):
            return  # closed while we were still sending
        answer = _answer_or_close(sock, started + HEAD_TIMEOUT + 6)
    finally:
        sock.close()
    assert answer is not None, "the connection was still open"
    assert answer == b"" or answer.startswith(b"HTTP/1.1 408 "), answer[:200]


def test_requests_within_the_limits_are_served(gateway_url: str, seeded: Seeded) -> None:
    headers = {**seeded.auth, "Content-Type": "application/json"}
    big_but_allowed = {f"X-Extra-{i}": "b" * 1000 for i in range(40)}  # about 41 KB of headers
    with httpx.Client(base_url=gateway_url, timeout=20) as client:
        for extra in ({}, big_but_allowed, {}):  # one keep-alive connection, heads before and after a big one
            response = client.post(CHAT_PATH, content=HELLO, headers={**headers, **extra})
            assert response.status_code == 200, response.text
    # A head that arrives slowly but within the limit is still served.
    sock = _connect(gateway_url)
    try:
        request = (
            f"POST {CHAT_PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: {seeded.auth['Authorization']}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(HELLO)}\r\nConnection: close\r\n\r\n"
        ).encode()
        for start in range(0, len(request), len(request) // 4 + 1):
            sock.sendall(request[start : start + len(request) // 4 + 1])
            time.sleep(HEAD_TIMEOUT / 8)
        sock.sendall(HELLO)
        answer = _answer_or_close(sock, time.monotonic() + 20)
        assert answer is not None and answer.startswith(b"HTTP/1.1 200 "), answer
    finally:
        sock.close()


def _exchange(sock: socket.socket, request: bytes) -> bytes:
    """Send one request on a keep-alive connection and read its whole answer (by Content-Length)."""
    sock.sendall(request)
    received = b""
    while b"\r\n\r\n" not in received:
        chunk = sock.recv(65536)
        assert chunk, f"the connection closed; received {received[:200]!r}"
        received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")
    )
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "the connection closed mid-answer"
        body += chunk
    return head


def test_an_idle_keep_alive_connection_outlives_the_head_timeout(gateway_url: str, seeded: Seeded) -> None:
    request = (
        f"POST {CHAT_PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: {seeded.auth['Authorization']}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(HELLO)}\r\n\r\n"
    ).encode() + HELLO
    sock = _connect(gateway_url)
    try:
        assert _exchange(sock, request).startswith(b"HTTP/1.1 200 ")
        # Between requests the keep-alive timeout applies (gunicorn's keepalive, 75 s), not the head's.
        time.sleep(HEAD_TIMEOUT + 1)
        assert _exchange(sock, request).startswith(b"HTTP/1.1 200 ")
    finally:
        sock.close()
