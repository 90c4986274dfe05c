"""A failed task's endpoint text becomes a named error: the texts come from globus-compute-endpoint's own code.

Each failure is produced by the code that produces it on a real endpoint (the worker's `execute_task`, the
engine's `_handle_task_exception` wrapping Parsl's own exception classes), then handed to the gateway as the SDK
hands it over (`TaskExecutionFailed(result.data)`, as `_ResultWatcher._match_results_to_futures` does).
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest
from globus_compute_common import messagepack
from globus_compute_common.messagepack.message_types import Result, Task, TaskTransition
from globus_compute_common.tasks import ActorName, TaskState
from globus_compute_endpoint.engines import ThreadPoolEngine
from globus_compute_endpoint.engines.helper import execute_task
from globus_compute_sdk.errors import TaskExecutionFailed
from globus_compute_sdk.serialize import ComputeSerializer
from globus_sdk import GlobusAPIError
from parsl.executors import ThreadPoolExecutor
from parsl.executors.errors import BadStateException
from parsl.executors.high_throughput.errors import ManagerLost, WorkerLost
from parsl.jobs.errors import TooManyJobFailuresError

from resource_server.dispatch.globus_compute_failures import task_exception_error
from resource_server.errors import ErrorCode, GatewayError

ENDPOINT = "Globus Compute endpoint 4b116d3c-1703-4f8f-9f6f-39921e5864df"


def _engine_failure(*attempts: Exception) -> TaskExecutionFailed:
    """What the SDK's future raises when Parsl failed the task (each attempt raised one of `attempts`)."""
    raised: list[Exception] = []
    for exc in attempts:
        try:
            raise exc
        except Exception as caught:
            raised.append(caught)
    begin = TaskTransition(timestamp=time.time_ns(), actor=ActorName.INTERCHANGE, state=TaskState.EXEC_START)
    result = ThreadPoolEngine(max_workers=1)._handle_task_exception(
        task_id=uuid.uuid4(), execution_begin=begin, exception_history=raised
    )
    return TaskExecutionFailed(result.data)


def _answer() -> str:
    return "x" * 2000  # a result larger than the limit the test gives the worker


def _bad_state() -> BadStateException:
    executor = ThreadPoolExecutor(label="GlobusComputeEngine-HighThroughputExecutor")
    # Parsl leaves these constructors untyped.
    return BadStateException(executor, Exception("block 0 failed: job held"))  # type: ignore[no-untyped-call]


def _worker_lost(worker: int, host: str) -> Exception:
    return WorkerLost(worker, host)  # type: ignore[no-untyped-call]  # Parsl leaves it untyped


def _named(exc: BaseException) -> GatewayError:
    error = task_exception_error(exc, endpoint=ENDPOINT)
    assert error is not None, f"not recognised: {exc}"
    return error


def test_a_result_over_the_endpoint_limit_is_named_with_both_sizes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # the worker's code changes into its run directory
    monkeypatch.setenv("GC_TASK_UUID", "")  # and sets this for the task
    serializer = ComputeSerializer()
    task_id = uuid.uuid4()
    function_args_kwargs: tuple[object, ...] = (_answer, (), {})
    buffer = serializer.pack_buffers([serializer.serialize(part) for part in function_args_kwargs])
    packed = execute_task(
        messagepack.pack(Task(task_id=task_id, task_buffer=buffer)),
        task_id,
        run_dir=str(tmp_path),
        result_size_limit=1024,
    )
    result = messagepack.unpack(packed)
    assert isinstance(result, Result) and result.is_error

    error = _named(TaskExecutionFailed(result.data))

    assert (error.status, error.code) == (502, ErrorCode.COMPUTE_RESULT_TOO_LARGE)
    assert "larger than the Globus Compute endpoint" in error.message and "stream" in error.message
    assert not error.never_reached


@pytest.mark.parametrize("lost", [ManagerLost(b"manager-1", "node7"), _worker_lost(3, "node7")])
def test_a_lost_worker_or_manager_is_a_502_naming_the_node(lost: Exception) -> None:
    error = _named(_engine_failure(lost))

    assert (error.status, error.code) == (502, ErrorCode.COMPUTE_WORKER_LOST)
    assert "node7" in error.message
    assert "Retry-After" not in error.headers


def test_an_endpoint_in_a_bad_state_is_a_503_with_retry_after_another_endpoint_may_take() -> None:
    error = _named(_engine_failure(_bad_state()))

    assert (error.status, error.code) == (503, ErrorCode.ENDPOINT_BAD_STATE)
    assert int(error.headers["Retry-After"]) > 0
    assert error.never_reached
    assert "restarts it" in error.message


def test_a_task_sent_after_the_endpoint_went_bad_is_named_the_same() -> None:
    # Parsl's submit raises the bad state's reason itself: its block error handler's.
    error = _named(_engine_failure(TooManyJobFailuresError("Error 1:\n\tEXIT CODE: 1\n")))

    assert (error.status, error.code) == (503, ErrorCode.ENDPOINT_BAD_STATE)


def test_with_retries_the_final_attempt_decides() -> None:
    lost_then_bad = _named(_engine_failure(_worker_lost(1, "node3"), _bad_state()))
    bad_then_lost = _named(_engine_failure(_bad_state(), ManagerLost(b"m", "node4")))

    assert lost_then_bad.code is ErrorCode.ENDPOINT_BAD_STATE
    assert bad_then_lost.code is ErrorCode.COMPUTE_WORKER_LOST


def test_a_function_the_endpoint_does_not_allow_is_named_and_may_fail_over() -> None:
    # The text the endpoint's interchange puts in its FUNCTION_NOT_ALLOWED result (interchange.py, 4.19).
    function_id, endpoint_id = uuid.uuid4(), uuid.uuid4()
    refused = TaskExecutionFailed(f"Function {function_id} not permitted on endpoint {endpoint_id}")

    error = _named(refused)

    assert (error.status, error.code) == (502, ErrorCode.COMPUTE_FUNCTION_NOT_ALLOWED)
    assert error.never_reached
    assert "allowed_functions" in error.message


def test_the_service_refusing_the_function_at_submission_is_named_too() -> None:
    import requests

    response = requests.Response()
    response.status_code = 403
    response.headers["Content-Type"] = "application/json"
    response._content = (
        b'{"code": "FUNCTION_NOT_PERMITTED", "error_args": ["1234", "5678"], "http_status_code": 403,'
        b' "reason": "Function 1234 not permitted on endpoint 5678"}'
    )
    response.request = requests.Request("POST", "https://compute.api.globus.org/v3/endpoints/5678/submit").prepare()

    error = _named(GlobusAPIError(response))

    assert error.code is ErrorCode.COMPUTE_FUNCTION_NOT_ALLOWED


def test_other_failures_are_left_to_the_generic_answer() -> None:
    assert task_exception_error(_engine_failure(ValueError("boom")), endpoint=ENDPOINT) is None
    assert task_exception_error(RuntimeError("SDK thread quit unexpectedly."), endpoint=ENDPOINT) is None
