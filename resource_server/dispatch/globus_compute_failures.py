"""What a failed Globus Compute task tells the caller: the endpoint's and the SDK's failures, by name.

The SDK hands an endpoint's failure to the future as `TaskExecutionFailed`, whose only content is the
endpoint's text (the Result's `error_details` code is dropped on the way), so the failures are recognised by
what globus-compute-endpoint 4.19 and Parsl write there:

- the endpoint refuses a function that is not in its `allowed_functions`: "Function <id> not permitted on
  endpoint <id>" (its interchange, before the task runs);
- the worker's result exceeds the endpoint's limit (10 MiB): `repr(MaxResultSizeExceeded(size, limit))`;
- Parsl lost the worker or the node's manager: a traceback ending in `parsl...WorkerLost:` / `ManagerLost:`;
- Parsl's executor gave up on its blocks: the tasks it held fail with `BadStateException`, every later one with
  the reason itself (`TooManyJobFailuresError` from the block error handler) until the endpoint is restarted
  (`block_error_handler: false` in the endpoint config keeps one failed block from causing it).

With `max_retries_on_system_failure`, the text holds every attempt's traceback; the last attempt decides.
A submission the web service refuses reaches every future of its batch as the service's `GlobusAPIError`;
403 `FUNCTION_NOT_PERMITTED` is its refusal of a function the endpoint does not allow.
Anything else is `compute_task_failed`.
"""

from __future__ import annotations

import re

from resource_server.errors import ErrorCode, GatewayError, ServiceUnavailable, UpstreamError

_NOT_PERMITTED = re.compile(r"Function \S+ (?:is )?not (?:permitted|allowed) on (?:the )?endpoint", re.IGNORECASE)
_TOO_LARGE = re.compile(r"MaxResultSizeExceeded\((\d+), (\d+)\)")
_LOST = re.compile(r"^parsl\.\S*\.(WorkerLost|ManagerLost): (.*)$", re.MULTILINE)
_BAD_STATE = re.compile(r"^parsl\.\S*\.(BadStateException|TooManyJobFailuresError):", re.MULTILINE)
# The endpoint's marker before the final attempt's traceback when a task was retried.
_FINAL_ATTEMPT = "Traceback from attempt: final attempt"

# How long a caller is asked to wait before retrying on an endpoint in a bad state (an admin must restart it).
BAD_STATE_RETRY_AFTER = 300


def _mib(size: int) -> str:
    return f"{size / (1024 * 1024):.1f} MiB"


def function_not_allowed(endpoint: str) -> UpstreamError:
    error = UpstreamError(
        f"The {endpoint} does not allow the gateway's inference function (its `allowed_functions` does not "
        "list it). Please tell the gateway administrators.",
        code=ErrorCode.COMPUTE_FUNCTION_NOT_ALLOWED,
    )
    error.never_reached = True  # refused before it ran: another endpoint of the model may serve it
    return error


def endpoint_failure(remote: str, *, endpoint: str) -> GatewayError | None:
    """The error a failed task's endpoint text (`TaskExecutionFailed.remote_data`) names, if it names one."""
    if _NOT_PERMITTED.search(remote):
        return function_not_allowed(endpoint)
    final = remote.rsplit(_FINAL_ATTEMPT, 1)[-1]
    if too_large := _TOO_LARGE.search(final):
        size, limit = int(too_large[1]), int(too_large[2])
        return UpstreamError(
            f"The answer ({_mib(size)}) is larger than the {endpoint} can return ({_mib(limit)}). Ask for "
            "less (fewer tokens, choices or inputs), or use `stream`, which has no such limit.",
            code=ErrorCode.COMPUTE_RESULT_TOO_LARGE,
        )
    if _BAD_STATE.search(final):
        failed = ServiceUnavailable(
            f"The {endpoint} has failed (its worker blocks could not be started or kept) and runs nothing "
            "until an administrator restarts it. Please retry later; if it persists, tell the gateway "
            "administrators.",
            retry_after=BAD_STATE_RETRY_AFTER,
            code=ErrorCode.ENDPOINT_BAD_STATE,
        )
        failed.never_reached = True  # Parsl refuses every task without running it
        return failed
    if lost := _LOST.search(final):
        return UpstreamError(
            f"The cluster node running this request was lost ({lost[2][:300]}). Please retry.",
            code=ErrorCode.COMPUTE_WORKER_LOST,
        )
    return None


class TaskLost(Exception):
    """The gateway gave up on a task the endpoint no longer holds (see `GLOBUS_COMPUTE_LOST_TASK_SECONDS`)."""

    def __init__(self, reason: str, *, offline: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.offline = offline  # the endpoint disconnected, rather than holding nothing while connected


def _lost_error(lost: TaskLost, endpoint: str) -> GatewayError:
    if lost.offline:
        return ServiceUnavailable(
            f"The {endpoint} disconnected while running this request. Please retry later; if it stays offline, "
            "tell the gateway administrators.",
            retry_after=60,
            code=ErrorCode.ENDPOINT_OFFLINE,
        )
    return UpstreamError(
        f"The {endpoint} lost this request's task ({lost.reason}); it may have restarted. Please retry.",
        code=ErrorCode.COMPUTE_TASK_LOST,
    )


def task_exception_error(exc: BaseException, *, endpoint: str) -> GatewayError | None:
    """The named error a Globus Compute future's exception stands for, or None (then: compute_task_failed)."""
    from globus_compute_sdk.errors import TaskExecutionFailed
    from globus_sdk import GlobusAPIError

    if isinstance(exc, TaskLost):
        return _lost_error(exc, endpoint)
    if isinstance(exc, TaskExecutionFailed):
        return endpoint_failure(exc.remote_data, endpoint=endpoint)
    if isinstance(exc, GlobusAPIError) and exc.http_status == 403 and exc.code == "FUNCTION_NOT_PERMITTED":
        return function_not_allowed(endpoint)
    return None
