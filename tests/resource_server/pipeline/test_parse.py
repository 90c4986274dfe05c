"""The parse stage: the body within the size limit, and the few fields it reads as vLLM reads them."""

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
        (orjson.dumps({**CHAT, "model": 5}), "invalid_value", "model"),
    ],
)
def test_only_what_vllm_refuses_too_is_refused_here(raw: bytes, code: str, param: str | None) -> None:
    with pytest.raises(InvalidRequest) as refused:
        request_parse(ROUTES[Route.CHAT], raw)
    assert (refused.value.status, refused.value.code, refused.value.param) == (400, code, param)


@pytest.mark.parametrize(
    "body",
    [
        {"model": "m"},  # no messages
        {**CHAT, "temperature": "0.5"},
        {**CHAT, "stream_options": {"include_usage": True}},  # without stream
        {**CHAT, "logprobs": 1, "seed": 1.0, "best_of": -1, "max_tokens": 0, "n": 0},
        {**CHAT, "stream": "maybe", "max_tokens": "many", "n": [2]},  # fields read, left for vLLM to refuse
    ],
)
def test_everything_else_is_left_to_the_model_server(body: dict[str, object]) -> None:
    request = request_parse(ROUTES[Route.CHAT], orjson.dumps(body))
    assert request.body == body
    assert request.n >= 1


@pytest.mark.parametrize(
    ("fields", "read"),
    [
        ({"stream": "true", "max_tokens": 4.0, "n": "2"}, (True, 4, 2)),
        ({"stream": 1, "max_tokens": "7", "n": 2.0}, (True, 7, 2)),
        ({"stream": "off", "max_tokens": 4.5, "n": True}, (False, None, 1)),
        ({"stream": "YES", "max_completion_tokens": 3, "max_tokens": 9}, (True, 3, 1)),
    ],
)
def test_fields_are_read_with_vllms_lax_coercion(fields: dict[str, object], read: tuple[object, ...]) -> None:
    request = request_parse(ROUTES[Route.CHAT], orjson.dumps({**CHAT, **fields}))
    assert (request.stream, request.max_tokens, request.n) == read


@pytest.mark.parametrize(
    ("options", "wishes"),
    [
        (None, (False, False)),
        ({}, (True, False)),  # vLLM: include_usage defaults to true once stream_options is given
        ({"include_usage": False, "continuous_usage_stats": True}, (False, False)),
        ({"continuous_usage_stats": "true"}, (True, True)),
        ({"include_usage": None}, (False, False)),
    ],
)
def test_stream_options_are_read_as_vllm_reads_them(options: object, wishes: tuple[bool, bool]) -> None:
    body = {**CHAT, "stream": True, **({} if options is None else {"stream_options": options})}
    request = request_parse(ROUTES[Route.CHAT], orjson.dumps(body))
    assert (request.include_usage, request.continuous_usage) == wishes


def test_a_body_without_model_is_parsed_for_the_route_stage_to_decide() -> None:
    assert request_parse(ROUTES[Route.CHAT], orjson.dumps({"messages": []})).model is None


def test_a_stream_always_asks_the_model_server_for_usage_on_every_chunk_and_leaves_the_body_alone() -> None:
    descriptor = ROUTES[Route.CHAT]
    request = request_parse(descriptor, orjson.dumps({**CHAT, "stream": True, "top_k": 3}))
    upstream = upstream_request(descriptor, request, "rid")
    metered = {"include_usage": True, "continuous_usage_stats": True}
    assert upstream.body == {**CHAT, "stream": True, "top_k": 3, "stream_options": metered}
    assert "stream_options" not in request.body
    plain = request_parse(descriptor, orjson.dumps(CHAT))
    assert upstream_request(descriptor, plain, "rid").body is plain.body
    # stream_options vLLM would refuse stays as it is, for vLLM to refuse.
    odd = request_parse(descriptor, orjson.dumps({**CHAT, "stream": True, "stream_options": "all"}))
    assert upstream_request(descriptor, odd, "rid").body is odd.body


def test_a_model_the_gateway_chose_is_named_upstream() -> None:
    descriptor = ROUTES[Route.CHAT]
    request = request_parse(descriptor, orjson.dumps({"messages": []}))
    assert upstream_request(descriptor, request, "rid", model="only").body == {"messages": [], "model": "only"}
