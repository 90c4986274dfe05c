"""End to end through the compute path: the `openai` client -> gunicorn + uvicorn worker -> the `local`
backend -> the real compute function in a worker process -> the fake vLLM, with streams coming back
through the gateway's own relay route; usage in the database."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx
import openai
import orjson
import pytest
import redis
from openai.types.chat import ChatCompletionMessageParam

from resource_server.models import Cluster, Endpoint, RequestLog, User
from resource_server.services.api_keys import api_key_create
from tests.e2e.conftest import e2e_gateway, usage_row
from tests.servers import fake_stats

pytestmark = pytest.mark.django_db(transaction=True)

HELLO: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Hello there"}]
DONE = "data: [DONE]"


@pytest.fixture(scope="module")
def gateway_url(django_db_setup: None, tmp_path_factory: Any) -> Iterator[str]:
    with e2e_gateway(tmp_path_factory) as url:
        yield url


@dataclass
class Hpc:
    url: str
    key: str
    model_server: str

    def client(self, cluster: str | None = None) -> openai.OpenAI:
        base = f"{self.url}/resource_server/{cluster}/vllm/v1" if cluster else f"{self.url}/resource_server/v1"
        return openai.OpenAI(base_url=base, api_key=self.key, max_retries=0, timeout=30)

    def stream_lines(self, path: str, body: dict[str, Any]) -> tuple[int, str, list[str]]:
        """Status, request id and the non-empty lines of a raw streamed answer."""
        headers = {"Authorization": f"Bearer {self.key}"}
        with httpx.stream(
            "POST", f"{self.url}/resource_server{path}", json=body, headers=headers, timeout=30
        ) as answer:
            lines = [line for line in answer.iter_lines() if line]
            return answer.status_code, answer.headers["x-request-id"], lines

    def row(self, request_id: str) -> RequestLog:
        return usage_row(request_id=request_id)

    def reference(self, **body: Any) -> str:
        """The answer text vLLM gives to a request (the fake is deterministic; pacing does not change it)."""
        reply = self.client().chat.completions.create(model="demo-model", messages=HELLO, **body)
        return reply.choices[0].message.content or ""


@pytest.fixture
def hpc(transactional_db: None, gateway_url: str, model_server: str) -> Hpc:
    owner = User.objects.create(identity_id="id-hopper", username="hopper@anl.gov")
    _, key = api_key_create(owner=owner, name="e2e")
    url = urlsplit(model_server)
    vllm = {"host": url.hostname, "port": url.port, "read_timeout": 5}
    for name, config in (
        ("local-hpc", {"vllm": vllm, "workers": 16}),
        (
            "local-impatient",
            {"vllm": vllm, "workers": 16, "task_timeout": 1, "first_chunk_timeout": 1, "idle_timeout": 1},
        ),
    ):
        endpoint = Endpoint(
            cluster=Cluster.objects.create(name=name), model="demo-model", backend="local", backend_config=config
        )
        endpoint.full_clean()
        endpoint.save()
    return Hpc(gateway_url, key, model_server)


def content_of(lines: list[str]) -> str:
    chunks = [orjson.loads(line[6:]) for line in lines if line != DONE]
    return "".join(
        choice.get("delta", {}).get("content") or choice.get("text") or "" for c in chunks for choice in c["choices"]
    )


def test_chat_runs_through_the_compute_function_and_is_logged(hpc: Hpc) -> None:
    raw = hpc.client().chat.completions.with_raw_response.create(model="demo-model", messages=HELLO, max_tokens=7)
    reply = raw.parse()

    assert reply.choices[0].message.content
    assert reply.usage is not None and 0 < reply.usage.completion_tokens <= 7
    row = hpc.row(raw.headers["x-request-id"])
    assert (row.status_code, row.streamed, row.route) == (200, False, "chat/completions")
    assert row.endpoint is not None and row.endpoint.backend == "local"
    assert (row.prompt_tokens, row.completion_tokens) == (reply.usage.prompt_tokens, reply.usage.completion_tokens)


def test_completions_and_embeddings(hpc: Hpc) -> None:
    completion = hpc.client().completions.create(model="demo-model", prompt="Once upon a", max_tokens=4)
    embeddings = hpc.client().embeddings.create(model="demo-model", input=["alpha beta", "gamma"])

    assert completion.choices[0].text
    assert [len(item.embedding) for item in embeddings.data] == [16, 16]


def test_a_streamed_chat_delivers_every_chunk_in_order_and_its_usage_is_logged(hpc: Hpc) -> None:
    reference = hpc.client().chat.completions.create(model="demo-model", messages=HELLO, max_tokens=40)

    raw = hpc.client().chat.completions.with_raw_response.create(
        model="demo-model", messages=HELLO, max_tokens=40, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(raw.parse())

    assert reference.usage is not None
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text == reference.choices[0].message.content
    assert len([chunk for chunk in chunks if chunk.choices]) == reference.usage.completion_tokens + 1  # + role chunk
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == reference.usage.completion_tokens
    row = hpc.row(raw.headers["x-request-id"])
    assert (row.streamed, row.status_code, row.completion_tokens) == (True, 200, reference.usage.completion_tokens)
    assert row.time_to_first_token_ms is not None and row.time_to_first_token_ms <= row.latency_ms


def test_a_raw_streamed_completion_ends_with_done_and_drops_the_unrequested_usage_chunk(hpc: Hpc) -> None:
    reference = hpc.client().completions.create(model="demo-model", prompt="a b c", max_tokens=6)
    body = {"model": "demo-model", "prompt": "a b c", "max_tokens": 6}

    status, request_id, lines = hpc.stream_lines("/v1/completions", {**body, "stream": True})

    assert status == 200
    assert lines[-1] == DONE
    assert reference.usage is not None
    assert len(lines) == reference.usage.completion_tokens + 1
    assert content_of(lines) == reference.choices[0].text
    assert hpc.row(request_id).completion_tokens == reference.usage.completion_tokens  # recorded all the same


def direct(model_server: str, path: str, body: dict[str, Any]) -> httpx.Response:
    """What the fake vLLM answers `body` itself."""
    return httpx.post(f"{model_server}/{path}", json=body, timeout=30)


def chunks_of(lines: list[str]) -> list[dict[str, Any]]:
    """A stream's chunks without what differs between two runs (id, created)."""
    chunks = [orjson.loads(line[6:]) for line in lines if line != DONE]
    return [{key: value for key, value in chunk.items() if key not in ("id", "created")} for chunk in chunks]


@pytest.mark.parametrize("stream", [False, True])
def test_a_prompt_too_long_is_vllms_own_400_streamed_or_not(hpc: Hpc, stream: bool) -> None:
    body = {"model": "demo-model", "messages": [{"role": "user", "content": "word " * 600}], "stream": stream}
    with pytest.raises(openai.BadRequestError) as too_long:
        hpc.client().chat.completions.create(**body)
    assert too_long.value.response.json() == direct(hpc.model_server, "chat/completions", body).json()
    error = too_long.value.response.json()["error"]
    assert (error["code"], error["param"], error["type"]) == (400, "input_tokens", "BadRequestError")  # vLLM's
    # Logged too; waiting for the row also keeps the gateway's write from racing the test database's flush.
    row = hpc.row(too_long.value.response.headers["x-request-id"])
    assert (row.status_code, row.error_code) == (400, "context_length_exceeded")


def test_prompt_scoring_and_lax_fields_reach_the_model_server(hpc: Hpc) -> None:
    scoring = {"model": "demo-model", "prompt": "score me", "echo": True, "max_tokens": 0, "logprobs": 1}
    reply = hpc.client().completions.create(**scoring)
    assert reply.choices[0].text == "score me"
    assert reply.choices[0].logprobs is not None and reply.choices[0].logprobs.tokens == ["score", " me"]
    status, _, lines = hpc.stream_lines(
        "/v1/chat/completions", {"model": "demo-model", "messages": HELLO, "max_tokens": 4.0, "stream": "true"}
    )
    assert status == 200 and lines[-1] == DONE


@pytest.mark.parametrize("options", [None, {"continuous_usage_stats": True}])
def test_a_stream_through_the_compute_function_is_what_vllm_sends(hpc: Hpc, options: dict[str, bool] | None) -> None:
    body: dict[str, Any] = {"model": "demo-model", "messages": HELLO, "max_tokens": 6, "stream": True}
    if options is not None:
        body["stream_options"] = options
    status, request_id, lines = hpc.stream_lines("/v1/chat/completions", body)
    expected = [line for line in direct(hpc.model_server, "chat/completions", body).text.split("\n") if line]
    assert status == 200
    assert chunks_of(lines) == chunks_of(expected)
    assert any("system_fingerprint" in chunk for chunk in chunks_of(lines))
    assert hpc.row(request_id).completion_tokens == 6


def test_a_stream_cut_on_the_cluster_records_the_tokens_sent_so_far(hpc: Hpc) -> None:
    body = {
        "model": "demo-model",
        "messages": HELLO,
        "max_tokens": 20,
        "stream": True,
        "fake_vllm": {"fail_after_tokens": 3},
    }
    status, request_id, lines = hpc.stream_lines("/v1/chat/completions", body)
    assert status == 200 and "error" in orjson.loads(lines[-2][6:])
    row = hpc.row(request_id)
    assert (row.status_code, row.prompt_tokens, row.completion_tokens) == (502, 5, 3)


def test_a_bad_relay_token_gets_403_and_injects_nothing_into_a_live_stream(hpc: Hpc) -> None:
    body = {"model": "demo-model", "messages": HELLO, "max_tokens": 20, "stream": True}
    expected = hpc.reference(max_tokens=20)
    injected = {"seq": 0, "events": ['data: {"choices":[{"index":0,"delta":{"content":"INJECTED"}}]}\n\n']}

    def inject_while_streaming() -> list[int]:
        time.sleep(0.3)  # the stream below is under way
        live = _live_relay_tasks()  # with Redis the live task ids are visible; guessed ones otherwise
        answers = []
        for task_id in [*live, "0" * 32, os.urandom(16).hex()]:
            for token in ("guessed-token", "x"):
                response = httpx.post(
                    f"{hpc.url}/resource_server/internal/relay/{task_id}",
                    json=injected,
                    headers={"Authorization": f"Bearer {token}"},
                    timeout=10,
                )
                answers.append(response.status_code)
        return answers

    with ThreadPoolExecutor(max_workers=1) as pool:
        injector = pool.submit(inject_while_streaming)
        status, _, lines = hpc.stream_lines("/v1/chat/completions", {**body, "fake_vllm": {"tokens_per_second": 20}})
        answers = injector.result()

    assert status == 200
    assert answers and set(answers) == {403}
    assert content_of(lines) == expected
    assert lines[-1] == DONE


def _live_relay_tasks() -> list[str]:
    if not os.environ.get("REDIS_URL"):
        return []
    store = redis.Redis.from_url(os.environ["REDIS_URL"])
    try:
        return [key.decode().split("{")[1].split("}")[0] for key in store.scan_iter(match="gateway:relay:*:token")]
    finally:
        store.close()


def test_a_timeout_in_one_request_does_not_disturb_ten_others_in_flight(hpc: Hpc) -> None:
    slow_stream: dict[str, Any] = {"max_tokens": 30, "extra_body": {"fake_vllm": {"tokens_per_second": 15}}}
    slow_reply: dict[str, Any] = {"max_tokens": 12, "extra_body": {"fake_vllm": {"latency": 1.5}}}
    expected_stream, expected_reply = hpc.reference(max_tokens=30), hpc.reference(max_tokens=12)

    # On the patient cluster's path: the generic one would spread them over both clusters (least loaded first).
    def streamed() -> str:
        chunks = hpc.client("local-hpc").chat.completions.create(
            model="demo-model", messages=HELLO, stream=True, **slow_stream
        )
        return "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)

    def replied() -> str:
        reply = hpc.client("local-hpc").chat.completions.create(model="demo-model", messages=HELLO, **slow_reply)
        return reply.choices[0].message.content or ""

    def stuck() -> openai.APIStatusError:
        with pytest.raises(openai.APIStatusError) as timed_out:
            hpc.client("local-impatient").chat.completions.create(
                model="demo-model", messages=HELLO, extra_body={"fake_vllm": {"hang": True}}
            )
        return timed_out.value

    with ThreadPoolExecutor(max_workers=11) as pool:
        others = [pool.submit(streamed) for _ in range(5)] + [pool.submit(replied) for _ in range(5)]
        failure = pool.submit(stuck).result()
        answers = [other.result() for other in others]

    assert (failure.status_code, failure.code) == (504, "compute_timeout")
    assert answers == [expected_stream] * 5 + [expected_reply] * 5
    row = hpc.row(failure.response.headers["x-request-id"])
    assert (row.status_code, row.error_code) == (504, "compute_timeout")


def test_an_idle_stream_ends_with_an_error_event_then_done(hpc: Hpc) -> None:
    body = {"model": "demo-model", "messages": HELLO, "max_tokens": 5, "stream": True}

    status, request_id, lines = hpc.stream_lines(
        "/local-impatient/vllm/v1/chat/completions", {**body, "fake_vllm": {"tokens_per_second": 0.4}}
    )

    assert status == 200
    assert lines[-1] == DONE
    error = orjson.loads(lines[-2][6:])["error"]
    assert (error["code"], error["type"]) == ("upstream_timeout", "upstream_error")
    assert hpc.row(request_id).status_code == 504


def test_no_first_chunk_in_time_is_a_504_before_the_stream_starts(hpc: Hpc) -> None:
    with pytest.raises(openai.APIStatusError) as cold:
        hpc.client("local-impatient").chat.completions.create(
            model="demo-model", messages=HELLO, stream=True, extra_body={"fake_vllm": {"hang": True}}
        )
    assert (cold.value.status_code, cold.value.code) == (504, "upstream_timeout")


def test_a_client_that_leaves_stops_generation_on_the_model_server(hpc: Hpc) -> None:
    before = fake_stats(hpc.model_server)["streams_disconnected"]
    body = {
        "model": "demo-model",
        "messages": HELLO,
        "max_tokens": 200,
        "stream": True,
        "ignore_eos": True,
        "fake_vllm": {"tokens_per_second": 20},
    }
    headers = {"Authorization": f"Bearer {hpc.key}"}
    with httpx.stream(
        "POST", f"{hpc.url}/resource_server/v1/chat/completions", json=body, headers=headers, timeout=30
    ) as answer:
        request_id = answer.headers["x-request-id"]
        assert next(answer.iter_lines()).startswith("data: ")
    deadline = time.monotonic() + 15
    while fake_stats(hpc.model_server)["streams_disconnected"] == before:
        assert time.monotonic() < deadline, "the model server never saw the stream closed"
        time.sleep(0.05)
    row = hpc.row(request_id)
    assert (row.status_code, row.error_code) == (499, "client_disconnected")
    # Metered to the last chunk the gateway relayed: the prompt, and at least the token the client read.
    assert row.prompt_tokens == 5 and row.completion_tokens is not None and row.completion_tokens >= 1
