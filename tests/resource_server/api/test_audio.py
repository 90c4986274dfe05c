"""The audio routes through both doors: uploads stream on to the model server, never held whole in memory."""

from __future__ import annotations

import asyncio
import struct
import tracemalloc
from collections.abc import Iterator, MutableMapping
from typing import Any

import orjson
import pytest

from gateway.asgi import django_application, inference_app
from resource_server.bootstrap import runtime
from resource_server.models import Cluster, Endpoint, RequestLog
from tests.audio import wav_clip
from tests.conftest import Seeded
from tests.servers import free_port

pytestmark = pytest.mark.django_db(transaction=True)

PATH = "/resource_server/v1/audio/transcriptions"
BOUNDARY = "audio-boundary-7d1f"
BLOCK = 64 * 1024


def field(name: str, value: str) -> bytes:
    return f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()


def file_head() -> bytes:
    return (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="talk.wav"\r\n'
        "Content-Type: audio/wav\r\n\r\n"
    ).encode()


CLOSE = f"\r\n--{BOUNDARY}--\r\n".encode()


def silent_wav_pieces(seconds: int, rate: int = 16000) -> tuple[bytes, int]:
    """The header of a 16-bit mono WAV of `seconds` of silence, and how many sample bytes follow it."""
    data = seconds * rate * 2
    header = (
        b"RIFF" + struct.pack("<I", 36 + data) + b"WAVEfmt " + struct.pack("<IHHIIHH", 16, 1, 1, rate, rate * 2, 2, 16)
    )
    return header + b"data" + struct.pack("<I", data), data


async def send_form(
    app: Any,
    auth: dict[str, str],
    pieces: Iterator[bytes],
    length: int,
    *,
    then_leave: bool = False,
    boundary: str = BOUNDARY,
) -> tuple[int, bytes]:
    """POST a form through an ASGI app as uvicorn delivers it: one message per piece, each made only when the
    app asks for it (so the test holds no more of the body than the app does); `then_leave`: the client
    disconnects after the pieces instead of ending the body."""
    headers = {"host": "127.0.0.1:8000", "content-type": f"multipart/form-data; boundary={boundary}"}
    headers |= {name.lower(): value for name, value in auth.items()} | {"content-length": str(length)}
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": PATH,
        "raw_path": PATH.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(name.encode(), value.encode()) for name, value in headers.items()],
        "client": ("127.0.0.1", 40000),
        "server": ("127.0.0.1", 8000),
    }
    finished = asyncio.Event()
    status = 0
    answer = bytearray()

    async def receive() -> dict[str, Any]:
        piece = next(pieces, None)
        if piece is not None:
            return {"type": "http.request", "body": piece, "more_body": True}
        if then_leave:
            return {"type": "http.disconnect"}
        if not finished.is_set() and status == 0 and not answer:
            finished.set()  # the body's end, once
            return {"type": "http.request", "body": b"", "more_body": False}
        await asyncio.Event().wait()  # the client stays connected
        raise AssertionError("unreachable")

    async def send(message: MutableMapping[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        else:
            answer.extend(message.get("body", b""))

    await app(scope, receive, send)
    return status, bytes(answer)


def large_form(seconds: int) -> tuple[Iterator[bytes], int]:
    header, samples = silent_wav_pieces(seconds)
    head = field("model", "demo-model") + file_head() + header
    zeros = bytes(BLOCK)

    def pieces() -> Iterator[bytes]:
        yield head
        for start in range(0, samples, BLOCK):
            yield zeros[: min(BLOCK, samples - start)]
        yield CLOSE

    return pieces(), len(head) + samples + len(CLOSE)


async def test_a_large_upload_streams_through_without_being_held_in_memory(seeded: Seeded) -> None:
    pieces, length = large_form(seconds=700)  # 22.4 MB of audio, under the 25 MiB cap
    tracemalloc.start()
    try:
        status, answer = await send_form(inference_app, seeded.auth, pieces, length)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert status == 200, answer
    assert orjson.loads(answer)["usage"] == {"type": "duration", "seconds": 700}
    # What the gateway held at once: a few of its 64 KiB blocks and its own bookkeeping, not the 22 MB upload.
    assert peak < 4 * 1024 * 1024, f"peak {peak / 1024 / 1024:.1f} MiB"
    runtime().usage_sink.flush(timeout=10)
    row = await RequestLog.objects.aget(route="audio/transcriptions")
    assert (row.status_code, row.audio_seconds, row.prompt_tokens) == (200, 700, None)


async def test_an_upload_over_the_cap_is_refused_with_413_before_it_is_read(seeded: Seeded) -> None:
    pieces, length = large_form(seconds=900)  # 28.8 MB
    status, answer = await send_form(inference_app, seeded.auth, pieces, length)
    assert status == 413
    assert orjson.loads(answer)["error"]["code"] == "request_too_large"
    assert next(pieces) == field("model", "demo-model") + file_head() + silent_wav_pieces(900)[0]  # none was read


async def test_both_doors_answer_a_form_alike(seeded: Seeded) -> None:
    body = field("model", "demo-model") + field("stream", "true") + field("stream_include_usage", "true")
    body += file_head() + wav_clip(1.5) + CLOSE
    lean = await send_form(inference_app, seeded.auth, iter([body[:300], body[300:]]), len(body))
    django = await send_form(django_application, seeded.auth, iter([body]), len(body))
    assert lean[0] == django[0] == 200
    assert lean[1].count(b"transcription.chunk") == django[1].count(b"transcription.chunk") > 2
    assert lean[1].endswith(b"data: [DONE]\n\n") and django[1].endswith(b"data: [DONE]\n\n")
    runtime().usage_sink.flush(timeout=10)
    rows = [row async for row in RequestLog.objects.filter(route="audio/transcriptions")]
    assert len(rows) == 2
    for row in rows:
        # Usage of a stream: the chunks' token counts (the prompt and the words heard).
        assert row.streamed and row.prompt_tokens == 4 and row.completion_tokens and row.audio_seconds is None


async def test_a_stream_without_usage_asked_for_is_still_metered(seeded: Seeded) -> None:
    body = field("model", "demo-model") + field("stream", "true") + file_head() + wav_clip(1.0) + CLOSE
    status, answer = await send_form(inference_app, seeded.auth, iter([body]), len(body))
    assert status == 200
    assert b'"usage"' not in answer  # the client asked for none: the gateway's own usage options are taken out
    runtime().usage_sink.flush(timeout=10)
    row = await RequestLog.objects.aget(route="audio/transcriptions")
    assert row.completion_tokens == answer.count(b"transcription.chunk")


async def test_a_form_without_a_model_on_the_generic_path_is_refused_with_400(seeded: Seeded) -> None:
    body = field("language", "en") + file_head() + wav_clip(0.5) + CLOSE
    status, answer = await send_form(inference_app, seeded.auth, iter([body]), len(body))
    assert status == 400
    assert orjson.loads(answer)["error"]["code"] == "missing_required_parameter"


async def test_a_form_whose_boundary_the_gateway_cannot_parse_is_a_400_not_a_500(seeded: Seeded) -> None:
    """python-multipart refuses boundaries over 256 bytes (RFC 2046 allows 70): the gateway reads no field of
    such a form, so on the generic path it cannot tell the model, and says so, in the envelope."""
    long = "b" * 300
    body = (
        f'--{long}\r\nContent-Disposition: form-data; name="model"\r\n\r\ndemo-model\r\n'.encode()
        + f'--{long}\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\n'.encode()
        + wav_clip(0.5)
        + f"\r\n--{long}--\r\n".encode()
    )
    for app in (inference_app, django_application):
        status, answer = await send_form(app, seeded.auth, iter([body]), len(body), boundary=long)
        assert status == 400, answer
        assert orjson.loads(answer)["error"]["code"] == "missing_required_parameter"


async def test_a_client_that_leaves_mid_upload_is_recorded_as_499(seeded: Seeded) -> None:
    pieces, length = large_form(seconds=300)

    def leaving() -> Iterator[bytes]:
        for _ in range(20):  # the head and about 1 MB of audio, then the client is gone
            yield next(pieces)

    await send_form(inference_app, seeded.auth, leaving(), length, then_leave=True)
    runtime().usage_sink.flush(timeout=10)
    row = await RequestLog.objects.aget(route="audio/transcriptions")
    assert (row.status_code, row.error_code) == (499, "client_disconnected")


async def test_an_upload_goes_to_the_next_endpoint_when_the_first_cannot_be_reached(
    seeded: Seeded, caplog: pytest.LogCaptureFixture
) -> None:
    dead = await Cluster.objects.acreate(name="aaa-first")  # sorted before the seeded cluster: tried first
    config = {"base_url": f"http://127.0.0.1:{free_port()}/v1", "connect_timeout": 2}  # nothing listens there
    first = await Endpoint.objects.acreate(cluster=dead, model="demo-model", backend="direct", backend_config=config)
    body = field("model", "demo-model") + file_head() + wav_clip(1.0) + CLOSE
    status, answer = await send_form(inference_app, seeded.auth, iter([body[:200], body[200:]]), len(body))
    assert status == 200, answer
    assert f"endpoint {first.pk} did not take the request" in caplog.text
    runtime().usage_sink.flush(timeout=10)
    row = await RequestLog.objects.aget(route="audio/transcriptions")
    assert (row.status_code, row.endpoint_id, row.audio_seconds) == (200, seeded.endpoint.pk, 1)
