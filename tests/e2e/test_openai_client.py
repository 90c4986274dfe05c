"""End to end: the stock `openai` client -> gunicorn + uvicorn worker -> fake vLLM, usage in the database."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import openai
import pytest

from resource_server.models import Cluster, Endpoint, RequestLog
from tests.audio import wav_clip
from tests.conftest import Seeded, seed
from tests.e2e.conftest import e2e_gateway, usage_row
from tests.servers import fake_stats


@dataclass
class Stack:
    url: str
    seeded: Seeded
    model_server: str

    def client(self, key: str | None = None) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=f"{self.url}/resource_server/v1", api_key=key or self.seeded.key, max_retries=0, timeout=20
        )

    def row(self, request_id: str) -> RequestLog:
        return usage_row(request_id=request_id)


# Each test gets fresh rows (flushed afterwards); the server processes live for the module.
pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(scope="module")
def gateway_url(django_db_setup: None, model_server: str, tmp_path_factory: Any) -> Iterator[str]:
    with e2e_gateway(tmp_path_factory) as url:
        yield url


@pytest.fixture
def stack(transactional_db: None, gateway_url: str, model_server: str) -> Stack:
    seeded = seed(model_server, username="grace@anl.gov")
    restricted = Cluster.objects.create(name="aurora", allowed_domains=["uchicago.edu"])
    Endpoint.objects.create(
        cluster=restricted, model="secret-model", backend="direct", backend_config={"base_url": model_server}
    )
    return Stack(gateway_url, seeded, model_server)


HELLO = [{"role": "user", "content": "Hello there"}]


def test_chat_completion_and_its_usage_row(stack: Stack) -> None:
    raw = stack.client().chat.completions.with_raw_response.create(model="demo-model", messages=HELLO, max_tokens=7)
    reply = raw.parse()
    assert reply.choices[0].message.content
    row = stack.row(raw.headers["x-request-id"])
    assert (row.status_code, row.streamed, row.route) == (200, False, "chat/completions")
    assert reply.usage is not None
    assert 0 < reply.usage.completion_tokens <= 7
    assert (row.prompt_tokens, row.completion_tokens, row.total_tokens) == (
        reply.usage.prompt_tokens,
        reply.usage.completion_tokens,
        reply.usage.total_tokens,
    )


def test_text_completion(stack: Stack) -> None:
    raw = stack.client().completions.with_raw_response.create(model="demo-model", prompt="Once upon a", max_tokens=4)
    reply = raw.parse()
    assert reply.choices[0].text
    assert reply.usage is not None
    assert stack.row(raw.headers["x-request-id"]).completion_tokens == reply.usage.completion_tokens


def test_embeddings_in_the_clients_default_base64_encoding(stack: Stack) -> None:
    raw = stack.client().embeddings.with_raw_response.create(model="demo-model", input=["alpha beta", "gamma"])
    reply = raw.parse()
    assert [len(item.embedding) for item in reply.data] == [16, 16]
    assert stack.row(raw.headers["x-request-id"]).prompt_tokens == reply.usage.prompt_tokens


def test_models_list_shows_only_permitted_models(stack: Stack) -> None:
    assert [model.id for model in stack.client().models.list()] == ["demo-model"]


def test_streamed_chat_delivers_every_chunk_and_records_usage(stack: Stack) -> None:
    client = stack.client()
    reference = client.chat.completions.create(model="demo-model", messages=HELLO, max_tokens=12)
    raw = client.chat.completions.with_raw_response.create(
        model="demo-model", messages=HELLO, max_tokens=12, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(raw.parse())
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text == reference.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert reference.usage is not None
    assert chunks[-1].usage.completion_tokens == reference.usage.completion_tokens
    row = stack.row(raw.headers["x-request-id"])
    assert (row.streamed, row.status_code, row.completion_tokens) == (True, 200, reference.usage.completion_tokens)
    assert row.time_to_first_token_ms is not None and row.time_to_first_token_ms <= row.latency_ms


def test_raw_stream_ends_with_done(stack: Stack) -> None:
    body = {"model": "demo-model", "prompt": "a b c", "max_tokens": 6}
    reference = stack.client().completions.create(**body)  # type: ignore[call-overload]
    with httpx.stream(
        "POST",
        f"{stack.url}/resource_server/v1/completions",
        json={**body, "stream": True},
        headers=stack.seeded.auth,
        timeout=20,
    ) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    assert reference.usage is not None
    # One chunk per token, no usage chunk (not asked for), then [DONE].
    assert len(events) == reference.usage.completion_tokens + 1


def test_client_disconnect_closes_the_upstream_stream(stack: Stack) -> None:
    before = fake_stats(stack.model_server)
    body = {
        "model": "demo-model",
        "messages": HELLO,
        "max_tokens": 200,
        "stream": True,
        "ignore_eos": True,
        "fake_vllm": {"tokens_per_second": 20},
    }
    with httpx.stream(
        "POST", f"{stack.url}/resource_server/v1/chat/completions", json=body, headers=stack.seeded.auth, timeout=20
    ) as response:
        request_id = response.headers["x-request-id"]
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        stats = fake_stats(stack.model_server)
        if stats["streams_disconnected"] > before["streams_disconnected"]:  # type: ignore[operator]
            break
        time.sleep(0.05)
    else:
        raise AssertionError("the model server never saw the stream closed")
    row = stack.row(request_id)
    assert (row.status_code, row.error_code) == (499, "client_disconnected")


def test_errors_map_to_the_clients_exceptions(stack: Stack) -> None:
    client = stack.client()
    with pytest.raises(openai.AuthenticationError):
        stack.client(key="igw_000000000000_notarealkeynotarealkeynotarealkey").models.list()
    with pytest.raises(openai.NotFoundError) as not_found:
        client.chat.completions.create(model="no-such-model", messages=HELLO)
    assert not_found.value.code == "model_not_found"
    with pytest.raises(openai.PermissionDeniedError):
        client.chat.completions.create(model="secret-model", messages=HELLO)
    with pytest.raises(openai.BadRequestError) as too_long:
        client.chat.completions.create(model="demo-model", messages=[{"role": "user", "content": "word " * 600}])
    # vLLM's own refusal, unchanged (its code is the status; the usage row names it context_length_exceeded).
    assert (str(too_long.value.code), too_long.value.param) == ("400", "input_tokens")
    with pytest.raises(openai.BadRequestError) as invalid:
        client.chat.completions.create(model="demo-model", messages=HELLO, temperature=-1)
    assert invalid.value.param == "temperature"
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model="demo-model", messages=HELLO, extra_body={"fake_vllm": {"status": 429}})
    with pytest.raises(openai.InternalServerError) as failed:
        client.chat.completions.create(model="demo-model", messages=HELLO, extra_body={"fake_vllm": {"status": 500}})
    assert failed.value.status_code == 502
    assert failed.value.request_id if hasattr(failed.value, "request_id") else True


def test_every_request_leaves_exactly_one_row(stack: Stack) -> None:
    client = stack.client()
    ids = []
    for body in ({"max_tokens": 2}, {"temperature": -1}, {"extra_body": {"fake_vllm": {"status": 503}}}):
        try:
            raw = client.chat.completions.with_raw_response.create(model="demo-model", messages=HELLO, **body)
            ids.append(raw.headers["x-request-id"])
        except openai.APIStatusError as error:
            ids.append(error.response.headers["x-request-id"])
    statuses = [stack.row(request_id).status_code for request_id in ids]
    assert statuses == [200, 400, 503]
    assert RequestLog.objects.filter(request_id__in=ids).count() == 3


def test_audio_transcription_with_the_stock_client_and_translation_and_their_usage_rows(stack: Stack) -> None:
    client = stack.client()
    clip = ("talk.wav", wav_clip(2.2), "audio/wav")
    with client.audio.transcriptions.with_streaming_response.create(
        model="demo-model", file=clip, language="en"
    ) as response:
        assert response.parse().text
    row = stack.row(response.headers["x-request-id"])
    assert (row.status_code, row.route, row.streamed, row.audio_seconds) == (200, "audio/transcriptions", False, 3)

    # (openai 3.51 marks audio.translations deprecated: the same form over plain HTTP.)
    translation = httpx.post(
        f"{stack.url}/resource_server/v1/audio/translations",
        headers={"Authorization": f"Bearer {stack.seeded.key}"},
        data={"model": "demo-model"},
        files={"file": clip},
        timeout=20,
    )
    assert translation.json()["text"]
    row = stack.row(translation.headers["x-request-id"])
    assert (row.status_code, row.route, row.audio_seconds, row.prompt_tokens) == (200, "audio/translations", None, None)


def test_a_streamed_transcription_is_metered_in_tokens(stack: Stack) -> None:
    with httpx.Client(timeout=20) as http:
        response = http.post(
            f"{stack.url}/resource_server/v1/audio/transcriptions",
            headers={"Authorization": f"Bearer {stack.seeded.key}"},
            data={"model": "demo-model", "stream": "true"},
            files={"file": ("talk.wav", wav_clip(1.0), "audio/wav")},
        )
    assert response.status_code == 200 and response.text.endswith("data: [DONE]\n\n")
    words = response.text.count('"transcription.chunk"')
    row = stack.row(response.headers["x-request-id"])
    assert (row.streamed, row.prompt_tokens, row.completion_tokens, row.total_tokens) == (True, 4, words, 4 + words)
