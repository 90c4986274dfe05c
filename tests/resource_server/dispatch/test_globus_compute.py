"""The `globus_compute` backend through the fake at the SDK seam: the real function runs in another process
after the SDK's serializer round trip, against the fake vLLM server, and streams through the real relay."""

from __future__ import annotations

import asyncio
import concurrent.futures
import uuid
from typing import Any, cast
from urllib.parse import urlsplit

import httpx
import orjson
import pytest
from globus_compute_sdk import Client, Executor
from globus_compute_sdk.serialize import ComputeSerializer, JSONData, PureSourceTextInspect
from globus_compute_sdk.serialize.base import IDENTIFIER_LENGTH

from compute_functions import DATA_STRATEGY, inference
from fakes.globus_compute import FakeGlobusCompute, Fault
from resource_server.backend_kinds import backend_config_errors
from resource_server.bootstrap import runtime
from resource_server.dispatch.base import UpstreamRequest
from resource_server.dispatch.compute import ComputeStream
from resource_server.dispatch.globus_compute import (
    ComputeEndpoints,
    Credentials,
    GlobusComputeBackend,
    GlobusComputeConfig,
    SdkConnector,
)
from resource_server.errors import GatewayError, ServiceUnavailable, UpstreamError
from resource_server.routes import Route
from tests.resource_server.dispatch.conftest import CLIENT_ID, CLIENT_SECRET, OTHER_ID, OTHER_SECRET
from tests.servers import free_port

pytestmark = pytest.mark.usefixtures("gateway_settings")

GATEWAY = Credentials(CLIENT_ID, CLIENT_SECRET)
DILL_CODE = "globus_compute_sdk.serialize.DillCode"
HELLO = [{"role": "user", "content": "Hello there"}]


@pytest.fixture
def endpoints(compute: FakeGlobusCompute) -> ComputeEndpoints:
    """Fresh executor and status caches for each test, over the one fake service."""
    return ComputeEndpoints(compute)


@pytest.fixture
def function_id(endpoints: ComputeEndpoints) -> str:
    return endpoints.client(GATEWAY).register_function(inference)


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
def on_line(compute: FakeGlobusCompute, endpoints: ComputeEndpoints, model_server: str, function_id: str) -> Any:
    """A backend on a fresh online endpoint."""
    return backend(endpoints, model_server, endpoint_id=compute.add_endpoint(), function_id=function_id)


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


# --- requests ------------------------------------------------------------------------------------


async def test_chat_runs_as_the_registered_source_text_function(
    on_line: GlobusComputeBackend, compute: FakeGlobusCompute, function_id: str, model_server: str
) -> None:
    request = chat()

    reply = orjson.loads(await on_line.submit(request))

    expected = direct(model_server, request)
    assert reply["choices"] == expected["choices"]
    assert reply["usage"] == expected["usage"]
    code = ComputeSerializer.unpack_buffers(compute.functions[function_id].code)[0]
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
    compute: FakeGlobusCompute, endpoints: ComputeEndpoints, function_id: str
) -> None:
    nothing_there = backend(
        endpoints, f"http://127.0.0.1:{free_port()}/v1", endpoint_id=compute.add_endpoint(), function_id=function_id
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
    compute: FakeGlobusCompute, endpoints: ComputeEndpoints, model_server: str, function_id: str
) -> None:
    quick_to_give_up = backend(
        endpoints, model_server, endpoint_id=compute.add_endpoint(), function_id=function_id, idle_timeout=0.5
    )
    stream = await quick_to_give_up.open_stream(streamed(max_tokens=5, fake_vllm={"tokens_per_second": 1}))

    with pytest.raises(UpstreamError) as idle:
        await collect(stream)

    assert (idle.value.status, idle.value.code) == (504, "upstream_timeout")


async def test_no_first_chunk_in_time_is_a_504_before_streaming(
    compute: FakeGlobusCompute, endpoints: ComputeEndpoints, model_server: str, function_id: str
) -> None:
    cold = backend(
        endpoints, model_server, endpoint_id=compute.add_endpoint(), function_id=function_id, first_chunk_timeout=0.5
    )
    request = streamed()
    compute.faults[request.request_id] = Fault(hang=True)  # e.g. a node that never comes up

    with pytest.raises(UpstreamError) as cold_start:
        await cold.open_stream(request)

    assert (cold_start.value.status, cold_start.value.code) == (504, "upstream_timeout")
    assert "did not start answering" in cold_start.value.message


# --- failures stay with their request ------------------------------------------------------------


async def test_a_timeout_fails_one_request_and_leaves_ten_in_flight_untouched(
    compute: FakeGlobusCompute, endpoints: ComputeEndpoints, model_server: str, function_id: str
) -> None:
    endpoint_id = compute.add_endpoint()
    # Two Endpoint rows on one Globus Compute endpoint share its executor.
    impatient = backend(endpoints, model_server, endpoint_id=endpoint_id, function_id=function_id, task_timeout=1)
    patient = backend(endpoints, model_server, endpoint_id=endpoint_id, function_id=function_id, task_timeout=20)
    stuck = chat("stuck-request")
    # It times out at 1 s, and its task fails later still, while the others are running: giving up on it must
    # not cancel its future (the SDK's result watcher would die on the late failure) nor stop the executor.
    compute.faults[stuck.request_id] = Fault(delay=2, fail="the node went away")
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
    executors = [executor for executor in compute.executors if executor.endpoint_id == endpoint_id]
    assert len(executors) == 1 and not executors[0].stopped and executors[0].watching
    assert orjson.loads(await impatient.submit(chat()))["choices"]  # and it keeps serving


async def test_a_task_that_fails_on_the_endpoint_is_a_502_and_the_next_one_runs(
    on_line: GlobusComputeBackend, compute: FakeGlobusCompute
) -> None:
    failing = chat()
    compute.faults[failing.request_id] = Fault(fail="worker lost")

    with pytest.raises(UpstreamError) as failed:
        await on_line.submit(failing)

    assert (failed.value.status, failed.value.code) == (502, "compute_task_failed")
    assert "worker lost" not in failed.value.message  # the endpoint's traceback is logged, not returned
    assert orjson.loads(await on_line.submit(chat()))["choices"]


async def test_a_task_delayed_on_the_endpoint_still_answers(
    on_line: GlobusComputeBackend, compute: FakeGlobusCompute
) -> None:
    delayed = chat()
    compute.faults[delayed.request_id] = Fault(delay=0.3)

    assert orjson.loads(await on_line.submit(delayed))["choices"]


async def test_a_refused_submission_fails_its_request_and_the_stopped_executor_is_replaced(
    compute: FakeGlobusCompute, endpoints: ComputeEndpoints, model_server: str, function_id: str
) -> None:
    endpoint_id = compute.add_endpoint()
    unknown_function = backend(endpoints, model_server, endpoint_id=endpoint_id, function_id=str(uuid.uuid4()))
    good = backend(endpoints, model_server, endpoint_id=endpoint_id, function_id=function_id)

    with pytest.raises(UpstreamError) as refused:
        await unknown_function.submit(chat())

    assert refused.value.code == "compute_task_failed"
    assert orjson.loads(await good.submit(chat()))["choices"]
    executors = [executor for executor in compute.executors if executor.endpoint_id == endpoint_id]
    assert [executor.stopped for executor in executors] == [True, False]


async def test_the_fake_endpoint_refuses_code_that_was_not_sent_as_source_text(
    compute: FakeGlobusCompute, endpoints: ComputeEndpoints, model_server: str
) -> None:
    pickling = ComputeSerializer(strategy_code=DILL_CODE, strategy_data=DATA_STRATEGY)  # the SDK's default code one
    pickled = compute.client(
        GATEWAY,
        code_serialization_strategy=pickling.code_serializer,
        data_serialization_strategy=pickling.data_serializer,
    )
    dill_function = pickled.register_function(inference)
    wrong = backend(endpoints, model_server, endpoint_id=compute.add_endpoint(), function_id=dill_function)

    with pytest.raises(UpstreamError) as refused:
        await wrong.submit(chat())

    assert refused.value.code == "compute_task_failed"


# --- endpoint status ---------------------------------------------------------------------------


async def test_an_offline_endpoint_gets_503_with_retry_after_and_nothing_is_submitted(
    compute: FakeGlobusCompute, endpoints: ComputeEndpoints, model_server: str, function_id: str
) -> None:
    endpoint_id = compute.add_endpoint(online=False)
    offline = backend(endpoints, model_server, endpoint_id=endpoint_id, function_id=function_id)

    with pytest.raises(ServiceUnavailable) as unavailable:
        await offline.submit(chat())
    with pytest.raises(ServiceUnavailable):
        await offline.open_stream(streamed())

    assert unavailable.value.code == "endpoint_offline"
    assert unavailable.value.headers["Retry-After"] == "60"
    assert "`demo-model` is offline" in unavailable.value.message
    assert not [executor for executor in compute.executors if executor.endpoint_id == endpoint_id]
    assert (await offline.health()).ok is False


async def test_status_is_cached_briefly_then_fetched_again(
    compute: FakeGlobusCompute,
    endpoints: ComputeEndpoints,
    model_server: str,
    function_id: str,
    gateway_settings: Any,
) -> None:
    endpoint_id = compute.add_endpoint()
    served = backend(endpoints, model_server, endpoint_id=endpoint_id, function_id=function_id)
    before = compute.calls["get_endpoint_status"]

    for _ in range(3):
        await served.submit(chat())
    assert compute.calls["get_endpoint_status"] == before + 1

    compute.set_status(endpoint_id, online=False)
    assert (await served.health()).ok  # still the cached status
    gateway_settings.GATEWAY = gateway_settings.GATEWAY.model_copy(update={"GLOBUS_COMPUTE_STATUS_CACHE_SECONDS": 0})
    with pytest.raises(ServiceUnavailable):
        await served.submit(chat())


async def test_status_is_fetched_without_blocking_the_event_loop(
    on_line: GlobusComputeBackend, compute: FakeGlobusCompute
) -> None:
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.01)

    compute.status_gate.clear()  # Globus is slow to answer
    clock = asyncio.create_task(ticker())
    request = asyncio.create_task(on_line.submit(chat()))
    try:
        await asyncio.sleep(0.1)
        assert ticks >= 5  # the loop kept running other work meanwhile
        assert not request.done()
    finally:
        compute.status_gate.set()
    assert orjson.loads(await request)["choices"]
    clock.cancel()


async def test_health_reports_the_endpoints_workers(on_line: GlobusComputeBackend) -> None:
    health = await on_line.health()
    assert health.ok and "4 workers" in health.detail


# --- executors and credentials -----------------------------------------------------------------


async def test_one_executor_per_credentials_and_endpoint(
    compute: FakeGlobusCompute,
    endpoints: ComputeEndpoints,
    model_server: str,
    function_id: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SITE_COMPUTE_SECRET", OTHER_SECRET)
    site_function = endpoints.client(Credentials(OTHER_ID, OTHER_SECRET)).register_function(inference)
    first, second = compute.add_endpoint(), compute.add_endpoint()
    site = {"client_id": OTHER_ID, "client_secret_env": "SITE_COMPUTE_SECRET"}
    backends = [
        backend(endpoints, model_server, endpoint_id=first, function_id=function_id),
        backend(endpoints, model_server, endpoint_id=first, function_id=function_id, task_timeout=30),
        backend(endpoints, model_server, endpoint_id=second, function_id=function_id),
        backend(endpoints, model_server, endpoint_id=first, function_id=site_function, credentials=site),
    ]

    for _ in range(2):
        await asyncio.gather(*(each.submit(chat()) for each in backends))

    used = [executor for executor in compute.executors if executor.endpoint_id in (first, second)]
    assert sorted((executor.endpoint_id, executor.client.credentials.client_id) for executor in used) == sorted(
        [(first, CLIENT_ID), (second, CLIENT_ID), (first, OTHER_ID)]
    )
    assert [executor.submitted for executor in used if executor.endpoint_id == second] == [2]


async def test_without_credentials_the_endpoint_is_reported_misconfigured(
    gateway_settings: Any, endpoints: ComputeEndpoints, model_server: str, function_id: str
) -> None:
    gateway_settings.GATEWAY = gateway_settings.GATEWAY.model_copy(update={"GLOBUS_COMPUTE_CLIENT_ID": ""})

    with pytest.raises(GatewayError) as misconfigured:
        backend(endpoints, model_server, endpoint_id=str(uuid.uuid4()), function_id=function_id)

    assert misconfigured.value.code == "backend_misconfigured"


def test_the_sdk_connector_builds_real_sdk_objects_bound_to_one_endpoint() -> None:
    real = ComputeEndpoints(SdkConnector())
    credentials = Credentials(CLIENT_ID, CLIENT_SECRET)
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
