"""The parse stage: the body within the size limit, as strict as the route's schema, and the fields it reads."""

from __future__ import annotations

import orjson
import pytest
from django.test import override_settings

from resource_server.errors import InvalidRequest
from resource_server.pipeline.parse import BodyReader, body_read, request_parse, upstream_request
from resource_server.routes import ROUTES, Route

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def _reader(body: bytes, reads: list[int | None]) -> BodyReader:
    async def read(limit: int | None) -> bytes:
        reads.append(limit)
        return body

    return read


@override_settings(DATA_UPLOAD_MAX_MEMORY_SIZE=10)
async def test_a_declared_length_over_the_limit_is_refused_before_the_body_is_read() -> None:
    reads: list[int | None] = []
    with pytest.raises(InvalidRequest) as refused:
        await body_read(content_length=11, read=_reader(b"x", reads))
    assert (refused.value.status, refused.value.code) == (413, "request_too_large")
    assert reads == []


@override_settings(DATA_UPLOAD_MAX_MEMORY_SIZE=10)
async def test_a_body_longer_than_declared_and_the_limit_is_refused() -> None:
    reads: list[int | None] = []
    with pytest.raises(InvalidRequest) as refused:
        await body_read(content_length=5, read=_reader(b"x" * 11, reads))
    assert refused.value.status == 413
    assert reads == [10], "the reader is told the limit, so it may stop past it"
    assert await body_read(content_length=None, read=_reader(b"x" * 10, reads)) == b"x" * 10


def test_the_fields_the_gateway_reads_come_from_the_descriptor() -> None:
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}, "n": 2, "max_completion_tokens": 7}
    request = request_parse(ROUTES[Route.CHAT], orjson.dumps(body))
    assert (request.model, request.stream, request.include_usage, request.n, request.max_tokens) == (
        "m",
        True,
        True,
        2,
        7,
    )
    plain = request_parse(ROUTES[Route.COMPLETIONS], orjson.dumps({"model": "m", "prompt": "a", "max_tokens": 3}))
    assert (plain.stream, plain.include_usage, plain.n, plain.max_tokens) == (False, False, 1, 3)
    # Embeddings never stream, whatever the body says (the model server decides what it makes of the field).
    embedding = request_parse(ROUTES[Route.EMBEDDINGS], orjson.dumps({"model": "m", "input": "a", "stream": True}))
    assert (embedding.stream, embedding.max_tokens) == (False, None)


@pytest.mark.parametrize(
    ("raw", "code", "param"),
    [
        (b"{", "invalid_json", None),
        (b"[1]", "invalid_json", None),
        (orjson.dumps({"model": "m"}), "missing_required_parameter", "messages"),
        (orjson.dumps({**CHAT, "temperature": "0.5"}), "invalid_value", "temperature"),
        (orjson.dumps({**CHAT, "stream_options": {"include_usage": True}}), "invalid_value", None),
    ],
)
def test_a_body_the_schema_refuses_is_a_400_naming_the_field(raw: bytes, code: str, param: str | None) -> None:
    with pytest.raises(InvalidRequest) as refused:
        request_parse(ROUTES[Route.CHAT], raw)
    assert (refused.value.status, refused.value.code, refused.value.param) == (400, code, param)


def test_a_stream_always_asks_the_model_server_for_usage_and_leaves_the_body_alone() -> None:
    descriptor = ROUTES[Route.CHAT]
    request = request_parse(descriptor, orjson.dumps({**CHAT, "stream": True, "top_k": 3}))
    upstream = upstream_request(descriptor, request, "rid")
    assert upstream.body == {**CHAT, "stream": True, "top_k": 3, "stream_options": {"include_usage": True}}
    assert "stream_options" not in request.body
    plain = request_parse(descriptor, orjson.dumps(CHAT))
    assert upstream_request(descriptor, plain, "rid").body is plain.body
