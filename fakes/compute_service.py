"""The hosted Globus Compute service stood in, in front of a real endpoint engine, for the real SDK to use.

The gateway's `globus_compute` backend keeps its real globus-compute-sdk `Client` and `Executor`. Only
what cannot run here is replaced:

- The web service: a loopback HTTP app (point the SDK at it with GLOBUS_SDK_SERVICE_URL_COMPUTE) that
  checks bearer tokens with the Globus Auth fake (`fakes.globus`, whose client-credentials grant the SDK's
  `ClientApp` uses), and answers what globus-compute-sdk 4.19 calls, shaped as the service documents it:

      POST /v3/functions                       register a function (owned by the token's client)
      GET  /v2/endpoints/{id}/status           {"status": "online"|"offline", "details": the engine's report}
      POST /v3/endpoints/{id}/submit           a batch: task group (created on first use), task ids per function
      GET  /v2/tasks/{id}, POST /v2/batch_status   task status and result
      GET  /v2/get_amqp_result_connection_url  where the task group's result queue is

  Refusals carry the service's error body ({"code", "error_args", "reason", "http_status_code"}): unknown
  function (404 FUNCTION_NOT_FOUND), another account's function (403 FUNCTION_ACCESS_FORBIDDEN), a function
  not in the endpoint's `allowed_functions` (403 FUNCTION_NOT_PERMITTED), unknown endpoint (404
  ENDPOINT_NOT_FOUND), another account's task group (403 TASK_GROUP_ACCESS_FORBIDDEN), no valid token (401).
- AMQP: results go to the machine's real RabbitMQ, one queue per task group (`queue_prefix` + task group
  id, unique per service so parallel runs never meet), as messagepack `Result`s: the SDK's result watcher
  consumes them with pika exactly as it does from Globus.

Behind the service runs globus-compute-endpoint's real `GlobusComputeEngine` (Parsl, a LocalProvider block
of worker processes), built from endpoint_configs/local/config.yaml by the endpoint's own loader with only
`worker_init` replaced (there is no vLLM: the function calls the fake model server over loopback). Tasks
reach it as the endpoint's interchange hands them over (a packed `Task`: the registered code, then the
submitted arguments), and its results (the 10 MiB result limit and errors included) are published as the
interchange publishes them. Several endpoint ids may share the one engine, each with its own status and
`allowed_functions` (and whether its block is scaled in: no workers until a task comes).

Fault hooks: `lose(request_id)` makes the task of that gateway request vanish (accepted, never run, never
answered), as after an endpoint restart or a broker loss; clearing `status_gate` holds status answers back.

Start everything with `start_compute_service()` (a context manager); see its docstring.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Any

import orjson
import pika
import yaml
from globus_compute_common import messagepack
from globus_compute_common.messagepack.message_types import Result, ResultErrorDetails, Task

from fakes import asgi
from fakes.asgi import Receive, Scope, Send
from fakes.globus import COMPUTE_RESOURCE_SERVER, FakeGlobus, FakeGlobusConfig

ROOT = Path(__file__).resolve().parent.parent
LOCAL_CONFIG = ROOT / "endpoint_configs" / "local" / "config.yaml"
AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"
# Unused result queues go away on their own (RabbitMQ's queue TTL), so that test runs leave nothing behind.
QUEUE_EXPIRES_MS = 15 * 60 * 1000


class ServiceError(Exception):
    """A refusal, in the web service's error body."""

    def __init__(self, status: HTTPStatus, code: str, reason: str, *args: str) -> None:
        super().__init__(reason)
        self.status = status
        self.body = {"code": code, "error_args": list(args), "reason": reason, "http_status_code": int(status)}


@dataclass
class Function:
    owner: str  # client id
    name: str
    code: str  # the packed, serialized function as the SDK uploaded it


@dataclass
class Endpoint:
    online: bool = True
    allowed_functions: frozenset[str] | None = None  # None: any function
    # Its block was scaled in (`min_blocks: 0`, idle): it reports no workers until a task makes it start one.
    scaled_in: bool = False


@dataclass
class TaskRecord:
    owner: str
    task_group_id: str
    endpoint_id: str
    function_id: str
    request_id: str | None
    status: str = "waiting-for-ep"
    result: Result | None = None
    completion_t: str | None = None


@dataclass
class Stats:
    """What the service was asked: calls per route, tasks submitted per endpoint."""

    calls: dict[str, int] = field(default_factory=dict)
    status_calls: dict[str, int] = field(default_factory=dict)  # per endpoint
    submitted: dict[str, int] = field(default_factory=dict)  # tasks accepted, per endpoint


class Broker:
    """The service's side of RabbitMQ: declares task group queues and publishes results to them.

    One blocking pika connection, used under a lock (pika connections are not thread-safe).
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self._lock = threading.Lock()
        self._connection: pika.BlockingConnection | None = None

    def _channel(self) -> Any:
        if self._connection is None or not self._connection.is_open:
            params = pika.URLParameters(self.url)
            params.heartbeat = 0  # idle between tests for minutes; nothing here needs liveness checks
            self._connection = pika.BlockingConnection(params)
        return self._connection.channel()

    def declare(self, queue: str) -> None:
        with self._lock:
            channel = self._channel()
            channel.queue_declare(queue, arguments={"x-expires": QUEUE_EXPIRES_MS})
            channel.close()

    def publish(self, queue: str, body: bytes) -> None:
        with self._lock:
            channel = self._channel()
            properties = pika.BasicProperties(content_type="application/json", timestamp=int(time.time()))
            channel.basic_publish(exchange="", routing_key=queue, body=body, properties=properties)
            channel.close()

    def close(self) -> None:
        with self._lock:
            if self._connection is not None and self._connection.is_open:
                self._connection.close()


class ComputeService(asgi.App):
    """The web service and the endpoint's interchange, over one real engine. Build it with
    `start_compute_service`."""

    def __init__(self, *, auth: FakeGlobus, engine: Any, broker: Broker, queue_prefix: str) -> None:
        self.auth = auth
        self.engine = engine
        self.broker = broker
        self.queue_prefix = queue_prefix
        self.functions: dict[str, Function] = {}
        self.endpoints: dict[str, Endpoint] = {}
        self.tasks: dict[str, TaskRecord] = {}
        self.stats = Stats()
        self._task_groups: dict[str, str] = {}  # task group id -> owner
        self._lost: set[str] = set()  # request ids whose task is never answered
        self.status_gate = threading.Event()  # cleared: status requests wait (a slow service)
        self.status_gate.set()
        self._lock = threading.Lock()
        self._routes: list[tuple[str, re.Pattern[str], Any]] = [
            ("POST", re.compile(r"/v3/functions"), self._register_function),
            ("GET", re.compile(r"/v2/endpoints/(?P<endpoint_id>[^/]+)/status"), self._endpoint_status),
            ("POST", re.compile(r"/v3/endpoints/(?P<endpoint_id>[^/]+)/submit"), self._submit),
            ("GET", re.compile(r"/v2/tasks/(?P<task_id>[^/]+)"), self._task),
            ("POST", re.compile(r"/v2/batch_status"), self._batch_status),
            ("GET", re.compile(r"/v2/get_amqp_result_connection_url"), self._amqp_url),
        ]

    # --- what tests and benchmarks arrange ------------------------------------------------------------

    def add_endpoint(
        self, *, online: bool = True, allowed_functions: list[str] | None = None, scaled_in: bool = False
    ) -> str:
        """A new endpoint id served by the engine (`scaled_in`: with no workers until its first task)."""
        endpoint_id = str(uuid.uuid4())
        allowed = None if allowed_functions is None else frozenset(allowed_functions)
        self.endpoints[endpoint_id] = Endpoint(online=online, allowed_functions=allowed, scaled_in=scaled_in)
        return endpoint_id

    def lose(self, request_id: str) -> None:
        """The task of this gateway request is accepted and then lost: never run, never answered."""
        self._lost.add(request_id)

    # --- HTTP -----------------------------------------------------------------------------------------

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = await asgi.read_body(receive)
        method, path = scope["method"], scope["path"]
        for route_method, pattern, handler in self._routes:
            match = pattern.fullmatch(path)
            if match is None or route_method != method:
                continue
            key = f"{method} {pattern.pattern}"
            self.stats.calls[key] = self.stats.calls.get(key, 0) + 1
            try:
                client_id = self._client(dict(scope["headers"]))
                payload = orjson.loads(body) if body else {}
                # Submitting declares a queue on RabbitMQ: off the event loop.
                answer = await asyncio.to_thread(handler, client_id, payload, **match.groupdict())
            except ServiceError as refusal:
                await asgi.send_response(send, refusal.status, orjson.dumps(refusal.body), (asgi.JSON_TYPE,))
                return
            await asgi.send_response(send, HTTPStatus.OK, orjson.dumps(answer), (asgi.JSON_TYPE,))
            return
        await asgi.send_response(send, HTTPStatus.NOT_FOUND, asgi.NOT_FOUND, (asgi.JSON_TYPE,))

    def _client(self, headers: dict[bytes, bytes]) -> str:
        authorization = headers.get(b"authorization", b"").decode("latin-1")
        token = authorization[7:] if authorization.startswith("Bearer ") else None
        client_id = self.auth.client_of(token, COMPUTE_RESOURCE_SERVER)
        if client_id is None:
            raise ServiceError(HTTPStatus.UNAUTHORIZED, "USER_UNAUTHENTICATED", "Could not authenticate the caller.")
        return client_id

    def _endpoint(self, endpoint_id: str) -> Endpoint:
        endpoint = self.endpoints.get(endpoint_id)
        if endpoint is None:
            raise ServiceError(
                HTTPStatus.NOT_FOUND, "ENDPOINT_NOT_FOUND", f"Endpoint {endpoint_id} could not be resolved", endpoint_id
            )
        return endpoint

    def _register_function(self, client_id: str, data: dict[str, Any]) -> dict[str, Any]:
        if not isinstance(data.get("function_code"), str) or not isinstance(data.get("function_name"), str):
            raise ServiceError(HTTPStatus.UNPROCESSABLE_ENTITY, "REQUEST_MALFORMED", "function_name and function_code")
        function_id = str(uuid.uuid4())
        self.functions[function_id] = Function(client_id, data["function_name"], data["function_code"])
        return {"function_uuid": function_id}

    def _endpoint_status(self, client_id: str, data: dict[str, Any], endpoint_id: str) -> dict[str, Any]:
        self.status_gate.wait()
        with self._lock:
            self.stats.status_calls[endpoint_id] = self.stats.status_calls.get(endpoint_id, 0) + 1
        endpoint = self._endpoint(endpoint_id)
        if not endpoint.online:
            return {"status": "offline", "details": {}}
        report = self.engine.get_status_report().global_state
        if endpoint.scaled_in:  # as the engine reports it with no block, scaling on
            report = {**report, "managers": 0, "active_managers": 0, "total_workers": 0, "idle_workers": 0}
            report |= {
                "outstanding_tasks": 0,
                "scaling_enabled": True,
                "max_blocks": max(report.get("max_blocks", 1), 1),
            }
        return {"status": "online", "details": {**report, "active": True}}

    def _submit(self, client_id: str, data: dict[str, Any], endpoint_id: str) -> dict[str, Any]:
        endpoint = self._endpoint(endpoint_id)
        batch: dict[str, list[str]] = data.get("tasks") or {}
        for function_id in batch:  # the whole batch is refused if any task is
            function = self.functions.get(function_id)
            if function is None:
                raise ServiceError(
                    HTTPStatus.NOT_FOUND,
                    "FUNCTION_NOT_FOUND",
                    f"Function {function_id} could not be resolved",
                    function_id,
                )
            if function.owner != client_id:
                raise ServiceError(
                    HTTPStatus.FORBIDDEN,
                    "FUNCTION_ACCESS_FORBIDDEN",
                    f"Unauthorized access to function {function_id}",
                    function_id,
                )
            if endpoint.allowed_functions is not None and function_id not in endpoint.allowed_functions:
                raise ServiceError(
                    HTTPStatus.FORBIDDEN,
                    "FUNCTION_NOT_PERMITTED",
                    f"Function {function_id} not permitted on endpoint {endpoint_id}",
                    function_id,
                    endpoint_id,
                )
        task_group_id = self._task_group(client_id, data.get("task_group_id"))
        if data.get("create_queue"):
            self.broker.declare(self.queue_prefix + task_group_id)
        result_serializers = data.get("result_serializers") or []
        answer: dict[str, list[str]] = {}
        for function_id, payloads in batch.items():
            answer[function_id] = [
                self._run(client_id, task_group_id, endpoint_id, function_id, payload, result_serializers)
                for payload in payloads
            ]
        accepted = sum(len(task_ids) for task_ids in answer.values())
        endpoint.scaled_in = False  # a task makes a scaled-in endpoint start a block, which runs it
        with self._lock:
            self.stats.submitted[endpoint_id] = self.stats.submitted.get(endpoint_id, 0) + accepted
        return {
            "request_id": str(uuid.uuid4()),
            "task_group_id": task_group_id,
            "endpoint_id": endpoint_id,
            "tasks": answer,
        }

    def _task_group(self, client_id: str, wanted: object) -> str:
        with self._lock:
            if not wanted:
                task_group_id = str(uuid.uuid4())
                self._task_groups[task_group_id] = client_id
                return task_group_id
            owner = self._task_groups.get(str(wanted))
        if owner is None:
            raise ServiceError(
                HTTPStatus.NOT_FOUND, "TASK_GROUP_NOT_FOUND", f"Task Group {wanted} could not be resolved", str(wanted)
            )
        if owner != client_id:
            raise ServiceError(
                HTTPStatus.FORBIDDEN, "TASK_GROUP_ACCESS_FORBIDDEN", f"Unauthorized access to Task Group {wanted}"
            )
        return str(wanted)

    def _task(self, client_id: str, data: dict[str, Any], task_id: str) -> dict[str, Any]:
        record = self.tasks.get(task_id)
        if record is None or record.owner != client_id:
            raise ServiceError(HTTPStatus.NOT_FOUND, "TASK_NOT_FOUND", f"Task {task_id} not found", task_id)
        return self._task_status(task_id, record)

    def _batch_status(self, client_id: str, data: dict[str, Any]) -> dict[str, Any]:
        found = {task_id: self.tasks.get(task_id) for task_id in data.get("task_ids") or ()}
        return {
            "response": "batch",
            "results": {
                task_id: self._task_status(task_id, record)
                for task_id, record in found.items()
                if record is not None and record.owner == client_id
            },
        }

    @staticmethod
    def _task_status(task_id: str, record: TaskRecord) -> dict[str, Any]:
        status: dict[str, Any] = {"task_id": task_id, "status": record.status, "task_group_id": record.task_group_id}
        if record.result is not None:
            status["completion_t"] = record.completion_t
            status["exception" if record.result.is_error else "result"] = record.result.data
        return status

    def _amqp_url(self, client_id: str, data: dict[str, Any]) -> dict[str, Any]:
        return {"connection_url": self.broker.url, "queue_prefix": self.queue_prefix}

    # --- the endpoint's interchange -------------------------------------------------------------------

    def _run(
        self,
        owner: str,
        task_group_id: str,
        endpoint_id: str,
        function_id: str,
        payload: str,
        result_serializers: list[str],
    ) -> str:
        """Record a task and hand it to the engine as the interchange does; its result is published later."""
        from globus_compute_endpoint.engines.base import GCFuture

        task_id = str(uuid.uuid4())
        request_id = _request_id(payload)
        self.tasks[task_id] = TaskRecord(owner, task_group_id, endpoint_id, function_id, request_id)
        if request_id in self._lost:
            return task_id
        task = Task(task_id=uuid.UUID(task_id), task_buffer=self.functions[function_id].code + payload)
        future = GCFuture(uuid.UUID(task_id), function_id=uuid.UUID(function_id))
        future.add_done_callback(self._forward)
        try:
            self.engine.submit(future, messagepack.pack(task), {}, result_serializers)
        except Exception as exc:  # as the interchange reports a task the engine would not take
            failed = Result(
                task_id=uuid.UUID(task_id),
                data=f"Failed to start task: {exc}",
                error_details=ResultErrorDetails(code="UNKNOWN", user_message=str(exc)),
            )
            future.set_result(messagepack.pack(failed))
        return task_id

    def _forward(self, future: Any) -> None:
        task_id = str(future.gc_task_id)
        try:
            packed: bytes = future.result()
        except Exception as exc:
            message = f"Unknown task exception: ({type(exc).__name__}) {exc}"
            error = ResultErrorDetails(code="UNKNOWN_TASK_FAILURE", user_message=message)
            packed = messagepack.pack(Result(task_id=uuid.UUID(task_id), data=message, error_details=error))
        result = messagepack.unpack(packed)
        assert isinstance(result, Result), f"the engine answered a {type(result).__name__}"
        record = self.tasks[task_id]
        record.result = result
        record.status = "failed" if result.is_error else "success"
        record.completion_t = f"{time.time():.6f}"
        self.broker.publish(self.queue_prefix + record.task_group_id, packed)


def _request_id(payload: str) -> str | None:
    """The gateway request a task belongs to, read from its JSON arguments (for the fault hook only)."""
    from globus_compute_sdk.serialize import ComputeSerializer

    serializer = ComputeSerializer()
    try:
        args = serializer.deserialize(serializer.unpack_buffers(payload)[0])
        request_id = args[0].get("request_id")
    except Exception:
        return None
    return str(request_id) if request_id else None


def engine_from_local_config(run_dir: Path) -> Any:
    """The endpoint's `GlobusComputeEngine` from endpoint_configs/local/config.yaml, by the endpoint's own
    loader, with `worker_init` replaced: no vLLM to start, and the worker pool is run from this Python's
    environment (the site config activates its own). Started and ready to take tasks."""
    from globus_compute_endpoint.endpoint.config.utils import load_config_yaml

    bin_dir = str(Path(sys.executable).parent)
    if shutil.which("globus-compute-endpoint") is None:
        # Parsl starts its interchange by command name, as on an endpoint host with the venv active.
        os.environ["PATH"] = f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"
    config = yaml.safe_load(LOCAL_CONFIG.read_text())
    config["engine"]["provider"]["worker_init"] = f'export PATH="{bin_dir}:$PATH"'
    engine = load_config_yaml(yaml.safe_dump(config)).engine
    engine.start(endpoint_id=uuid.uuid4(), run_dir=str(run_dir))
    return engine


@dataclass(frozen=True)
class RunningCompute:
    """What `start_compute_service` yields."""

    service: ComputeService
    auth: FakeGlobus
    compute_url: str  # GLOBUS_SDK_SERVICE_URL_COMPUTE
    auth_url: str  # GLOBUS_SDK_SERVICE_URL_AUTH
    clients: dict[str, str]  # client id -> secret, the accounts Globus Auth knows
    run_dir: Path  # the engine's run directory (its worker pools' command lines name it)

    def wait_for_workers(self, timeout: float = 120.0) -> int:
        """Wait until the engine's block has connected workers (a warm endpoint); returns how many."""
        deadline = time.monotonic() + timeout
        while not (workers := self.service.engine.get_status_report().global_state["total_workers"]):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the engine had no workers after {timeout:g} s")
            time.sleep(0.2)
        return int(workers)

    @property
    def environment(self) -> dict[str, str]:
        """The variables that point globus-sdk and globus-compute-sdk at this service (set them in the
        process that builds the SDK objects, before it does)."""
        return {"GLOBUS_SDK_SERVICE_URL_COMPUTE": self.compute_url, "GLOBUS_SDK_SERVICE_URL_AUTH": self.auth_url}


@contextlib.contextmanager
def start_compute_service(clients: dict[str, str], *, amqp_url: str = AMQP_URL) -> Iterator[RunningCompute]:
    """Start the Globus Auth fake, this service and the real engine; stop them all on exit.

    `clients` are the confidential clients (id -> secret) Globus Auth accepts. RabbitMQ must be running at
    `amqp_url`. Yields a `RunningCompute`; a benchmark driving the real `Executor` does, e.g.::

        from compute_functions import inference
        from resource_server.dispatch.globus_compute import Credentials, sdk_client, sdk_executor

        with start_compute_service({client_id: secret}) as compute:
            os.environ.update(compute.environment)  # before any SDK client is made
            compute.wait_for_workers()  # the block takes 10-30 s to come up
            endpoint_id = compute.service.add_endpoint()
            client = sdk_client(Credentials(client_id, secret))  # or python manage.py register_functions
            function_id = client.register_function(inference)
            executor = sdk_executor(endpoint_id, client)  # or Executor(..., batch_size=..., api_burst_limit=...)
            future = executor.submit_to_registered_function(function_id, args=(task,))

    `compute.service` records every task (`tasks`, `stats`) and takes faults (`lose`, `status_gate`).
    """
    auth = FakeGlobus(FakeGlobusConfig(clients=clients))
    broker = Broker(amqp_url)
    with tempfile.TemporaryDirectory(prefix="compute-endpoint-") as run_dir:
        engine = engine_from_local_config(Path(run_dir))
        try:
            service = ComputeService(
                auth=auth, engine=engine, broker=broker, queue_prefix=f"compute-stand-in.{uuid.uuid4().hex[:12]}."
            )
            with asgi.serve_in_thread(auth) as auth_url, asgi.serve_in_thread(service) as compute_url:
                yield RunningCompute(service, auth, compute_url, auth_url, dict(clients), Path(run_dir))
        finally:
            engine.shutdown()
            broker.close()
