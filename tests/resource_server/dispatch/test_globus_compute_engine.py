"""What the real SDK and the endpoint's real engine make of lost tasks, cold endpoints and pacing.

The session's stood-in service runs tasks on a real `GlobusComputeEngine` (`fakes.compute_service`): the lost
task is one the service accepted and never ran, the futures and the result watcher are the SDK's. (Named
failures through the same engine: test_globus_compute.py.)
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from globus_compute_sdk.sdk.executor import _RESULT_WATCHERS

from fakes.compute_service import RunningCompute
from resource_server.dispatch.globus_compute import ComputeEndpoints, EndpointStatus
from resource_server.errors import GatewayError
from tests.resource_server.dispatch.conftest import GATEWAY
from tests.resource_server.dispatch.test_globus_compute import backend, chat

pytestmark = pytest.mark.usefixtures("gateway_settings")


def _open_futures() -> set[str]:
    return {task_id for watcher in list(_RESULT_WATCHERS.values()) for task_id in watcher.get_open_futures()}


async def _eventually(condition: Any, what: str, seconds: float = 60.0) -> None:
    for _ in range(int(seconds / 0.05)):
        if condition():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{what} did not happen within {seconds:g} s")


async def test_a_lost_task_is_answered_long_before_its_timeout_and_the_sdk_forgets_it(
    compute: RunningCompute, endpoints: ComputeEndpoints, model_server: str, function_id: str, gateway_settings: Any
) -> None:
    gateway_settings.GATEWAY = gateway_settings.GATEWAY.model_copy(
        # Well above a result's way back through RabbitMQ here, and far below task_timeout.
        update={"GLOBUS_COMPUTE_LOST_TASK_SECONDS": 8.0, "GLOBUS_COMPUTE_STATUS_CACHE_SECONDS": 0.5}
    )
    on_line = backend(
        endpoints, model_server, endpoint_id=compute.service.add_endpoint(), function_id=function_id, task_timeout=900
    )
    assert b'"choices"' in await on_line.submit(chat())  # a task the endpoint does not lose is answered as ever
    request = chat()
    compute.service.lose(request.request_id)

    with pytest.raises(GatewayError) as lost:
        await asyncio.wait_for(on_line.submit(request), 120)  # a bound for the test; task_timeout is 900 s

    assert (lost.value.status, lost.value.code) == (502, "compute_task_lost")
    lost_ids = {task_id for task_id, task in compute.service.tasks.items() if task.request_id == request.request_id}
    assert len(lost_ids) == 1
    assert not lost_ids & _open_futures()  # the SDK's result watcher no longer holds it


async def test_an_endpoint_without_workers_gets_one_warm_up_task_and_requests_none(
    compute: RunningCompute, endpoints: ComputeEndpoints, model_server: str, function_id: str
) -> None:
    endpoint_id = compute.service.add_endpoint()
    on_line = backend(endpoints, model_server, endpoint_id=endpoint_id, function_id=function_id)
    cold = EndpointStatus(True, workers=0, idle_workers=0, can_start=True)

    refusals = await asyncio.gather(*(on_line._no_workers(chat(), cold) for _ in range(5)))

    assert {(error.status, error.code) for error in refusals} == {(503, "endpoint_starting")}
    assert all(int(error.headers["Retry-After"]) > 0 and error.never_reached for error in refusals)
    await _eventually(lambda: endpoints.recently_ran(GATEWAY, endpoint_id), "the warm-up task's answer")
    assert compute.service.stats.submitted.get(endpoint_id) == 1  # one task, and none of the five requests'


async def test_an_endpoint_that_can_start_no_workers_is_refused_at_once(
    compute: RunningCompute, endpoints: ComputeEndpoints, model_server: str, function_id: str
) -> None:
    endpoint_id = compute.service.add_endpoint()
    on_line = backend(endpoints, model_server, endpoint_id=endpoint_id, function_id=function_id)

    refused = await on_line._no_workers(chat(), EndpointStatus(True, workers=0, idle_workers=0, can_start=False))

    assert (refused.status, refused.code) == (503, "endpoint_no_workers")
    assert refused.never_reached
    await asyncio.sleep(0.5)  # what the SDK would have sent by now
    assert endpoint_id not in compute.service.stats.submitted


async def test_the_result_watcher_hands_results_over_at_the_settings_pace(
    compute: RunningCompute, endpoints: ComputeEndpoints, model_server: str, function_id: str
) -> None:
    on_line = backend(endpoints, model_server, endpoint_id=compute.service.add_endpoint(), function_id=function_id)
    # The executor's first batch makes its task group's watcher: paced from the next submission on.
    await on_line.submit(chat())
    await on_line.submit(chat())

    (executor,) = endpoints._executors.values()
    watcher = _RESULT_WATCHERS[executor.task_group_id]  # type: ignore[attr-defined]  # an SDK Executor
    assert watcher.poll_period_s == 0.02  # the SDK's own is 0.5 s


async def test_waking_sends_a_scaled_in_endpoint_one_warm_up_task_and_others_nothing(
    compute: RunningCompute, endpoints: ComputeEndpoints, model_server: str, function_id: str
) -> None:
    # The route stage's cold path wakes every cold candidate, each request: only a connected endpoint without
    # workers gets a task (one, however many requests wake it), which makes it start a block.
    scaled_in = compute.service.add_endpoint(scaled_in=True)
    with_workers, offline = compute.service.add_endpoint(), compute.service.add_endpoint(online=False)
    backends = {
        endpoint_id: backend(endpoints, model_server, endpoint_id=endpoint_id, function_id=function_id)
        for endpoint_id in (scaled_in, with_workers, offline)
    }

    await asyncio.gather(*(on_line.wake() for on_line in backends.values() for _ in range(3)))

    await _eventually(lambda: endpoints.recently_ran(GATEWAY, scaled_in), "the warm-up task's answer")
    submitted = compute.service.stats.submitted
    assert (submitted.get(scaled_in), submitted.get(with_workers), submitted.get(offline)) == (1, None, None)
