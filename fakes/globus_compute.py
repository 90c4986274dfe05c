"""A fake of Globus Compute as the gateway meets it through globus-compute-sdk's `Client` and `Executor`.

It plugs into the gateway's `ComputeConnector` seam (`dispatch/globus_compute.py`) and behaves like the
service and the SDK at that interface:

- `client(...)` is a `Client` with the given serialization strategies. `register_function` stores exactly
  what the SDK uploads (`FunctionRegistrationData`), owned by that client; `get_endpoint_status` answers
  like `GET /v2/endpoints/{id}/status`, and unknown endpoints or a wrong client secret raise the SDK's
  `ComputeAPIError`.
- `executor(...)` is an `Executor` bound to one endpoint. A task is packed with the executor's serializer,
  unpacked and run in a separate process by an "endpoint" that accepts only source-text code and JSON
  data (as `endpoint_configs/` do), and its result is serialized with the executor's result serializers
  and read back with its serializer: code or data that would not survive the real round trip fails here.
  A refused submission (unknown function, another account's function, unknown endpoint) fails the task
  and stops the executor, as the SDK's submitter thread does.

Tests script endpoint status and per-request faults (found by the task's `request_id`): a delay before
the task runs, a failure raised on the endpoint, or a task that never finishes.
"""

from __future__ import annotations

import contextlib
import hmac
import multiprocessing
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError, ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import globus_sdk
import requests
from globus_compute_sdk.errors import TaskExecutionFailed
from globus_compute_sdk.sdk.asynchronous.compute_future import ComputeFuture
from globus_compute_sdk.sdk.client import FunctionRegistrationData
from globus_compute_sdk.serialize import ComputeSerializer, SerializationStrategy

from resource_server.dispatch.compute_serde import exit_with_parent, pack_task, run_task
from resource_server.dispatch.globus_compute import ComputeClient, Credentials

SERVICE_URL = "https://compute.api.globus.org"


def api_error(status: int, code: str, message: str, method: str, path: str) -> globus_sdk.ComputeAPIError:
    """The error the SDK raises for a refused Globus Compute call."""
    response = requests.Response()
    response.status_code = status
    response.headers["Content-Type"] = "application/json"
    response._content = f'{{"code": "{code}", "error_args": [], "reason": "{message}"}}'.encode()
    response.request = requests.Request(method, f"{SERVICE_URL}{path}").prepare()
    response.url = f"{SERVICE_URL}{path}"
    return globus_sdk.ComputeAPIError(response)


@dataclass(frozen=True)
class Fault:
    """What happens to the task of one request."""

    delay: float = 0.0  # seconds before the task starts (a busy or cold endpoint)
    fail: str | None = None  # then the task raises on the endpoint with this message
    hang: bool = False  # the task never finishes


@dataclass
class _Function:
    owner: str
    name: str
    code: str


@dataclass
class FakeGlobusCompute:
    """The service: registered functions, endpoints, faults, and what the gateway asked of it."""

    clients: dict[str, str]  # client id -> secret
    workers: int = 16
    functions: dict[str, _Function] = field(default_factory=dict)
    statuses: dict[str, dict[str, Any]] = field(default_factory=dict)
    faults: dict[str, Fault] = field(default_factory=dict)
    calls: Counter[str] = field(default_factory=Counter)
    executors: list[FakeExecutor] = field(default_factory=list)
    status_gate: threading.Event = field(default_factory=threading.Event)  # cleared: status calls wait

    def __post_init__(self) -> None:
        self.status_gate.set()
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["resource_server.dispatch.compute_serde"])
        self._endpoints = ProcessPoolExecutor(self.workers, mp_context=context, initializer=exit_with_parent)

    def add_endpoint(self, *, online: bool = True, workers: int = 4) -> str:
        endpoint_id = str(uuid.uuid4())
        self.set_status(endpoint_id, online=online, workers=workers)
        return endpoint_id

    def set_status(self, endpoint_id: str, *, online: bool, workers: int = 4) -> None:
        details = {"total_workers": workers, "idle_workers": workers, "pending_tasks": 0, "outstanding_tasks": 0}
        self.statuses[endpoint_id] = {
            "status": "online" if online else "offline",
            "details": {**details, "managers": 1 if workers else 0},
        }

    def close(self) -> None:
        self._endpoints.shutdown(wait=False, cancel_futures=True)

    # --- the ComputeConnector seam --------------------------------------------------------------

    def client(
        self,
        credentials: Credentials,
        *,
        code_serialization_strategy: SerializationStrategy,
        data_serialization_strategy: SerializationStrategy,
    ) -> FakeClient:
        serializer = ComputeSerializer(
            strategy_code=code_serialization_strategy, strategy_data=data_serialization_strategy
        )
        return FakeClient(self, credentials, serializer)

    def executor(
        self, *, endpoint_id: str, client: ComputeClient, serializer: ComputeSerializer, result_serializers: list[str]
    ) -> FakeExecutor:
        assert isinstance(client, FakeClient), "executors of this fake take its own clients"
        executor = FakeExecutor(self, endpoint_id, client, serializer, list(result_serializers))
        self.executors.append(executor)
        return executor

    # --- service side ---------------------------------------------------------------------------

    def authenticate(self, credentials: Credentials, method: str, path: str) -> None:
        secret = self.clients.get(credentials.client_id)
        if secret is None or not hmac.compare_digest(secret, credentials.client_secret):
            # What the SDK surfaces when the client-credentials grant yields no usable token.
            raise api_error(401, "UNAUTHORIZED", "Invalid credentials", method, path)

    def run(self, task: str, result_serializers: list[str], output: Future[str], fault: Fault) -> None:
        """Run one task on "the endpoint" in a worker process, after the fault's delay."""
        if fault.hang:
            return
        if fault.delay:
            time.sleep(fault.delay)
        if fault.fail is not None:
            output.set_exception(TaskExecutionFailed(f"Traceback (most recent call last):\nRuntimeError: {fault.fail}"))
            return
        running = self._endpoints.submit(run_task, task, result_serializers)
        running.add_done_callback(lambda done: _complete(output, done))


def _complete(output: Future[str], done: Future[str]) -> None:
    """The endpoint reports a task that raised as an error result; the SDK turns it into TaskExecutionFailed."""
    exc = done.exception()
    if exc is not None:
        output.set_exception(TaskExecutionFailed(f"Traceback (most recent call last):\n{type(exc).__name__}: {exc}"))
    else:
        output.set_result(done.result())


class FakeClient:
    """Stands in for `globus_compute_sdk.Client`."""

    def __init__(self, service: FakeGlobusCompute, credentials: Credentials, serializer: ComputeSerializer) -> None:
        self._service = service
        self.credentials = credentials
        self.fx_serializer = serializer

    def register_function(self, function: Callable[..., Any], description: str | None = None) -> str:
        self._service.authenticate(self.credentials, "POST", "/v3/functions")
        data = FunctionRegistrationData(function=function, description=description, serializer=self.fx_serializer)
        function_id = str(uuid.uuid4())
        assert data.function_name is not None and data.function_code is not None
        self._service.functions[function_id] = _Function(
            self.credentials.client_id, data.function_name, data.function_code
        )
        self._service.calls["register_function"] += 1
        return function_id

    def get_endpoint_status(self, endpoint_uuid: str) -> dict[str, Any]:
        path = f"/v2/endpoints/{endpoint_uuid}/status"
        self._service.status_gate.wait()
        self._service.calls["get_endpoint_status"] += 1
        self._service.authenticate(self.credentials, "GET", path)
        status = self._service.statuses.get(endpoint_uuid)
        if status is None:
            raise api_error(404, "ENDPOINT_NOT_FOUND", f"Endpoint {endpoint_uuid} not found", "GET", path)
        return status


class FakeExecutor:
    """Stands in for `globus_compute_sdk.Executor` bound to one endpoint."""

    def __init__(
        self,
        service: FakeGlobusCompute,
        endpoint_id: str,
        client: FakeClient,
        serializer: ComputeSerializer,
        result_serializers: list[str],
    ) -> None:
        self.endpoint_id = endpoint_id
        self.client = client
        self.serializer = serializer
        self.result_serializers = result_serializers
        self.submitted = 0
        self.stopped = False
        self.watching = True  # False once its result watcher has died
        self._service = service

    def submit_to_registered_function(
        self, function_id: str, args: tuple[Any, ...] | None = None, kwargs: dict[str, Any] | None = None
    ) -> ComputeFuture:
        if self.stopped:
            raise RuntimeError(f"{self!r} is shutdown; no new functions may be executed")
        self.submitted += 1
        result = ComputeFuture()
        function = self._service.functions.get(function_id)
        refusal = self._refusal(function)
        if refusal is not None:
            # The SDK fails every future of the refused batch and its submitter thread stops the executor.
            self.stopped = True
            result.set_exception(refusal)
            return result
        assert function is not None
        result.task_id = str(uuid.uuid4())
        args, kwargs = tuple(args or ()), dict(kwargs or {})
        task = pack_task(self.serializer, function.code, args, kwargs)
        request = args[0] if args and isinstance(args[0], dict) else {}
        fault = self._service.faults.get(str(request.get("request_id")), Fault())
        output: Future[str] = Future()
        output.add_done_callback(lambda done: _read_result(self, result, done))
        threading.Thread(
            target=self._service.run, args=(task, self.result_serializers, output, fault), daemon=True
        ).start()
        return result

    def _refusal(self, function: _Function | None) -> Exception | None:
        submit = f"/v3/endpoints/{self.endpoint_id}/submit"
        try:
            self._service.authenticate(self.client.credentials, "POST", submit)
        except globus_sdk.ComputeAPIError as exc:
            return exc
        if self.endpoint_id not in self._service.statuses:
            return api_error(404, "ENDPOINT_NOT_FOUND", f"Endpoint {self.endpoint_id} not found", "POST", "/v3/submit")
        if function is None or function.owner != self.client.credentials.client_id:
            return api_error(
                403, "FUNCTION_ACCESS_FORBIDDEN", "Function not found or not permitted", "POST", "/v3/submit"
            )
        return None

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self.stopped = True


def _read_result(executor: FakeExecutor, result: ComputeFuture, done: Future[Any]) -> None:
    """Complete the caller's future as the SDK's result watcher does, including how it breaks.

    The watcher deserializes with the executor's serializer (so its allowlist applies). Setting a result on
    a future the caller cancelled is logged and skipped, but setting an *exception* on one raises out of the
    watcher thread, and then no task of the executor gets its result any more.
    """
    if not executor.watching:
        return
    exc = done.exception()
    if exc is None:
        try:
            value = executor.serializer.deserialize(done.result())
        except Exception as error:
            exc = error
        else:
            with contextlib.suppress(InvalidStateError):
                result.set_result(value)
            return
    try:
        result.set_exception(exc)
    except InvalidStateError:
        executor.watching = False
