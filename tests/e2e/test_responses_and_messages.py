"""End to end: the stock `openai` client's Responses API and the stock `anthropic` client's Messages API ->
gunicorn + uvicorn worker -> both backends (direct HTTP, and the local compute function with its relay) ->
the fake vLLM; usage rows carry each API's own token counts."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import anthropic
import httpx
import openai
import pytest

from resource_server.models import Cluster, Endpoint, RequestLog
from tests.conftest import seed
from tests.e2e.conftest import e2e_gateway, usage_row
from tests.servers import fake_model_server, fake_stats

pytestmark = pytest.mark.django_db(transaction=True)

# The seeded direct endpoint's cluster, and a cluster whose endpoint runs the compute function locally.
BACKENDS = {"direct": "polaris", "local": "local-hpc"}
HELLO = [{"role": "user", "content": "Hello there"}]
# Every client the tests make waits at most this long for an answer: a gateway that hangs fails the test.
CLIENT_TIMEOUT_SECONDS = 30


@pytest.fixture(scope="module")
def gateway_url(django_db_setup: None, tmp_path_factory: Any) -> Iterator[str]:
    # Probed often, so that GET /v1/models soon carries the model servers' cards.
    with e2e_gateway(tmp_path_factory, HEALTH_PROBE_SECONDS="0.5") as url:
        yield url


@dataclass
class Gateway:
    url: str
    key: str
    cluster: str

    @property
    def base(self) -> str:
        return f"{self.url}/resource_server/{self.cluster}/vllm"

    def openai(self) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=f"{self.base}/v1", api_key=self.key, max_retries=0, timeout=CLIENT_TIMEOUT_SECONDS
        )

    def anthropic(self, **credentials: str) -> anthropic.Anthropic:
        credentials = credentials or {"auth_token": self.key}
        return anthropic.Anthropic(
            base_url=self.base,
            max_retries=0,
            timeout=CLIENT_TIMEOUT_SECONDS,
            **credentials,  # type: ignore[arg-type]
        )


@pytest.fixture(params=list(BACKENDS))
def gateway(request: pytest.FixtureRequest, transactional_db: None, gateway_url: str, model_server: str) -> Gateway:
    seeded = seed(model_server, username="grace@anl.gov")
    url = urlsplit(model_server)
    endpoint = Endpoint(
        cluster=Cluster.objects.create(name="local-hpc"),
        model="demo-model",
        backend="local",
        backend_config={"vllm": {"host": url.hostname, "port": url.port, "read_timeout": 5}, "workers": 4},
    )
    endpoint.full_clean()
    endpoint.save()
    return Gateway(gateway_url, seeded.key, BACKENDS[request.param])


def row_of(request_id: str, backend_cluster: str) -> RequestLog:
    row = usage_row(request_id=request_id)
    assert row.endpoint is not None and row.endpoint.cluster.name == backend_cluster
    return row


def test_responses_create_answers_and_records_input_and_output_tokens(gateway: Gateway) -> None:
    raw = gateway.openai().responses.with_raw_response.create(
        model="demo-model", input="Say hello", max_output_tokens=7
    )
    reply = raw.parse()

    assert reply.output_text and reply.usage is not None
    assert 0 < reply.usage.output_tokens <= 7
    row = row_of(raw.headers["x-request-id"], gateway.cluster)
    assert (row.status_code, row.streamed, row.route) == (200, False, "responses")
    assert (row.prompt_tokens, row.completion_tokens, row.total_tokens) == (
        reply.usage.input_tokens,
        reply.usage.output_tokens,
        reply.usage.total_tokens,
    )


def test_responses_stream_ends_with_response_completed_which_carries_the_usage(gateway: Gateway) -> None:
    raw = gateway.openai().responses.with_raw_response.create(
        model="demo-model", input=[{"role": "user", "content": "Say hello"}], stream=True
    )
    events = list(raw.parse())

    assert events[0].type == "response.created"
    completed = events[-1]
    assert completed.type == "response.completed"
    deltas = "".join(event.delta for event in events if event.type == "response.output_text.delta")
    assert deltas and deltas == completed.response.output_text
    usage = completed.response.usage
    assert usage is not None
    row = row_of(raw.headers["x-request-id"], gateway.cluster)
    assert (row.status_code, row.streamed, row.route) == (200, True, "responses")
    assert (row.prompt_tokens, row.completion_tokens, row.total_tokens) == (
        usage.input_tokens,
        usage.output_tokens,
        usage.total_tokens,
    )


def test_messages_create_answers_and_records_input_and_output_tokens(gateway: Gateway) -> None:
    raw = gateway.anthropic().messages.with_raw_response.create(
        model="demo-model", max_tokens=7, messages=[{"role": "user", "content": "Hello there"}]
    )
    message = raw.parse()

    assert message.type == "message" and message.content[0].type == "text" and message.content[0].text
    assert message.stop_reason in ("end_turn", "max_tokens")
    assert 0 < message.usage.output_tokens <= 7
    row = row_of(raw.headers["x-request-id"], gateway.cluster)
    assert (row.status_code, row.streamed, row.route) == (200, False, "messages")
    assert (row.prompt_tokens, row.completion_tokens, row.total_tokens) == (
        message.usage.input_tokens,
        message.usage.output_tokens,
        message.usage.input_tokens + message.usage.output_tokens,
    )


def test_messages_stream_carries_usage_in_message_start_and_message_delta(gateway: Gateway) -> None:
    raw = gateway.anthropic().messages.with_raw_response.create(
        model="demo-model", max_tokens=50, messages=[{"role": "user", "content": "Hello there"}], stream=True
    )
    events = list(raw.parse())

    kinds = [event.type for event in events]
    assert kinds[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"]
    text = "".join(
        event.delta.text for event in events if event.type == "content_block_delta" and event.delta.type == "text_delta"
    )
    assert text
    start, delta = events[0], events[-2]
    assert start.type == "message_start" and delta.type == "message_delta"
    row = row_of(raw.headers["x-request-id"], gateway.cluster)
    assert (row.status_code, row.streamed, row.route) == (200, True, "messages")
    assert row.prompt_tokens == start.message.usage.input_tokens > 0
    assert row.completion_tokens == delta.usage.output_tokens > 0


def test_the_anthropic_clients_x_api_key_is_a_gateway_credential(gateway: Gateway) -> None:
    message = gateway.anthropic(api_key=gateway.key).messages.create(
        model="demo-model", max_tokens=5, messages=[{"role": "user", "content": "Hi"}]
    )
    assert message.content

    with pytest.raises(anthropic.AuthenticationError):
        gateway.anthropic(api_key="not-a-key").messages.create(
            model="demo-model", max_tokens=5, messages=[{"role": "user", "content": "Hi"}]
        )


def test_the_generic_path_routes_messages_and_responses_by_model(gateway: Gateway) -> None:
    client = anthropic.Anthropic(
        base_url=f"{gateway.url}/resource_server", auth_token=gateway.key, max_retries=0, timeout=CLIENT_TIMEOUT_SECONDS
    )
    assert client.messages.create(model="demo-model", max_tokens=5, messages=[{"role": "user", "content": "Hi"}])
    responses = openai.OpenAI(
        base_url=f"{gateway.url}/resource_server/v1", api_key=gateway.key, max_retries=0, timeout=CLIENT_TIMEOUT_SECONDS
    )
    assert responses.responses.create(model="demo-model", input="Hi", max_output_tokens=5).output_text


def test_the_model_servers_refusal_reaches_the_anthropic_client_as_that_status(gateway: Gateway) -> None:
    with pytest.raises(anthropic.BadRequestError) as refused:
        gateway.anthropic().messages.create(
            model="demo-model", max_tokens=100_000, messages=[{"role": "user", "content": "Hi"}]
        )
    assert "max_tokens" in str(refused.value)


# vLLM's non-generating routes: the gateway path, a body, and the model server's own path.
JSON_ROUTES = [
    ("messages/count_tokens", {"messages": HELLO}, "/v1/messages/count_tokens"),
    ("tokenize", {"prompt": "the quick brown fox"}, "/tokenize"),
    ("detokenize", {"tokens": [0, 14, 15]}, "/detokenize"),
    ("score", {"text_1": "what is a fox", "text_2": ["a fox is an animal", "Paris"]}, "/v1/score"),
    ("rerank", {"query": "what is a fox", "documents": ["a fox is an animal", "Paris"]}, "/v1/rerank"),
    ("pooling", {"input": ["alpha beta", "gamma"]}, "/pooling"),
    ("classify", {"input": ["I love it", "I hate it"]}, "/classify"),
]


@pytest.mark.parametrize(("route", "body", "server_path"), JSON_ROUTES)
def test_vllms_json_routes_reach_the_model_server_at_its_own_path_and_record_usage_where_vllm_reports_it(
    gateway: Gateway, model_server: str, route: str, body: dict[str, Any], server_path: str
) -> None:
    before = fake_stats(model_server)["requests"]
    answer = httpx.post(
        f"{gateway.base}/v1/{route}",
        json={"model": "demo-model", **body},
        headers={"Authorization": f"Bearer {gateway.key}"},
        timeout=30,
    )

    assert answer.status_code == 200, answer.text
    reply = answer.json()
    after = fake_stats(model_server)["requests"]
    assert after[server_path] == before.get(server_path, 0) + 1  # type: ignore[index, union-attr]
    row = row_of(answer.headers["x-request-id"], gateway.cluster)
    assert (row.status_code, row.streamed, row.route) == (200, False, route)
    usage = reply.get("usage")
    if usage is None:  # tokenize, detokenize, count_tokens: nothing ran on the model, nothing is used
        assert (row.prompt_tokens, row.completion_tokens) == (None, None)
    else:
        assert row.prompt_tokens == usage["prompt_tokens"] > 0
        assert row.total_tokens == usage["total_tokens"]
    if route == "detokenize":
        assert reply == {"prompt": "the brown fox"}


def test_the_anthropic_client_counts_tokens(gateway: Gateway) -> None:
    counted = gateway.anthropic().messages.count_tokens(
        model="demo-model", messages=[{"role": "user", "content": "Hello there"}]
    )
    message = gateway.anthropic().messages.create(
        model="demo-model", max_tokens=5, messages=[{"role": "user", "content": "Hello there"}]
    )
    assert counted.input_tokens == message.usage.input_tokens > 0


@pytest.fixture(scope="module")
def single_kind_servers() -> Iterator[dict[str, str]]:
    """Fake vLLMs that, like vLLM, serve only their model's kind of routes: generating, or pooling."""
    with (
        fake_model_server("--model=kind-model", "--runner=generate") as generate,
        fake_model_server("--model=kind-model", "--runner=pooling") as pooling,
    ):
        yield {"generate": generate, "pooling": pooling}


# Per model kind: a route it serves, and one it does not (streamed for the pooling model: a stream is refused
# before it starts, through the compute function's relay too).
KIND_ROUTES = {
    "generate": (
        ("chat/completions", {"messages": HELLO, "max_tokens": 3}),
        ("rerank", {"query": "q", "documents": ["d"]}),
    ),
    "pooling": (
        ("embeddings", {"input": "alpha"}),
        ("chat/completions", {"messages": HELLO, "max_tokens": 3, "stream": True}),
    ),
}


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("kind", list(KIND_ROUTES))
def test_a_route_the_models_server_does_not_serve_answers_404_saying_so(
    transactional_db: None, gateway_url: str, single_kind_servers: dict[str, str], backend: str, kind: str
) -> None:
    server = single_kind_servers[kind]
    seeded = seed(server, username="grace@anl.gov")
    Endpoint.objects.filter(pk=seeded.endpoint.pk).update(model="kind-model")
    url = urlsplit(server)
    vllm = {"host": url.hostname, "port": url.port, "read_timeout": 5}
    Endpoint.objects.create(
        cluster=Cluster.objects.create(name="local-hpc"),
        model="kind-model",
        backend="local",
        backend_config={"vllm": vllm, "workers": 4},
    )
    gateway = Gateway(gateway_url, seeded.key, BACKENDS[backend])
    headers = {"Authorization": f"Bearer {gateway.key}"}
    (served, served_body), (unserved, unserved_body) = KIND_ROUTES[kind]

    def post(route: str, body: dict[str, Any]) -> httpx.Response:
        return httpx.post(
            f"{gateway.base}/v1/{route}", json={"model": "kind-model", **body}, headers=headers, timeout=30
        )

    assert post(served, served_body).status_code == 200
    refused = post(unserved, unserved_body)

    assert refused.status_code == 404
    error = refused.json()["error"]
    assert error["code"] == "route_not_served"
    assert f"'kind-model' does not serve POST /v1/{unserved}" in error["message"]
    assert usage_row(request_id=refused.headers["x-request-id"]).error_code == "route_not_served"


def test_models_carry_vllms_model_card_fields_from_the_endpoints_server(gateway: Gateway) -> None:
    headers = {"Authorization": f"Bearer {gateway.key}"}
    deadline = time.monotonic() + 15
    while True:
        [card] = httpx.get(f"{gateway.base}/v1/models", headers=headers, timeout=10).json()["data"]
        if "max_model_len" in card or time.monotonic() > deadline:
            break
        time.sleep(0.2)

    assert (card["id"], card["owned_by"]) == ("demo-model", gateway.cluster)
    assert (card["max_model_len"], card["root"], card["parent"]) == (512, "demo-model", None)
    assert card["permission"]


def test_a_route_one_endpoint_does_not_serve_goes_to_another_endpoint_of_the_model(
    transactional_db: None, gateway_url: str, single_kind_servers: dict[str, str]
) -> None:
    seeded = seed(single_kind_servers["generate"], username="grace@anl.gov")
    Endpoint.objects.filter(pk=seeded.endpoint.pk).update(model="kind-model")
    Endpoint.objects.create(
        cluster=Cluster.objects.create(name="sophia"),
        model="kind-model",
        backend="direct",
        backend_config={"base_url": single_kind_servers["pooling"]},
    )
    headers = {"Authorization": f"Bearer {seeded.key}"}
    for route, body in (KIND_ROUTES["generate"][0], KIND_ROUTES["pooling"][0]):
        answer = httpx.post(
            f"{gateway_url}/resource_server/v1/{route}",
            json={"model": "kind-model", **body},
            headers=headers,
            timeout=30,
        )
        assert answer.status_code == 200, (route, answer.text)
