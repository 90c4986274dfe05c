"""The direct backend reaches its model server through the forward proxy the gateway's environment names."""

from __future__ import annotations

import asyncio
import base64
import datetime
import ipaddress
import logging
import os
import ssl
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import orjson
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from resource_server.dispatch.base import UpstreamRequest
from resource_server.dispatch.direct import DirectBackend, DirectConfig
from resource_server.errors import ServiceUnavailable, UpstreamError
from resource_server.routes import Route

CHAT = {"model": "demo-model", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}


async def read_head(reader: asyncio.StreamReader) -> bytes:
    """The next message head, or b"" when the peer closed between messages."""
    try:
        return await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise
        return b""


def parse_head(head: bytes) -> tuple[str, list[tuple[str, str]], dict[str, str]]:
    """The start line, the header lines in order, and the headers by lower-case name."""
    start, *lines = head.decode("latin1").removesuffix("\r\n\r\n").split("\r\n")
    fields = [(name, value.strip()) for name, value in (line.split(":", 1) for line in lines)]
    return start, fields, {name.lower(): value for name, value in fields}


async def relay_response(upstream: asyncio.StreamReader, client: asyncio.StreamWriter) -> bool:
    """Copy one response as it arrives (Content-Length, chunked or to the end); whether the upstream keeps alive."""
    head = await upstream.readuntil(b"\r\n\r\n")
    client.write(head)
    _, _, headers = parse_head(head)
    if "content-length" in headers:
        client.write(await upstream.readexactly(int(headers["content-length"])))
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size_line = await upstream.readuntil(b"\r\n")
            client.write(size_line)
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                while (trailer := await upstream.readuntil(b"\r\n")) != b"\r\n":
                    client.write(trailer)
                client.write(b"\r\n")
                break
            client.write(await upstream.readexactly(size + 2))
            await client.drain()
    else:
        client.write(await upstream.read())
        await client.drain()
        return False
    await client.drain()
    return headers.get("connection", "").lower() != "close"


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


class FakeProxy:
    """A forward proxy on loopback, as squid behaves towards a client.

    Absolute-form requests are forwarded in origin form over an upstream connection kept for the client's
    connection; CONNECT opens a tunnel that pipes bytes blindly both ways. It records every request line
    and Proxy-Authorization header, and can refuse CONNECT (403) or demand credentials (407).
    """

    def __init__(self, *, refuse_connect: bool = False, credentials: str | None = None) -> None:
        self.refuse_connect = refuse_connect
        self.expected = None if credentials is None else "Basic " + base64.b64encode(credentials.encode()).decode()
        self.requests: list[str] = []  # "METHOD target", as the client sent them
        self.authorizations: list[str | None] = []
        self.connections = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.close()  # each handler then sees the end of its connection and returns
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        self.connections += 1
        upstreams: dict[tuple[str, int], tuple[asyncio.StreamReader, asyncio.StreamWriter]] = {}
        try:
            while head := await read_head(reader):
                start, fields, headers = parse_head(head)
                method, target, _ = start.split(" ")
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                self.requests.append(f"{method} {target}")
                self.authorizations.append(headers.get("proxy-authorization"))
                if self.expected is not None and headers.get("proxy-authorization") != self.expected:
                    writer.write(
                        b"HTTP/1.1 407 Proxy Authentication Required\r\n"
                        b'Proxy-Authenticate: Basic realm="fake"\r\nContent-Length: 0\r\n\r\n'
                    )
                    continue
                if method == "CONNECT":
                    if self.refuse_connect:
                        writer.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
                        continue
                    host, port = target.rsplit(":", 1)
                    tunnel_reader, tunnel_writer = await asyncio.open_connection(host, int(port))
                    writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
                    await asyncio.gather(pipe(reader, tunnel_writer), pipe(tunnel_reader, writer))
                    return
                url = urlsplit(target)
                assert url.scheme == "http" and url.hostname, f"not an absolute-form target: {target}"
                key = (url.hostname, url.port or 80)
                if key not in upstreams:
                    upstreams[key] = await asyncio.open_connection(*key)
                upstream_reader, upstream_writer = upstreams[key]
                lines = [f"{method} {url.path}{'?' + url.query if url.query else ''} HTTP/1.1"]
                lines += [f"{name}: {value}" for name, value in fields if name.lower() != "proxy-authorization"]
                upstream_writer.write("".join(f"{line}\r\n" for line in [*lines, ""]).encode("latin1") + body)
                if not await relay_response(upstream_reader, writer):
                    upstream_writer.close()
                    del upstreams[key]
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            for _, upstream_writer in upstreams.values():
                upstream_writer.close()
            writer.close()
            self._writers.discard(writer)
            self._tasks.discard(task)


@pytest.fixture(autouse=True)
def no_proxy_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test sets the proxy variables it means; none of the machine's own may change what it sees."""
    for name in list(os.environ):
        if name.lower().endswith("_proxy"):
            monkeypatch.delenv(name)


@pytest.fixture
async def proxy() -> AsyncIterator[FakeProxy]:
    fake = FakeProxy()
    yield fake
    await fake.close()


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    """A self-signed certificate for 127.0.0.1 and localhost: (certificate file, key file)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fake model server")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    directory = tmp_path_factory.mktemp("tls")
    cert_file, key_file = directory / "cert.pem", directory / "key.pem"
    cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    yield cert_file, key_file


@pytest.fixture
async def tls_server(
    certificate: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[str, list[str]]]:
    """An HTTPS server on loopback answering every request with a small JSON body, trusted by backends built
    after it started: (its base URL, the request lines it saw)."""
    cert_file, key_file = certificate
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_file, key_file)
    seen: list[str] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while head := await read_head(reader):
                start, _, headers = parse_head(head)
                await reader.readexactly(int(headers.get("content-length", "0")))
                seen.append(f"{start} Host: {headers.get('host')}")
                body = orjson.dumps({"object": "chat.completion", "served_by": "tls upstream"})
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n")
                writer.write(b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=context)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert_file))
    yield f"https://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1", seen
    server.close()


def backend_for(base_url: str) -> DirectBackend:
    return DirectBackend(DirectConfig(base_url=base_url, connect_timeout=2.0))


async def test_plain_http_goes_through_the_proxy_in_absolute_form_on_one_kept_connection(
    model_server: str, proxy: FakeProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HTTP_PROXY", f"http://{await proxy.start()}")
    backend = backend_for(model_server)

    answer = orjson.loads(await backend.submit(UpstreamRequest(Route.CHAT, CHAT, "r1")))
    stream = await backend.open_stream(UpstreamRequest(Route.CHAT, {**CHAT, "stream": True}, "r2"))
    events = [event async for event in stream]
    await stream.aclose()
    await backend.submit(UpstreamRequest(Route.CHAT, CHAT, "r3"))
    await backend.aclose()

    assert answer["model"] == "demo-model" and answer["choices"][0]["message"]["content"]
    assert events[0].startswith(b"data: {") and events[-1].startswith(b"data: [DONE]")
    target = f"POST {model_server}/chat/completions"
    assert proxy.requests == [target, target, target]
    assert proxy.authorizations == [None, None, None]
    assert proxy.connections == 1, "each request opened a new connection to the proxy"


@pytest.mark.parametrize(
    ("no_proxy", "bypassed"),
    [
        ("127.0.0.1", True),
        ("localhost, 127.0.0.1", True),
        ("{host_port}", True),
        ("*", True),
        ("node12.cluster,.example.org", False),
    ],
)
async def test_no_proxy_decides_which_servers_skip_the_proxy(
    model_server: str, proxy: FakeProxy, monkeypatch: pytest.MonkeyPatch, no_proxy: str, bypassed: bool
) -> None:
    monkeypatch.setenv("http_proxy", f"http://{await proxy.start()}")
    monkeypatch.setenv("NO_PROXY", no_proxy.format(host_port=urlsplit(model_server).netloc))
    backend = backend_for(model_server)

    answer = orjson.loads(await backend.submit(UpstreamRequest(Route.CHAT, CHAT, "r1")))
    await backend.aclose()

    assert answer["model"] == "demo-model"
    assert proxy.requests == ([] if bypassed else [f"POST {model_server}/chat/completions"])


async def test_credentials_in_the_proxy_url_become_proxy_authorization(
    model_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    proxy = FakeProxy(credentials="gw@site:p:ss w")
    monkeypatch.setenv("ALL_PROXY", f"http://gw%40site:p%3Ass%20w@{await proxy.start()}")
    backend = backend_for(model_server)
    try:
        answer = orjson.loads(await backend.submit(UpstreamRequest(Route.CHAT, CHAT, "r1")))
    finally:
        await backend.aclose()
        await proxy.close()

    assert answer["model"] == "demo-model"
    assert proxy.authorizations == ["Basic " + base64.b64encode(b"gw@site:p:ss w").decode()]


async def test_https_goes_through_a_connect_tunnel(
    tls_server: tuple[str, list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    base_url, upstream_saw = tls_server
    authority = urlsplit(base_url).netloc
    proxy = FakeProxy(credentials="gw:secret")
    monkeypatch.setenv("https_proxy", f"http://gw:secret@{await proxy.start()}")
    backend = backend_for(base_url)
    try:
        first = orjson.loads(await backend.submit(UpstreamRequest(Route.CHAT, CHAT, "r1")))
        await backend.submit(UpstreamRequest(Route.CHAT, CHAT, "r2"))
    finally:
        await backend.aclose()
        await proxy.close()

    assert first["served_by"] == "tls upstream"
    assert proxy.requests == [f"CONNECT {authority}"], "one tunnel, kept for both requests"
    assert proxy.authorizations == ["Basic " + base64.b64encode(b"gw:secret").decode()]
    assert upstream_saw == [f"POST /v1/chat/completions HTTP/1.1 Host: {authority}"] * 2


async def test_a_refused_connect_is_unreachable_and_logs_the_status_without_credentials(
    tls_server: tuple[str, list[str]], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    base_url, upstream_saw = tls_server
    proxy = FakeProxy(refuse_connect=True)
    monkeypatch.setenv("HTTPS_PROXY", f"http://gw:hunter2@{await proxy.start()}")
    backend = backend_for(base_url)
    try:
        with caplog.at_level(logging.WARNING), pytest.raises(ServiceUnavailable) as raised:
            await backend.submit(UpstreamRequest(Route.CHAT, CHAT, "r1"))
    finally:
        await backend.aclose()
        await proxy.close()

    assert raised.value.status == 503 and raised.value.code == "upstream_unreachable"
    assert proxy.requests == [f"CONNECT {urlsplit(base_url).netloc}"]
    assert upstream_saw == []
    assert "ConnectError" in caplog.text and "HTTP 403" in caplog.text
    assert "hunter2" not in caplog.text and base64.b64encode(b"gw:hunter2").decode() not in caplog.text


@pytest.mark.parametrize(
    ("variable", "proxy_url", "base_url"),
    [
        ("HTTPS_PROXY", "socks5://gw:hunter2@127.0.0.1:1080", "https://node12.cluster:8443/v1"),
        ("https_proxy", "https://gw:hunter2@proxy.site:3128", "https://node12.cluster/v1"),
        ("ALL_PROXY", "socks5h://gw:hunter2@127.0.0.1:1080", "http://node12.cluster:8000/v1"),
    ],
)
def test_an_unsupported_proxy_scheme_fails_when_the_backend_is_built(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, variable: str, proxy_url: str, base_url: str
) -> None:
    monkeypatch.setenv(variable, proxy_url)
    with caplog.at_level(logging.ERROR), pytest.raises(UpstreamError) as raised:
        backend_for(base_url)

    assert raised.value.code == "backend_misconfigured"
    assert variable in caplog.text
    assert "hunter2" not in caplog.text
