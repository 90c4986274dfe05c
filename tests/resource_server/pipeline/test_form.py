"""Audio forms: the fields the gateway reads found as the form streams by, the rest sent on as it arrives."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import replace

import pytest
from django.conf import settings
from django.test import override_settings
from python_multipart import MultipartParser
from python_multipart.multipart import parse_options_header

from resource_server.errors import InvalidRequest, UpstreamError
from resource_server.pipeline.form import FormUpload, form_parse, form_read
from resource_server.pipeline.parse import upstream_request
from resource_server.routes import ROUTES, Route

BOUNDARY = "fence42"
CONTENT_TYPE = f"multipart/form-data; boundary={BOUNDARY}"
TRANSCRIPTIONS = ROUTES[Route.TRANSCRIPTIONS]


def field(name: str, value: str) -> bytes:
    return f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()


def file_head(name: str = "file") -> bytes:
    return (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"; filename="a.wav"\r\n'
        "Content-Type: audio/wav\r\n\r\n"
    ).encode()


CLOSE = f"\r\n--{BOUNDARY}--\r\n".encode()


class Sender:
    """A client sending the body in the given chunks; counts how many the gateway has taken."""

    def __init__(self, *chunks: bytes) -> None:
        self.chunks = chunks
        self.taken = 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in self.chunks:
            self.taken += 1
            yield chunk

    def stream(self) -> AsyncIterator[bytes]:
        return aiter(self)


async def read(sender: Sender, length: int | None = None) -> FormUpload:
    return await form_read(content_type=CONTENT_TYPE, content_length=length, chunks=sender.stream())


async def sent(upload: FormUpload) -> bytes:
    return b"".join([chunk async for chunk in upload.chunks()])


def parts(body: bytes) -> list[tuple[str, bool, bytes]]:
    """(name, is a file, value) of each part, parsed by python-multipart as vLLM's FastAPI parses forms."""
    found: list[tuple[str, bool, bytes]] = []
    header = [b"", b""]
    current: list[object] = []

    def header_end() -> None:
        if header[0].lower() == b"content-disposition":
            options = parse_options_header(header[1])[1]
            current[:] = [options[b"name"].decode(), b"filename" in options, bytearray()]
        header[:] = [b"", b""]

    def data(chunk: bytes, start: int, end: int) -> None:
        value = current[2]
        assert isinstance(value, bytearray)
        value += chunk[start:end]

    def part_end() -> None:
        name, is_file, value = current
        assert isinstance(name, str) and isinstance(is_file, bool) and isinstance(value, bytearray)
        found.append((name, is_file, bytes(value)))

    callbacks = {
        "on_header_field": lambda chunk, start, end: header.__setitem__(0, header[0] + chunk[start:end]),
        "on_header_value": lambda chunk, start, end: header.__setitem__(1, header[1] + chunk[start:end]),
        "on_header_end": header_end,
        "on_part_data": data,
        "on_part_end": part_end,
    }
    parser = MultipartParser(BOUNDARY, callbacks)  # type: ignore[arg-type]  # a TypedDict of callbacks
    parser.write(body)
    parser.finalize()
    return found


@contextmanager
def audio_limit(limit: int) -> Iterator[None]:
    with override_settings(GATEWAY=settings.GATEWAY.model_copy(update={"AUDIO_MAX_BYTES": limit})):
        yield


AUDIO = bytes(range(256)) * 64


async def test_fields_before_the_file_are_read_without_waiting_for_the_file() -> None:
    head = field("model", "whisper") + field("stream", "true") + file_head()
    sender = Sender(head, AUDIO[:8000], AUDIO[8000:], CLOSE)
    upload = await read(sender)
    assert sender.taken == 1  # routed on the first chunk: the audio is still with the client
    request = form_parse(TRANSCRIPTIONS, upload)
    assert (request.model, request.stream, request.include_usage) == ("whisper", True, False)
    assert await sent(upload) == b"".join(sender.chunks)
    assert sender.taken == 4


async def test_a_model_after_the_file_is_found_by_spooling_the_whole_form() -> None:
    body = file_head() + AUDIO + b"\r\n" + field("model", "whisper") + field("stream_include_usage", "on")
    body += field("stream", "1") + f"--{BOUNDARY}--\r\n".encode()
    sender = Sender(body[:100], body[100:5000], body[5000:])
    upload = await read(sender)
    assert sender.taken == 3
    request = form_parse(TRANSCRIPTIONS, upload)
    assert (request.model, request.stream, request.include_usage) == ("whisper", True, True)
    assert await sent(upload) == body


async def test_added_fields_come_last_so_the_model_server_takes_them() -> None:
    head = field("model", "WHISPER") + field("stream", "true") + field("stream_include_usage", "false")
    sender = Sender(head + file_head(), AUDIO, CLOSE)
    parsed = form_parse(TRANSCRIPTIONS, await read(sender))
    request = upstream_request(TRANSCRIPTIONS, replace(parsed, model="whisper"), "r1")
    assert isinstance(request.form, FormUpload)
    body = await sent(request.form)
    assert parts(body) == [
        ("model", False, b"WHISPER"),
        ("stream", False, b"true"),
        ("stream_include_usage", False, b"false"),
        ("file", True, AUDIO),
        ("model", False, b"whisper"),  # the registered name, where the client's differs only by case
        ("stream_include_usage", False, b"true"),  # usage on every chunk, which the respond stage takes out again
        ("stream_continuous_usage_stats", False, b"true"),
    ]
    assert not parsed.include_usage  # what the client asked for is what it gets


@pytest.mark.parametrize("split", [False, True])
async def test_a_stream_field_after_the_file_is_refused_once_the_form_was_routed_by_an_earlier_model(
    split: bool,
) -> None:
    tail = b"\r\n" + field("stream", "true") + f"--{BOUNDARY}--\r\n".encode()
    head = field("model", "whisper") + file_head() + AUDIO
    sender = Sender(head, tail) if split else Sender(head + tail)
    with pytest.raises(InvalidRequest) as refused:
        await sent(await read(sender))
    assert (refused.value.status, refused.value.code, refused.value.param) == (400, "form_field_after_file", "stream")


async def test_an_upload_over_the_limit_is_refused_on_its_declared_length_and_as_it_arrives() -> None:
    head = field("model", "whisper") + file_head()
    with audio_limit(4096):
        sender = Sender(head, AUDIO)
        with pytest.raises(InvalidRequest) as declared:
            await read(sender, length=len(head) + len(AUDIO))
        assert (declared.value.status, sender.taken) == (413, 0)

        upload = await read(Sender(head, AUDIO[:2000], AUDIO[2000:], CLOSE))
        with pytest.raises(InvalidRequest) as arriving:
            await sent(upload)
        assert (arriving.value.status, arriving.value.code) == (413, "request_too_large")


async def test_a_body_that_is_not_a_form_goes_on_unchanged_with_no_fields() -> None:
    body = b'{"model": "whisper"}'
    upload = await form_read(content_type="application/json", content_length=None, chunks=Sender(body).stream())
    upload.add_fields({"model": "whisper"})  # nowhere to put them
    assert form_parse(TRANSCRIPTIONS, upload).model is None
    assert await sent(upload) == body


async def test_an_upload_is_sent_once_only() -> None:
    upload = await read(Sender(field("model", "whisper") + file_head() + AUDIO + CLOSE))
    assert await sent(upload)
    with pytest.raises(UpstreamError):
        await sent(upload)


async def test_a_long_text_field_is_passed_on_unread_without_losing_the_fields_the_gateway_reads() -> None:
    prompt = "fox " * 20_000  # 80 kB: more than the gateway keeps of the other fields
    head = field("prompt", prompt) + field("model", "whisper") + field("language", "en") + file_head()
    sender = Sender(head, AUDIO, CLOSE)
    upload = await read(sender)
    assert upload.fields == {"model": "whisper", "language": "en"}
    assert form_parse(TRANSCRIPTIONS, upload).model == "whisper"
    assert await sent(upload) == b"".join(sender.chunks)
