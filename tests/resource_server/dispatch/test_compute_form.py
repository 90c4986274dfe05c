"""Audio forms through a compute backend: carried whole in the task, within Globus Compute's payload limit."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator

import pytest

from resource_server.dispatch.base import UpstreamRequest
from resource_server.dispatch.compute import TASK_FORM_MAX_BYTES, TASK_PAYLOAD_BYTES, form_in_task
from resource_server.errors import InvalidRequest
from resource_server.pipeline.form import form_read
from resource_server.routes import Route

CONTENT_TYPE = "multipart/form-data; boundary=b0"
HEAD = b'--b0\r\nContent-Disposition: form-data; name="model"\r\n\r\nwhisper\r\n'
HEAD += b'--b0\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\n'
CLOSE = b"\r\n--b0--\r\n"


async def request_of(audio: bytes, *, declared: bool) -> tuple[UpstreamRequest, list[int]]:
    """A form request whose audio arrives in 1 MiB pieces; the list counts the pieces read."""
    taken = [0]

    async def pieces() -> AsyncIterator[bytes]:
        yield HEAD
        for start in range(0, len(audio), 1 << 20):
            taken[0] += 1
            yield audio[start : start + (1 << 20)]
        yield CLOSE

    length = len(HEAD) + len(audio) + len(CLOSE) if declared else None
    form = await form_read(content_type=CONTENT_TYPE, content_length=length, chunks=pieces())
    return UpstreamRequest(Route.TRANSCRIPTIONS, {"model": "whisper"}, "r1", form=form), taken


def test_the_form_limit_leaves_room_in_the_task_payload_for_base64_and_the_rest() -> None:
    assert TASK_FORM_MAX_BYTES / 3 * 4 < TASK_PAYLOAD_BYTES - 128 * 1024


async def test_a_form_travels_whole_and_base64_encoded_in_the_task() -> None:
    request, _ = await request_of(b"RIFF" * 1000, declared=True)
    carried = await form_in_task(request)
    assert carried.form is None
    assert carried.body["content_type"] == CONTENT_TYPE
    assert base64.b64decode(carried.body["data"]) == HEAD + b"RIFF" * 1000 + CLOSE


@pytest.mark.parametrize("declared", [True, False])
async def test_a_form_over_the_task_limit_is_refused_with_413_saying_why(declared: bool) -> None:
    request, taken = await request_of(bytes(TASK_FORM_MAX_BYTES), declared=declared)
    with pytest.raises(InvalidRequest) as refused:
        await form_in_task(request)
    assert (refused.value.status, refused.value.code) == (413, "request_too_large")
    assert "Globus Compute" in refused.value.message and "7.3 MiB" in refused.value.message
    # A declared length is refused before the audio is read; otherwise reading stops once past the limit.
    assert taken[0] == (0 if declared else 8)
