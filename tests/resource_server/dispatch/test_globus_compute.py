"""The `globus_compute` backend with the real SDK `Client` and `Executor`, and the endpoint's real engine behind
the stood-in service (`fakes.compute_service`): the registered function runs in the engine's workers against the
fake vLLM server, results come back through RabbitMQ to the SDK's result watcher, streams through the real relay."""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
import uuid
from collections.abc import Callable
from typing import Any, cast
from urllib.parse import urlsplit

import httpx
import orjson
import pytest
from globus_compute_sdk import Client, Executor
from globus_compute_sdk.serialize import ComputeSerializer, JSONData, PureSourceTextInspect
from globus_compute_sdk.serialize.base import IDENTIFIER_LENGTH

from compute_functions import DATA_STRATEGY, inference
from fakes.compute_service import RunningCompute
from resource_server.backend_kinds import backend_config_errors
from resource_server.bootstrap import runtime
from resource_server.dispatch.base import UpstreamRequest
from resource_server.dispatch.compute import ComputeStream
from resource_server.dispatch.globus_compute import (
    ComputeEndpoints,
    Credentials,
    GlobusComputeBackend,
    GlobusComputeConfig,
)
from resource_server.errors import GatewayError, ServiceUnavailable, UpstreamError
from resource_server.routes import Route
from tests.conftest import COMPUTE_CLIENT_ID, COMPUTE_CLIENT_SECRET, SITE_CLIENT_ID, SITE_CLIENT_SECRET
from tests.resource_server.dispatch.conftest import GATEWAY
from tests.servers import free_port

pytestmark = pytest.mark.usefixtures("gateway_settings")

DILL_CODE = "globus_compute_sdk.serialize.DillCode"
HELLO = [{"role": "user", "content": "Hello there"}]


def backend(
    endpoints: ComputeEndpoints, model_server: str, *, endpoint_id: str, function_id: str, **config: Any
) -> GlobusComputeBackend:
    url = urlsplit(model_server)
    settings = {
        "endpoint_id": endpoint_id,
        "function_id": function_id,
        "vllm": {"host": url.hostname, "port": url.port, "read_timeout": 10},
        **config,
    }
    # The relay hub of the runtime the test installed: the relay server in this process delivers to it.
    return GlobusComputeBackend(
        GlobusComputeConfig.model_validate(settings), relay_hub=runtime().relay_hub, endpoints=endpoints
    )


@pytest.fixture
def on_line(compute: RunningCompute, endpoints: ComputeEndpoints, model_server: str, function_id: str) -> Any:
    """A backend on a fresh online endpoint."""
    return backend(endpoints, model_server, endpoint_id=compute.service.add_endpoint(), function_id=function_id)


def chat(request_id: str | None = None, **body: Any) -> UpstreamRequest:
    return UpstreamRequest(
        Route.CHAT, {"model": "demo-model", "messages": HELLO, "max_tokens": 8, **body}, request_id or uuid.uuid4().hex
    )


def streamed(request_id: str | None = None, **body: Any) -> UpstreamRequest:
    return chat(request_id, stream=True, stream_options={"include_usage": True}, **body)


def direct(model_server: str, request: UpstreamRequest) -> dict[str, Any]:
    """What the fake vLLM answers when asked directly (it is deterministic; pacing does not change it)."""
    body = {key: value for key, value in request.body.items() if key not in ("stream", "stream_options", "fake_vllm")}
    answer: dict[str, Any] = httpx.post(f"{model_server}/{request.route.value}", json=body, timeout=10).json()
    return answer


async def collect(stream: ComputeStream) -> list[bytes]:
    try:
        return [event async for event in stream]
    finally:
        await stream.aclose()


def content(events: list[bytes]) -> str:
    chunks = [orjson.loads(event[6:]) for event in events if event != b"data: [DONE]\n\n"]
    return "".join(choice["delta"].get("content") or "" for chunk in chunks for choice in chunk["choices"])


def too_large(**body: Any) -> UpstreamRequest:
    """Embeddings whose answer is over the endpoint's 10 MiB result limit (about 350 bytes per input)."""
    return UpstreamRequest(Route.EMBEDDINGS, {"model": "demo-model", "input": ["a"] * 40_000, **body}, uuid.uuid4().hex)


def executor_of(endpoints: ComputeEndpoints, endpoint_id: str) -> Any:
    """The SDK `Executor` the gateway holds for an endpoint (under the gateway's account)."""
    [executor] = [each for key, each in endpoints._executors.items() if key[2] == endpoint_id]
    return executor


def wait_for(condition: Callable[[], object], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the condition did not hold in time"
        time.sleep(0.05)


# --- requests ------------------------------------------------------------------------------------


async def test_chat_runs_as_the_registered_source_text_function(
    on_line: GlobusComputeBackend, compute: RunningCompute, function_id: str, model_server: str
) -> None:
    request = chat()

    reply = orjson.loads(await on_line.submit(request))

    expected = direct(model_server, request)
    assert reply["choices"] == expected["choices"]
    assert reply["usage"] == expected["usage"]
    code = ComputeSerializer.unpack_buffers(compute.service.functions[function_id].code)[0]
    assert code[:IDENTIFIER_LENGTH] == PureSourceTextInspect.identifier  # registered as source, not a pickle


@pytest.mark.parametrize(
    ("route", "body"),
    [(Route.COMPLETIONS, {"prompt": "Once upon a", "max_tokens": 4}), (Route.EMBEDDINGS, {"input": ["a b", "c"]})],
)
async def test_other_routes_answer_like_vllm(
    on_line: GlobusComputeBackend, model_server: str, route: Route, body: dict[str, Any]
) -> None:
    request = UpstreamRequest(route, {"model": "demo-model", **body}, uuid.uuid4().hex)

    reply = orjson.loads(await on_line.submit(request))

    assert reply["usage"] == direct(model_server, request)["usage"]


async def test_a_vllm_400_stays_a_400_with_its_message(on_line: GlobusComputeBackend) -> None:
    with pytest.raises(UpstreamError) as refused:
        await on_line.submit(chat(messages=[{"role": "user", "content": "word " * 600}]))

    assert (refused.value.status, refused.value.code) == (400, "context_length_exceeded")
    assert "maximum context length is 512" in refused.value.message


async def test_a_vllm_that_is_not_running_is_a_503(
    compute: RunningCompute, endpoints: ComputeEndpoints, function_id: str
) -> None:
    nothing_there = backend(
        endpoints,
        f"http://127.0.0.1:{free_port()}/v1",
        endpoint_id=compute.service.add_endpoint(),
        function_id=function_id,
    )

    with pytest.raises(ServiceUnavailable) as unavailable:
        await nothing_there.submit(chat())

    assert unavailable.value.code == "upstream_unreachable"
    assert "Retry-After" in unavailable.value.headers


# --- streams through the relay -------------------------------------------------------------------


async def test_a_stream_arrives_through_the_relay_complete_and_in_order(
    on_line: GlobusComputeBackend, model_server: str
) -> None:
    request = streamed(max_tokens=30)

    events = await collect(await on_line.open_stream(request))

    expected = direct(model_server, request)
    assert content(events) == expected["choices"][0]["message"]["content"]
    assert events[-1] == b"data: [DONE]\n\n"
    usage = orjson.loads(events[-2][6:])["usage"]
    assert usage["completion_tokens"] == expected["usage"]["completion_tokens"]
    # One chunk per token, in order: the role chunk, then each word as vLLM produced it.
    assert len(events) == expected["usage"]["completion_tokens"] + 3


async def test_a_refused_stream_raises_before_streaming(on_line: GlobusComputeBackend) -> None:
    with pytest.raises(UpstreamError) as refused:
        await on_line.open_stream(streamed(messages=[{"role": "user", "content": "word " * 600}]))

    assert refused.value.status == 400


async def test_an_idle_stream_fails_with_an_error_the_relay_layer_reports(
    compute: RunningCompute, endpoints: ComputeEndpoints, model_server: str, function_id: str
) -> None:
    quick_to_give_up = backend(
        endpoints, model_server, endpoint_id=compute.service.add_endpoint(), function_id=function_id, idle_timeout=0.5
    )
    stream = await quick_to_give_up.open_stream(streamed(max_tokens=5, fake_vllm={"tokens_per_second": 1}))

    with pytest.raises(UpstreamError) as idle:
        await collect(stream)

    assert (idle.value.status, idle.value.code) == (504, "upstream_timeout")


async def test_no_first_chunk_in_time_is_a_504_before_streaming(
    compute: RunningCompute, endpoints: ComputeEndpoints, model_server: str, function_id: str
) -> None:
    cold = backend(
        endpoints,
        model_server,
        endpoint_id=compute.service.add_endpoint(),
        function_id=function_id,
        first_chunk_timeout=0.5,
    )
    request = streamed()
    compute.service.lose(request.request_id)  # e.g. an endpoint restarted with the task in flight

    with pytest.raises(UpstreamError) as cold_start:
        await cold.open_stream(request)

    assert (cold_start.value.status, cold_start.value.code) == (504, "upstream_timeout")
    assert "did not start answering" in cold_start.value.message


# --- failures stay with their request ------------------------------------------------------------


async def test_a_timeout_fails_one_request_and_leaves_ten_in_flight_untouched(
    compute: RunningCompute, endpoints: ComputeEndpoints, model_server: str, function_id: str
) -> None:
    endpoint_id = compute.service.add_endpoint()
    # Two Endpoint rows on one Globus Compute endpoint share its executor.
    impatient = backend(endpoints, model_server, endpoint_id=endpoint_id, function_id=function_id, task_timeout=1)
    patient = backend(endpoints, model_server, endpoint_id=endpoint_id, function_id=function_id, task_timeout=60)
    # It times out at 1 s, and its task fails later still (a result over the endpoint's limit), while the others
    # are running: giving up on it must not cancel its future (the SDK's result watcher would die on the late
    # failure) nor stop the executor.
    stuck = too_large(fake_vllm={"latency": 2})
    plain = [chat(fake_vllm={"latency": 2.5}) for _ in range(5)]
    streams = [streamed(fake_vllm={"tokens_per_second": 10}, max_tokens=30) for _ in range(5)]

    async def stream(request: UpstreamRequest) -> list[bytes]:
        return await collect(await patient.open_stream(request))

    outcomes = await asyncio.gather(
        impatient.submit(stuck),
        *(patient.submit(request) for request in plain),
        *(stream(request) for request in streams),
        return_exceptions=True,
    )

    assert isinstance(outcomes[0], UpstreamError)
    assert (outcomes[0].status, outcomes[0].code) == (504, "compute_timeout")
    for request, reply in zip(plain, outcomes[1:6], strict=True):
        assert isinstance(reply, bytes), reply
        assert orjson.loads(reply)["choices"] == direct(model_server, request)["choices"]
    for request, events in zip(streams, outcomes[6:], strict=True):
        assert isinstance(events, list), events
        assert content(events) == direct(model_server, request)["choices"][0]["message"]["content"]
    # The late failure has arrived, and the executor and its result watcher still serve.
    wait_for(
        lambda: (
            [task.status for task in compute.service.tasks.values() if task.request_id == stuck.request_id]
            == ["failed"]
        )
    )
    executor = executor_of(endpoints, endpoint_id)
    assert not executor._stopped and executor._get_result_watcher().is_alive()
    assert orjson.loads(await impatient.submit(chat()))["choices"]


async def test_a_result_over_the_endpoints_limit_is_a_502_and_the_next_one_runs(
    on_line: GlobusComputeBackend, compute: RunningCompute
) -> None:
    failing = too_large()

    with pytest.raises(UpstreamError) as failed:
        await on_line.submit(failing)

    assert (failed.value.status, failed.value.code) == (502, "compute_result_too_large")
    assert "10.0 MiB" in failed.value.message and "stream" in failed.value.message
    assert "MaxResultSizeExceeded" not in failed.value.message  # the endpoint's traceback is logged, not returned
    [task] = [task for task in compute.service.tasks.values() if task.request_id == failing.request_id]
    assert task.result is not None and "MaxResultSizeExceeded" in task.result.data
    assert orjson.loads(await on_line.submit(chat()))["choices"]


async def test_a_task_delayed_on_the_endpoint_still_answers(on_line: GlobusComputeBackend) -> None:
    assert orjson.loads(await on_line.submit(chat(fake_vllm={"latency": 1.5})))["choices"]


async def test_a_refused_submission_fails_its_request_and_the_stopped_executor_is_replaced(
    compute: RunningCompute, endpoints: ComputeEndpoints, model_server: str, function_id: str
) -> None:
    endpoint_id = compute.service.add_endpoint()
    unknown_function = backend(endpoints, model_server, endpoint_id=endpoint_id, function_id=str(uuid.uuid4()))
    good = backend(endpoints, model_server, endpoint_id=endpoint_id, function_id=function_id)

    with pytest.raises(UpstreamError) as refused:
        await unknown_function.submit(chat())
    stopped = executor_of(endpoints, endpoint_id)
    wait_for(lambda: stopped._stopped)  # the SDK's submitter thread stops its executor after a refusal

    assert refused.value.code == "compute_task_failed"
    assert orjson.loads(await good.submit(chat()))["choices"]
    replacement = executor_of(endpoints, endpoint_id)
    assert replacement is not stopped and not replacement._stopped


async def test_a_function_not_allowed_on_the_endpoint_is_refused_and_never_runs(
    compute: RunningCompute, endpoints: ComputeEndpoints, model_server: str, function_id: str
) -> None:
    endpoint_id = compute.service.add_endpoint(allowed_functions=[str(uuid.uuid4())])
    fenced = backend(endpoints, model_server, endpoint_id=endpoint_id, function_id=function_id)

    with pytest.raises(UpstreamError) as refused:
        await fenced.submit(chat())

    assert (refused.value.status, refused.value.code) == (502, "compute_function_not_allowed")
    assert refused.value.never_reached  # another endpoint of the model may take it
    assert endpoint_id not in compute.service.stats.submitted


async def test_the_endpoint_refuses_code_that_was_not_sent_as_source_text(
    compute: RunningCompute, endpoints: ComputeEndpoints, model_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = cast(Client, endpoints.client(GATEWAY))
    # The SDK's default code strategy (DillCode), which the endpoint config does not allow.
    monkeypatch.setattr(
        client, "fx_serializer", ComputeSerializer(strategy_code=DILL_CODE, strategy_data=DATA_STRATEGY)
    )
    dill_function = client.register_function(inference)
    monkeypatch.undo()
    wrong = backend(endpoints, model_server, endpoint_id=compute.service.add_endpoint(), function_id=dill_function)

    request = chat()

    with pytest.raises(UpstreamError) as refused:
        await wrong.submit(request)

    assert refused.value.code == "compute_task_failed"
    [task] = [task for task in compute.service.tasks.values() if task.request_id == request.request_id]
    assert task.result is not None and "DillCode" in task.result.data  # the engine's allowed_serializers said no


# --- endpoint status ---------------------------------------------------------------------------


async def test_an_offline_endpoint_gets_503_with_retry_after_and_nothing_is_submitted(
    compute: RunningCompute, endpoints: ComputeEndpoints, model_server: str, function_id: str
) -> None:
    endpoint_id = compute.service.add_endpoint(online=False)
    offline = backend(endpoints, model_server, endpoint_id=endpoint_id, function_id=function_id)

    with pytest.raises(ServiceUnavailable) as unavailable:
        await offline.submit(chat())
    with pytest.raises(ServiceUnavailable):
        await offline.open_stream(streamed())

    assert unavailable.value.code == "endpoint_offline"
    assert unavailable.value.headers["Retry-After"] == "60"
    assert "`demo-model` is offline" in unavailable.value.message
    assert endpoint_id not in compute.service.stats.submitted
    assert not [key for key in endpoints._executors if key[2] == endpoint_id]
    assert (await offline.health()).ok is False


async def test_status_is_cached_briefly_then_fetched_again(
    compute: RunningCompute,
    endpoints: ComputeEndpoints,
    model_server: str,
    function_id: str,
    gateway_settings: Any,
) -> None:
    endpoint_id = compute.service.add_endpoint()
    served = backend(endpoints, model_server, endpoint_id=endpoint_id, function_id=function_id)
    before = compute.service.stats.status_calls.get(endpoint_id, 0)

    for _ in range(3):
        await served.submit(chat())
    assert compute.service.stats.status_calls[endpoint_id] == before + 1

    compute.service.endpoints[endpoint_id].online = False
    assert (await served.health()).ok  # still the cached status
    gateway_settings.GATEWAY = gateway_settings.GATEWAY.model_copy(update={"GLOBUS_COMPUTE_STATUS_CACHE_SECONDS": 0})
    with pytest.raises(ServiceUnavailable):
        await served.submit(chat())


async def test_status_is_fetched_without_blocking_the_event_loop(
    on_line: GlobusComputeBackend, compute: RunningCompute
) -> None:
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.01)

    compute.service.status_gate.clear()  # Globus is slow to answer
    clock = asyncio.create_task(ticker())
    request = asyncio.create_task(on_line.submit(chat()))
    try:
        await asyncio.sleep(0.1)
        assert ticks >= 5  # the loop kept running other work meanwhile
        assert not request.done()
    finally:
        compute.service.status_gate.set()
    assert orjson.loads(await request)["choices"]
    clock.cancel()


async def test_health_reports_the_endpoints_workers(on_line: GlobusComputeBackend, compute: RunningCompute) -> None:
    workers = compute.service.engine.get_status_report().global_state["total_workers"]

    health = await on_line.health()

    assert health.ok and f"{workers} workers" in health.detail


# --- executors and credentials -----------------------------------------------------------------


async def test_one_executor_per_credentials_and_endpoint(
    compute: RunningCompute,
    endpoints: ComputeEndpoints,
    model_server: str,
    function_id: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SITE_COMPUTE_SECRET", SITE_CLIENT_SECRET)
    site_function = endpoints.client(Credentials(SITE_CLIENT_ID, SITE_CLIENT_SECRET)).register_function(inference)
    first, second = compute.service.add_endpoint(), compute.service.add_endpoint()
    site = {"client_id": SITE_CLIENT_ID, "client_secret_env": "SITE_COMPUTE_SECRET"}
    backends = [
        backend(endpoints, model_server, endpoint_id=first, function_id=function_id),
        backend(endpoints, model_server, endpoint_id=first, function_id=function_id, task_timeout=30),
        backend(endpoints, model_server, endpoint_id=second, function_id=function_id),
        backend(endpoints, model_server, endpoint_id=first, function_id=site_function, credentials=site),
    ]

    # The gateway's account submits first, so the SDK's process-wide task group is one the site cannot use.
    await backends[0].submit(chat())
    await asyncio.gather(*(each.submit(chat()) for each in backends))
    await asyncio.gather(*(each.submit(chat()) for each in backends[1:]))

    used = {(key[0], key[2]): executor for key, executor in endpoints._executors.items()}
    assert sorted(used) == sorted([(COMPUTE_CLIENT_ID, first), (COMPUTE_CLIENT_ID, second), (SITE_CLIENT_ID, first)])
    assert all(str(cast(Executor, executor).endpoint_id) == key[1] for key, executor in used.items())
    assert compute.service.stats.submitted[second] == 2
    assert compute.service.stats.submitted[first] == 6


async def test_without_credentials_the_endpoint_is_reported_misconfigured(
    gateway_settings: Any, endpoints: ComputeEndpoints, model_server: str, function_id: str
) -> None:
    gateway_settings.GATEWAY = gateway_settings.GATEWAY.model_copy(update={"GLOBUS_COMPUTE_CLIENT_ID": ""})

    with pytest.raises(GatewayError) as misconfigured:
        backend(endpoints, model_server, endpoint_id=str(uuid.uuid4()), function_id=function_id)

    assert misconfigured.value.code == "backend_misconfigured"


def test_the_sdk_objects_are_built_once_and_bound_to_one_endpoint() -> None:
    real = ComputeEndpoints()
    credentials = Credentials(COMPUTE_CLIENT_ID, COMPUTE_CLIENT_SECRET)
    first, second = str(uuid.uuid4()), str(uuid.uuid4())

    client = real.client(credentials)
    executors = [real._executor(credentials, endpoint) for endpoint in (first, first, second)]
    try:
        assert isinstance(client, Client)
        assert isinstance(client.fx_serializer.code_serializer, PureSourceTextInspect)
        assert executors[0] is executors[1] and executors[0] is not executors[2]
        assert all(isinstance(executor, Executor) for executor in executors)
        executor = executors[0]
        assert isinstance(executor, Executor)
        assert str(executor.endpoint_id) == first
        assert executor.result_serializers == [DATA_STRATEGY]
        assert executor.serializer.allowed_deserializer_types == {PureSourceTextInspect, JSONData}
    finally:
        for each in executors:
            cast(concurrent.futures.Executor, each).shutdown(wait=False)


# --- config ------------------------------------------------------------------------------------


def test_config_errors_name_the_field() -> None:
    good = {"endpoint_id": str(uuid.uuid4()), "function_id": str(uuid.uuid4()), "vllm": {"port": 8001}}
    assert backend_config_errors("globus_compute", good) == []
    assert backend_config_errors("local", {"vllm": {"port": 8001}}) == []

    problems = backend_config_errors(
        "globus_compute",
        {
            "endpoint_id": "polaris",
            "vllm": {"port": 70000, "host": "node 12"},
            "credentials": {"client_id": str(uuid.uuid4()), "client_secret_env": "lower-case"},
            "timeout": 5,
        },
    )

    fields = {problem.split(":")[0] for problem in problems}
    assert fields == {
        "endpoint_id",
        "function_id",
        "vllm.port",
        "vllm.host",
        "credentials.client_secret_env",
        "timeout",
    }
