"""The `globus_compute` backend: each request runs `compute_functions.inference` on a Globus Compute endpoint.

The function runs on a cluster node beside the vLLM server and calls it over loopback. Tasks go through the
SDK's `Executor`: one per (credentials, endpoint), shared by every Endpoint row that uses that pair, and
never re-pointed at another endpoint. A request that times out only stops waiting: the executor and every
other task on it carry on. The endpoint's status comes from the SDK, cached briefly, fetched in a thread.

The status decides before a task is sent, so nothing is submitted into a void:
- offline: 503 `endpoint_offline` at once;
- online with no workers, and its engine cannot start any (scaling off, or `max_blocks` 0): 503
  `endpoint_no_workers` at once;
- online with no workers, and it can start a block (e.g. `min_blocks: 0`): one warm-up task per endpoint (a
  health task, in flight at most once per gateway process) makes the engine start a block, and the request is
  answered 503 `endpoint_starting` with Retry-After at once, without a task of its own that would outlive it.
  A task that succeeded on the endpoint within `_RECENT_SUCCESS_SECONDS` outweighs a status that still says
  no workers (the status is the endpoint's last heartbeat, up to 30 s old, then cached).
While a request waits, a task the endpoint lost is detected from the status (see
`GLOBUS_COMPUTE_LOST_TASK_SECONDS`), answered, and its future dropped from the SDK's result watcher.
At shutdown `ComputeEndpoints.close` stops the executors without waiting for their tasks, or the SDK's exit
hook would wait forever for a lost one.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol, cast
from uuid import UUID

from django.conf import settings
from pydantic import BaseModel, ConfigDict, Field

from compute_functions import DATA_STRATEGY
from resource_server.adapters.relay import RelayHub
from resource_server.dispatch.base import BackendHealth, ComputeFacts, UpstreamRequest
from resource_server.dispatch.compute import ComputeBackend, ComputeTaskConfig, TaskExecutor, settled
from resource_server.dispatch.fields import EnvVarName
from resource_server.dispatch.globus_compute_failures import TaskLost, task_exception_error
from resource_server.errors import ErrorCode, GatewayError, ServiceUnavailable, UpstreamError

# globus-compute-sdk is about 20 MB of a worker's memory: it is imported only where it is used, which the
# routing table does ahead of time, in a thread, for gateways that have a compute endpoint (see registry).

logger = logging.getLogger(__name__)

# How long a request waits for a status fetch before going ahead without it (the fetch carries on).
_STATUS_WAIT_SECONDS = 5.0
# A task that succeeded this recently proves the endpoint has workers, whatever an older status says
# (Parsl keeps an idle block for 2 minutes before scaling in).
_RECENT_SUCCESS_SECONDS = 60.0
# Retry-After of a request that found the endpoint starting a block (a node's start and model load: minutes).
_STARTING_RETRY_AFTER = 60
# How long `close` lets executors finish the batch they are sending (one service call, or its pacing delay):
# a task sent after its watcher was stopped would hold the process at exit.
_CLOSE_SUBMISSION_WAIT_SECONDS = 5.0


class ComputeCredentials(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    client_id: UUID = Field(description="The service account (Globus confidential client) id.")
    client_secret_env: EnvVarName = Field(description="Environment variable of the gateway holding its secret.")


class GlobusComputeConfig(ComputeTaskConfig):
    endpoint_id: UUID = Field(description="The Globus Compute endpoint (`globus-compute-endpoint list`).")
    function_id: UUID = Field(description="The function id printed by `python manage.py register_functions`.")
    credentials: ComputeCredentials | None = Field(
        default=None, description="Another service account for this endpoint; default GLOBUS_COMPUTE_CLIENT_ID."
    )


@dataclass(frozen=True, slots=True)
class Credentials:
    client_id: str
    client_secret: str = field(repr=False)

    @property
    def key(self) -> tuple[str, str]:
        """Identifies the account without holding its secret (a rotated secret gets fresh clients)."""
        return self.client_id, hashlib.sha256(self.client_secret.encode()).hexdigest()[:16]


class MissingCredentials(Exception):
    """A service account's id or secret is not in the environment; the message names the variable."""


class ComputeEndpointsClosed(RuntimeError):
    """A task was submitted after `ComputeEndpoints.close`: the process is shutting down."""


def default_credentials() -> Credentials | None:
    """The gateway's service account (GLOBUS_COMPUTE_CLIENT_ID / _SECRET), if configured."""
    gateway = settings.GATEWAY
    if not gateway.GLOBUS_COMPUTE_CLIENT_ID:
        return None
    return Credentials(gateway.GLOBUS_COMPUTE_CLIENT_ID, gateway.GLOBUS_COMPUTE_CLIENT_SECRET.get_secret_value())


def credentials_for(override: ComputeCredentials | None) -> Credentials:
    """The account an Endpoint submits with: its own override, else the gateway's service account."""
    if override is None:
        credentials = default_credentials()
        if credentials is None:
            raise MissingCredentials("set GLOBUS_COMPUTE_CLIENT_ID and GLOBUS_COMPUTE_CLIENT_SECRET")
        return credentials
    secret = os.environ.get(override.client_secret_env)
    if not secret:
        raise MissingCredentials(
            f"the secret of client {override.client_id} should be in {override.client_secret_env}, which is not set"
        )
    return Credentials(str(override.client_id), secret)


class ComputeClient(Protocol):
    """The part of `globus_compute_sdk.Client` the gateway uses."""

    def register_function(self, function: Callable[..., Any], description: str | None = None) -> str: ...

    def get_endpoint_status(self, endpoint_uuid: str) -> dict[str, Any]: ...


def sdk_client(credentials: Credentials) -> ComputeClient:
    """globus-compute-sdk's `Client`, authenticated as a confidential client (no browser login, no token
    files), registering functions as source text and sending arguments as JSON."""
    from globus_compute_sdk import Client
    from globus_sdk import ClientApp, GlobusAppConfig

    from resource_server.dispatch.compute_serde import compute_serializer

    serializer = compute_serializer()
    app = ClientApp(
        "inference-gateway",
        client_id=credentials.client_id,
        client_secret=credentials.client_secret,
        config=GlobusAppConfig(token_storage="memory"),  # noqa: S106 - a storage kind: tokens stay in memory
    )
    client = Client(
        app=app,
        code_serialization_strategy=serializer.code_serializer,
        data_serialization_strategy=serializer.data_serializer,
        # The check is a network call that only logs; endpoints report version mismatches with results.
        do_version_check=False,
    )
    # The Compute client passes its own base URL to globus-sdk, which then ignores globus-sdk's documented
    # per-service override; honour it, as every other Globus client does (a Globus test environment, a
    # site's API proxy).
    override = os.environ.get("GLOBUS_SDK_SERVICE_URL_COMPUTE")
    if override:
        web = client._compute_web_client
        web.v2.base_url = web.v3.base_url = override
    return cast(ComputeClient, client)


def sdk_executor(endpoint_id: str, client: ComputeClient) -> TaskExecutor:
    """globus-compute-sdk's `Executor` bound to one endpoint; results come back as JSON too (our serializer
    refuses anything else)."""
    from globus_compute_sdk import Executor

    from resource_server.dispatch.compute_serde import compute_serializer

    gateway = settings.GATEWAY
    executor = Executor(
        endpoint_id=endpoint_id,
        client=client,  # type: ignore[arg-type]  # a globus_compute_sdk.Client, built by sdk_client()
        serializer=compute_serializer(),
        result_serializers=[DATA_STRATEGY],
        label=f"gateway:{endpoint_id}",
        batch_size=gateway.GLOBUS_COMPUTE_BATCH_SIZE,
        api_burst_limit=gateway.GLOBUS_COMPUTE_API_BURST_LIMIT,
        api_burst_window_s=gateway.GLOBUS_COMPUTE_API_BURST_WINDOW_SECONDS,
    )
    # A new Executor joins the task group the process last submitted to (a class-wide default), even one of
    # another service account, which Globus refuses (403 TASK_GROUP_ACCESS_FORBIDDEN) and which would stop
    # this executor. Start without one: Globus makes this executor its own on the first submission.
    executor.task_group_id = None
    return cast(TaskExecutor, executor)


@dataclass(frozen=True, slots=True)
class EndpointStatus:
    online: bool | None  # None: unknown, the status could not be fetched
    workers: int | None = None
    idle_workers: int | None = None
    detail: str = ""
    outstanding_tasks: int | None = None  # tasks the endpoint's engine holds, queued or running
    can_start: bool | None = None  # its engine may start a block (scaling on, max_blocks > 0); None: not said
    fetched_at: float = 0.0  # time.monotonic() when the fetch began


def _count(details: dict[str, Any], key: str) -> int | None:
    value = details.get(key)
    return value if type(value) is int else None


def _parse_status(raw: object, *, fetched_at: float = 0.0) -> EndpointStatus:
    """The SDK's `get_endpoint_status` document: {"status": "online", "details": <the engine's status report>},
    whose details (globus-compute-endpoint 4.19, `GlobusComputeEngine.get_status_report`) include
    total_workers, idle_workers, outstanding_tasks, scaling_enabled, min_blocks and max_blocks."""
    if not isinstance(raw, dict):
        return EndpointStatus(None, detail="unreadable status", fetched_at=fetched_at)
    details = raw.get("details")
    details = details if isinstance(details, dict) else {}
    workers, idle = _count(details, "total_workers"), _count(details, "idle_workers")
    outstanding, max_blocks = _count(details, "outstanding_tasks"), _count(details, "max_blocks")
    scaling = details.get("scaling_enabled")
    can_start = None
    if isinstance(scaling, bool) and max_blocks is not None:
        can_start = scaling and max_blocks > 0
    online = raw.get("status") == "online"
    if not online:
        detail = str(raw.get("status", "unknown"))
    elif workers == 0 and can_start is False:
        detail = "online; no workers, and it starts none on demand"
    elif workers == 0:
        detail = "online; no workers yet: a task makes it start a block"
    else:
        detail = f"online; {workers if workers is not None else '?'} workers ({idle if idle is not None else '?'} idle)"
    return EndpointStatus(online, workers, idle, detail, outstanding, can_start, fetched_at)


def task_lost(status: EndpointStatus) -> TaskLost | None:
    """Whether a status fetched long enough after a task's submission says the endpoint lost the task.

    The engine counts every task it holds, queued or running (`outstanding_tasks`): while this task is
    unanswered, a connected endpoint that holds none has lost it (a task of another request keeps the count
    above 0, so then the loss is only found once the endpoint is otherwise idle, or at `task_timeout`).
    """
    if status.online is False:
        return TaskLost("the endpoint went offline", offline=True)
    if status.online and status.outstanding_tasks == 0:
        return TaskLost("the endpoint holds no task while this one is unanswered", offline=False)
    return None


class ComputeEndpoints:
    """SDK clients, executors and endpoint statuses, one per (credentials[, endpoint]), for the process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._clients: dict[tuple[str, str], ComputeClient] = {}
        self._executors: dict[tuple[str, str, str], TaskExecutor] = {}
        self._replaced: list[TaskExecutor] = []  # stopped by the SDK, their result watchers maybe still waiting
        self._statuses: dict[tuple[str, str, str], tuple[float, Future[EndpointStatus]]] = {}
        self._status_threads = ThreadPoolExecutor(max_workers=4, thread_name_prefix="compute-status")
        self._warm_ups: dict[tuple[str, str, str], tuple[float, Future[Any]]] = {}
        self._last_success: dict[tuple[str, str, str], float] = {}
        self._closed = False

    def client(self, credentials: Credentials) -> ComputeClient:
        """The account's client (see `sdk_client`), made once."""
        with self._lock:
            client = self._clients.get(credentials.key)
            if client is None:
                client = self._clients[credentials.key] = sdk_client(credentials)
            return client

    def _executor(self, credentials: Credentials, endpoint_id: str) -> TaskExecutor:
        client = self.client(credentials)
        key = (*credentials.key, endpoint_id)
        with self._lock:
            if self._closed:  # checked under the lock: no executor made now can escape `close`
                raise ComputeEndpointsClosed("the gateway's Globus Compute executors are closed")
            executor = self._executors.get(key)
            if executor is None:
                executor = self._executors[key] = sdk_executor(endpoint_id, client)
            return executor

    def _discard(self, credentials: Credentials, endpoint_id: str, executor: TaskExecutor) -> None:
        with self._lock:
            if self._executors.get((*credentials.key, endpoint_id)) is executor:
                del self._executors[(*credentials.key, endpoint_id)]
                self._replaced.append(executor)

    async def submit(
        self, credentials: Credentials, endpoint_id: str, function_id: str, task: dict[str, Any]
    ) -> Future[Any]:
        # Building an executor starts its threads and may touch the network: never on the event loop.
        executor = await asyncio.to_thread(self._executor, credentials, endpoint_id)
        try:
            future = executor.submit_to_registered_function(function_id, args=(task,))
        except RuntimeError:
            # The SDK shuts an executor down itself when a submission fails; replace it, once.
            logger.warning("executor for Globus Compute endpoint %s had stopped; starting a new one", endpoint_id)
            self._discard(credentials, endpoint_id, executor)
            executor = await asyncio.to_thread(self._executor, credentials, endpoint_id)
            future = executor.submit_to_registered_function(function_id, args=(task,))
        _pace_result_watcher(executor)
        key = (*credentials.key, endpoint_id)
        future.add_done_callback(lambda done: self._task_done(key, done))
        return future

    def _task_done(self, key: tuple[str, str, str], future: Future[Any]) -> None:
        if not future.cancelled() and future.exception() is None:
            with self._lock:
                self._last_success[key] = time.monotonic()

    def recently_ran(self, credentials: Credentials, endpoint_id: str) -> bool:
        """Whether a task succeeded on the endpoint within `_RECENT_SUCCESS_SECONDS`: it has workers."""
        with self._lock:
            last = self._last_success.get((*credentials.key, endpoint_id))
        return last is not None and time.monotonic() - last < _RECENT_SUCCESS_SECONDS

    async def warm_up(
        self, credentials: Credentials, endpoint_id: str, function_id: str, task: dict[str, Any], *, lifetime: float
    ) -> bool:
        """Send `task` to make the endpoint start a block, unless one sent within `lifetime` s is unanswered.

        At most one warm-up per endpoint is in flight in this process; True if this call sent it.
        """
        key = (*credentials.key, endpoint_id)
        now = time.monotonic()
        with self._lock:
            running = self._warm_ups.get(key)
            if running is not None and not running[1].done() and now - running[0] < lifetime:
                return False
            placeholder: Future[Any] = Future()  # holds the slot while the task is submitted
            self._warm_ups[key] = (now, placeholder)
        try:
            future = await self.submit(credentials, endpoint_id, function_id, task)
        except Exception:
            with self._lock:
                del self._warm_ups[key]
            raise
        logger.info("Globus Compute endpoint %s has no workers: sent a task to start a block", endpoint_id)
        with self._lock:
            self._warm_ups[key] = (now, future)
        # Its answer is not needed: its success is recorded like any task's (`recently_ran`).
        future.add_done_callback(lambda done: self._warm_up_done(key, done))
        return True

    def _warm_up_done(self, key: tuple[str, str, str], future: Future[Any]) -> None:
        with self._lock:
            if self._warm_ups.get(key, (0.0, None))[1] is future:
                del self._warm_ups[key]
        if not future.cancelled() and (exc := future.exception()) is not None:
            logger.warning("warm-up task on Globus Compute endpoint %s failed: %s", key[2], type(exc).__name__)

    def forget(self, future: Future[Any]) -> None:
        """Stop the SDK waiting for a task the endpoint lost.

        The SDK's result watcher (one per task group, shared by executors) keeps every open future by task id
        until its result arrives, which for a lost task is never: drop it there, so lost tasks do not pile up
        in memory. (The SDK has no public call for it; `_open_futures` and its lock are 4.19's.)
        """
        from globus_compute_sdk.sdk.executor import _RESULT_WATCHERS

        task_id = getattr(future, "task_id", None)
        if task_id is None:
            return
        for watcher in list(_RESULT_WATCHERS.values()):
            with watcher._new_futures_lock:
                if watcher._open_futures.get(task_id) is future:
                    del watcher._open_futures[task_id]
                    if not watcher._open_futures:
                        watcher._open_futures_empty.set()

    def close(self) -> None:
        """Stop every executor made here and its result watcher, without waiting for any task's result, so
        that the process can exit even while it holds a task the endpoint lost. Call it once no request
        waits for a task (at shutdown); it blocks for at most `_CLOSE_SUBMISSION_WAIT_SECONDS`.

        The SDK's exit hook (4.19, `executor.__atexit`) shuts down every executor and result watcher still
        registered, waiting for their open futures; a lost task's future never completes, so the process
        would never exit. Here each executor (those the SDK stopped after a failed submission too) stops with
        its queued tasks cancelled, finishes the batch it is sending (its submitter thread, `_task_submitter`,
        then hands the batch's futures to the watcher), and its watcher (`_RESULT_WATCHERS`, by task group)
        cancels its open futures and stops at its next poll: the hook finds nothing left to wait for.

        Closing is final: a later submission raises `ComputeEndpointsClosed` (an executor made afterwards
        would hold the process again) and a status reads unknown.
        """
        with self._lock:
            self._closed = True
            made = [*self._executors.values(), *self._replaced]
            self._executors.clear()
            self._replaced.clear()
        self._status_threads.shutdown(wait=False, cancel_futures=True)
        if not made:
            return  # the SDK need not even be imported
        from globus_compute_sdk import Executor
        from globus_compute_sdk.sdk.executor import _RESULT_WATCHERS

        executors = [cast(Executor, executor) for executor in made]
        for executor in executors:
            # The SDK's Executor is a concurrent.futures.Executor, whose shutdown is typed (the SDK's is not).
            cast(concurrent.futures.Executor, executor).shutdown(wait=False, cancel_futures=True)
        deadline = time.monotonic() + _CLOSE_SUBMISSION_WAIT_SECONDS
        for executor in executors:
            executor._task_submitter.join(max(0.0, deadline - time.monotonic()))
            if executor._task_submitter.is_alive():
                logger.warning("%r is still sending tasks; their results may hold the process at exit", executor)
            task_group_id = executor.task_group_id  # None if it never sent a batch: then it has no watcher
            watcher = _RESULT_WATCHERS.get(task_group_id) if task_group_id is not None else None
            if watcher is not None:
                watcher.shutdown(wait=False, cancel_futures=True)  # type: ignore[no-untyped-call]  # SDK 4.19 is untyped

    async def status(self, credentials: Credentials, endpoint_id: str) -> EndpointStatus:
        """The endpoint's status, at most GLOBUS_COMPUTE_STATUS_CACHE_SECONDS old; one fetch at a time."""
        key = (*credentials.key, endpoint_id)
        now = time.monotonic()
        ttl = settings.GATEWAY.GLOBUS_COMPUTE_STATUS_CACHE_SECONDS
        with self._lock:
            if self._closed:
                return EndpointStatus(None, detail="closed: the gateway is shutting down")
            cached = self._statuses.get(key)
            if cached is None or (cached[1].done() and now - cached[0] >= ttl):
                cached = (now, self._status_threads.submit(self._fetch_status, credentials, endpoint_id, now))
                self._statuses[key] = cached
        try:
            return await asyncio.wait_for(settled(cached[1]), _STATUS_WAIT_SECONDS)
        except TimeoutError:
            return EndpointStatus(None, detail="status check still running")

    def _fetch_status(self, credentials: Credentials, endpoint_id: str, fetched_at: float) -> EndpointStatus:
        try:
            raw = self.client(credentials).get_endpoint_status(endpoint_id)
        except Exception as exc:
            logger.warning("status of Globus Compute endpoint %s unavailable: %s", endpoint_id, type(exc).__name__)
            return EndpointStatus(None, detail=f"status unavailable ({type(exc).__name__})", fetched_at=fetched_at)
        return _parse_status(raw, fetched_at=fetched_at)


def _pace_result_watcher(executor: TaskExecutor) -> None:
    """Have the executor's result watcher hand results over within GLOBUS_COMPUTE_RESULT_POLL_SECONDS.

    The SDK's watcher (one per task group, made by the executor after its first batch) receives each result
    as it arrives but completes the futures only on its next poll, every 0.5 s by default: on average 250 ms
    added to every request. The SDK offers no setting for it (4.19: `_ResultWatcher.poll_period_s`, re-read at
    each poll); it is set here at each submission, so a watcher the SDK replaces gets it too.
    """
    from globus_compute_sdk.sdk.executor import _RESULT_WATCHERS

    task_group_id = getattr(executor, "task_group_id", None)  # None until its first batch is sent
    watcher = _RESULT_WATCHERS.get(task_group_id) if task_group_id is not None else None
    if watcher is not None:
        watcher.poll_period_s = settings.GATEWAY.GLOBUS_COMPUTE_RESULT_POLL_SECONDS


class GlobusComputeBackend(ComputeBackend):
    config_model = GlobusComputeConfig
    config: GlobusComputeConfig

    def __init__(self, config: GlobusComputeConfig, *, relay_hub: RelayHub, endpoints: ComputeEndpoints) -> None:
        super().__init__(config, relay_hub=relay_hub)
        self._endpoints = endpoints
        try:
            self._credentials = credentials_for(config.credentials)
        except MissingCredentials as exc:
            logger.error("globus_compute backend misconfigured: %s", exc)
            raise UpstreamError(
                "This model's cluster connection is misconfigured on the gateway. Please tell the administrators.",
                code=ErrorCode.BACKEND_MISCONFIGURED,
            ) from None
        self._endpoint_id = str(config.endpoint_id)
        self._function_id = str(config.function_id)
        self.label = f"Globus Compute endpoint {self._endpoint_id}"

    async def _submit(self, request: UpstreamRequest, task: dict[str, Any]) -> Future[Any]:
        status = await self._endpoints.status(self._credentials, self._endpoint_id)
        if status.online is False:
            offline = ServiceUnavailable(
                f"The model `{request.body.get('model')}` is offline right now: the cluster's Globus Compute "
                "endpoint that serves it is not connected. Please retry later; if it stays offline, tell the "
                "gateway administrators.",
                retry_after=60,
                code=ErrorCode.ENDPOINT_OFFLINE,
            )
            offline.never_reached = True  # checked before submitting: no task was sent
            raise offline
        if status.workers == 0 and not self._endpoints.recently_ran(self._credentials, self._endpoint_id):
            raise await self._no_workers(request, status)
        try:
            return await self._endpoints.submit(self._credentials, self._endpoint_id, self._function_id, task)
        except Exception as exc:
            logger.warning("submission to %s failed: %s", self.label, type(exc).__name__)
            raise ServiceUnavailable(
                "The gateway cannot reach Globus Compute right now. Please retry shortly.",
                retry_after=10,
                code=ErrorCode.COMPUTE_UNAVAILABLE,
            ) from None

    async def wake(self) -> None:
        """A connected endpoint without workers that can start a block gets one warm-up task (as a request that
        finds it so would send): the cold path's answer then also starts the model. Nothing else is sent."""
        try:
            status = await self._endpoints.status(self._credentials, self._endpoint_id)
            cold = status.online and status.workers == 0 and status.can_start is not False
            if cold and not self._endpoints.recently_ran(self._credentials, self._endpoint_id):
                await self._warm_up()
        except Exception as exc:
            logger.warning("waking %s failed: %s", self.label, type(exc).__name__)

    async def _warm_up(self) -> None:
        """One warm-up task per endpoint in flight at a time (a health task: its block must start to run it)."""
        warm_up = {"mode": "health", "vllm": self.config.vllm.model_dump()}
        await self._endpoints.warm_up(
            self._credentials, self._endpoint_id, self._function_id, warm_up, lifetime=self.config.task_timeout
        )

    async def _no_workers(self, request: UpstreamRequest, status: EndpointStatus) -> ServiceUnavailable:
        """The answer for an endpoint without workers: starting one (after a warm-up task), or none to come."""
        model = request.body.get("model")
        if status.can_start is False:
            refused = ServiceUnavailable(
                f"The model `{model}` has no node running on its cluster, and the cluster's Globus Compute "
                "endpoint does not start one on demand. Please retry later; if it persists, tell the gateway "
                "administrators.",
                retry_after=300,
                code=ErrorCode.ENDPOINT_NO_WORKERS,
            )
        else:
            try:
                await self._warm_up()
            except Exception as exc:
                logger.warning("warm-up submission to %s failed: %s", self.label, type(exc).__name__)
            refused = ServiceUnavailable(
                f"The model `{model}` is starting: its cluster is bringing up a node for it, which takes a few "
                f"minutes. Please retry after {_STARTING_RETRY_AFTER} s.",
                retry_after=_STARTING_RETRY_AFTER,
                code=ErrorCode.ENDPOINT_STARTING,
            )
        refused.never_reached = True  # no task of this request was sent: another endpoint may serve it
        return refused

    def _outcome(self, future: Future[Any]) -> asyncio.Future[Any]:
        outcome = settled(future)
        if settings.GATEWAY.GLOBUS_COMPUTE_LOST_TASK_SECONDS > 0:
            watch = asyncio.ensure_future(self._watch_for_loss(future, outcome))
            outcome.add_done_callback(lambda _: watch.cancel())
        return outcome

    async def _watch_for_loss(self, future: Future[Any], outcome: asyncio.Future[Any]) -> None:
        """Fail `outcome` with `TaskLost` once a status fetched long enough after the service accepted the task
        says the endpoint lost it. Until the SDK has sent it (the future has its task id), the task is not the
        endpoint's to lose: the SDK's pacing or a slow service only delay it."""
        gateway = settings.GATEWAY
        grace = gateway.GLOBUS_COMPUTE_LOST_TASK_SECONDS
        # The status is fetched anew once it is GLOBUS_COMPUTE_STATUS_CACHE_SECONDS old; look at least that often.
        period = min(max(gateway.GLOBUS_COMPUTE_STATUS_CACHE_SECONDS, 0.2), 5.0)
        accepted_at: float | None = None
        while not outcome.done():
            if accepted_at is None and getattr(future, "task_id", None) is not None:
                accepted_at = time.monotonic()  # seen at most `period` late: later, never sooner
            if accepted_at is not None and time.monotonic() - accepted_at >= grace:
                status = await self._endpoints.status(self._credentials, self._endpoint_id)
                lost = task_lost(status) if status.fetched_at - accepted_at >= grace else None
                if lost is not None and not outcome.done():
                    logger.warning("%s lost task %s: %s", self.label, getattr(future, "task_id", "?"), lost.reason)
                    self._endpoints.forget(future)
                    outcome.set_exception(lost)
                    return
            await asyncio.sleep(period)

    def task_failed(self, exc: BaseException) -> GatewayError:
        named = task_exception_error(exc, endpoint=self.label)
        if named is None:
            return super().task_failed(exc)
        logger.warning("compute task on %s failed: %s: %s", self.label, named.code, str(exc)[-500:])
        return named

    async def health(self) -> BackendHealth:
        """Answers when the endpoint is online with workers (or ran a task just now, which proves it has them);
        the facts say more: online, workers, outstanding tasks. A status that could not be fetched is unknown."""
        status = await self._endpoints.status(self._credentials, self._endpoint_id)
        facts = ComputeFacts(status.online, status.workers, status.outstanding_tasks, status.can_start)
        if status.online is None:
            return BackendHealth(ok=False, detail=status.detail, compute=facts, known=False)
        ok = status.online and (
            status.workers != 0 or self._endpoints.recently_ran(self._credentials, self._endpoint_id)
        )
        return BackendHealth(ok=ok, detail=status.detail, compute=facts)
