"""What the `globus_compute` and `local` backends share: running `compute_functions.inference` as a task.

A task goes to an executor with the Globus Compute SDK's `Executor` interface (the SDK's own, or a local
process pool). A non-streamed answer is the task's result. A streamed answer comes back through the relay
(`adapters/relay.py`) while the task runs: the function on the node POSTs each batch of SSE events, and
`ComputeStream` hands them on; the task's result then only says how it ended.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from concurrent.futures import Future
from dataclasses import replace
from typing import Annotated, Any, Protocol

import orjson
from django.conf import settings
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from resource_server.adapters.relay import RelayChannel, RelayHub, RelayMessage, relay_url
from resource_server.dispatch.base import BackendHealth, UpstreamRequest, upstream_error
from resource_server.dispatch.fields import EnvVarName
from resource_server.errors import ErrorCode, GatewayError, InvalidRequest, ServiceUnavailable, UpstreamError

logger = logging.getLogger(__name__)

HostName = Annotated[str, StringConstraints(pattern=r"^([A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])$", max_length=253)]


class TaskExecutor(Protocol):
    """The part of `globus_compute_sdk.Executor` the backends use."""

    def submit_to_registered_function(
        self, function_id: str, args: tuple[Any, ...] | None = None, kwargs: dict[str, Any] | None = None
    ) -> Future[Any]: ...


class VllmServer(BaseModel):
    """The vLLM server as the task sees it from the node it runs on (usually beside it on 127.0.0.1)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: HostName = "127.0.0.1"
    port: int = Field(ge=1, le=65535, description="The port given to this model in the endpoint's models.txt.")
    tls: bool = False
    verify_tls: bool = True
    api_key_env: EnvVarName | None = Field(
        default=None, description="Environment variable *on the node* holding vLLM's API key, if it needs one."
    )
    connect_timeout: float = Field(default=5.0, gt=0, le=120)
    read_timeout: float = Field(default=600.0, gt=0, le=3600, description="Longest wait between two bytes.")


class ComputeTaskConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    vllm: VllmServer
    task_timeout: float = Field(
        default=900.0, gt=0, le=86400, description="Longest wait for a non-streamed answer, cold start included."
    )
    first_chunk_timeout: float | None = Field(
        default=None, gt=0, le=86400, description="Longest wait for a stream's first chunk (RELAY_FIRST_CHUNK_SECONDS)."
    )
    idle_timeout: float | None = Field(
        default=None, gt=0, le=3600, description="Longest silence within a stream (RELAY_IDLE_SECONDS)."
    )


# A Globus Compute task's payload is at most 10 MiB. An audio form travels in it base64-encoded (4 bytes for 3),
# beside the rest of the task: this much form, at most, leaves room for that.
TASK_PAYLOAD_BYTES = 10 * 1024 * 1024
TASK_FORM_MAX_BYTES = (TASK_PAYLOAD_BYTES - 256 * 1024) // 4 * 3


def form_too_large() -> InvalidRequest:
    return InvalidRequest(
        f"This model runs through Globus Compute, whose tasks carry at most 10 MiB: audio uploads of up to "
        f"{TASK_FORM_MAX_BYTES / 1024 / 1024:.1f} MiB reach it. Send a shorter or more compressed clip.",
        code=ErrorCode.REQUEST_TOO_LARGE,
    )


async def form_in_task(request: UpstreamRequest) -> UpstreamRequest:
    """A form request as the task carries it: the whole form, base64, in place of the JSON body (refused with
    413 past TASK_FORM_MAX_BYTES, on its declared length before reading it). Other requests are unchanged."""
    form = request.form
    if form is None:
        return request
    if form.declared_length is not None and form.declared_length > TASK_FORM_MAX_BYTES:
        raise form_too_large()
    data = bytearray()
    async with contextlib.aclosing(form.chunks()) as chunks:
        async for chunk in chunks:
            data += chunk
            if len(data) > TASK_FORM_MAX_BYTES:
                raise form_too_large()
    body = {"content_type": form.content_type, "data": base64.b64encode(data).decode("ascii")}
    return replace(request, body=body, form=None)


class TaskCancelled(Exception):
    """The executor dropped the task before it ran (the SDK does so when it shuts an executor down)."""


def settled(future: Future[Any]) -> asyncio.Future[Any]:
    """An asyncio future completed by `future`; giving up on it (a timeout) never cancels `future`.

    Cancelling a Globus Compute future makes the SDK's result watcher fail when the result arrives, and that
    watcher serves every other request on the executor.
    """
    loop = asyncio.get_running_loop()
    waiter: asyncio.Future[Any] = loop.create_future()

    def copy(done: Future[Any]) -> None:
        if waiter.done():  # the awaiting side gave up
            return
        if done.cancelled():
            waiter.set_exception(TaskCancelled("the executor dropped the task"))
        elif (exc := done.exception()) is not None:
            waiter.set_exception(exc)
        else:
            waiter.set_result(done.result())

    def on_done(done: Future[Any]) -> None:
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is waiting any more
            loop.call_soon_threadsafe(copy, done)

    future.add_done_callback(on_done)
    return waiter


# The codes the compute function reports its failures with (`compute_functions.inference` cannot import the
# gateway, so they travel as strings) and the gateway's code for each. `vllm_rejected` is not here: it carries
# vLLM's own refusal, passed on as an upstream 4xx. A code not listed (one a newer function sends) is taken for
# a fault of the cluster's setup, like the listed setup faults.
TASK_ERROR_CODES: dict[str, ErrorCode] = {
    "vllm_unreachable": ErrorCode.UPSTREAM_UNREACHABLE,
    "vllm_unhealthy": ErrorCode.UPSTREAM_UNREACHABLE,
    "vllm_restarting": ErrorCode.UPSTREAM_RESTARTING,
    "vllm_timeout": ErrorCode.UPSTREAM_TIMEOUT,
    "vllm_connection_lost": ErrorCode.UPSTREAM_CONNECTION_FAILED,
    "vllm_stream_broken": ErrorCode.UPSTREAM_CONNECTION_FAILED,
    "relay_failed": ErrorCode.RELAY_FAILED,
    "vllm_api_key_missing": ErrorCode.BACKEND_MISCONFIGURED,
    "invalid_task": ErrorCode.BACKEND_MISCONFIGURED,
}
UNKNOWN_TASK_ERROR = ErrorCode.BACKEND_MISCONFIGURED


def task_error(status: int, task_code: str, message: str, *, server: str, body: object = None) -> GatewayError:
    """What the caller gets when the compute function reports a failure (codes: `compute_functions.inference`)."""
    if task_code == "vllm_rejected":
        # vLLM's own answer (e.g. "prompt too long"): a 4xx stays that 4xx with vLLM's error body, if it came.
        content = orjson.dumps(body if isinstance(body, dict) else {"error": {"message": message}})
        return upstream_error(status, content, model_server=server)
    logger.warning("compute task on %s failed: %s: %s", server, task_code, message[:500])
    code = TASK_ERROR_CODES.get(task_code, UNKNOWN_TASK_ERROR)
    if code is ErrorCode.UPSTREAM_UNREACHABLE:
        unreachable = ServiceUnavailable(
            "The model server on the cluster is not answering; it may still be starting. Please retry shortly.",
            retry_after=30,
            code=code,
        )
        unreachable.never_reached = True  # the function found vLLM down before sending it the request
        return unreachable
    if code is ErrorCode.UPSTREAM_RESTARTING:
        # The function's own words (which attempt of how many); nothing in them comes from vLLM.
        restarting = ServiceUnavailable(f"{message} Please retry shortly.", retry_after=30, code=code)
        restarting.never_reached = True
        return restarting
    if code is ErrorCode.UPSTREAM_TIMEOUT:
        return UpstreamError("The model server on the cluster did not answer in time.", code=code)
    if code is ErrorCode.UPSTREAM_CONNECTION_FAILED:
        return UpstreamError("The connection to the model server on the cluster broke off.", code=code)
    if code is ErrorCode.RELAY_FAILED:
        return UpstreamError("The cluster could not send the stream back to the gateway.", code=code)
    return UpstreamError(
        "This model's cluster setup is misconfigured. Please tell the gateway administrators.",
        code=ErrorCode.BACKEND_MISCONFIGURED,
    )


def _error_of(result: dict[str, Any]) -> tuple[int, str, str, object] | None:
    """Status, code, message and (with `vllm_rejected`) vLLM's error body of a task's failure, if it failed."""
    error = result.get("error")
    if not isinstance(error, dict):
        return None
    status = error.get("status", result.get("status"))
    code, message = str(error.get("code", "")), str(error.get("message", ""))
    return (status if type(status) is int else 502), code, message, error.get("body")


class ComputeBackend(ABC):
    """Runs one task per request through `_submit`; subclasses choose the executor."""

    label = "compute task"

    def __init__(self, config: ComputeTaskConfig, *, relay_hub: RelayHub) -> None:
        self.config = config
        self._relay_hub = relay_hub

    @abstractmethod
    async def _submit(self, request: UpstreamRequest, task: dict[str, Any]) -> Future[Any]:
        """Hand `task` to an executor (after any availability check); the future of its result."""

    def _task(self, request: UpstreamRequest, stream: dict[str, Any] | None = None) -> dict[str, Any]:
        """The function's argument (its shape is documented on `compute_functions.inference`)."""
        task: dict[str, Any] = {
            "mode": "inference",
            "route": request.route.value,
            "body": request.body,
            "request_id": request.request_id,
            "vllm": self.config.vllm.model_dump(),
        }
        if stream is not None:
            task["stream"] = stream
        return task

    def _outcome(self, future: Future[Any]) -> asyncio.Future[Any]:
        """What a request awaits for its task: the task's result (a backend may also fail it sooner)."""
        return settled(future)

    def task_failed(self, exc: BaseException) -> GatewayError:
        logger.warning("compute task on %s raised %s: %s", self.label, type(exc).__name__, str(exc)[:500])
        return UpstreamError(
            "The cluster could not run the request. Please retry; if it persists, tell the administrators.",
            code=ErrorCode.COMPUTE_TASK_FAILED,
        )

    def reply(self, result: object) -> bytes:
        """The JSON body of a task's result, or the error it stands for."""
        if not isinstance(result, dict) or type(result.get("status")) is not int:
            raise self._malformed(result)
        failure = _error_of(result)
        if failure is not None:
            status, code, message, body = failure
            raise task_error(status, code, message, server=self.label, body=body)
        status, body = result["status"], result.get("body")
        if 200 <= status < 300:
            if not isinstance(body, dict):
                raise self._malformed(result)
            return orjson.dumps(body)
        content = body.encode() if isinstance(body, str) else orjson.dumps(body)
        raise upstream_error(status, content, model_server=self.label)

    def _malformed(self, result: object) -> UpstreamError:
        logger.warning("compute task on %s returned an unexpected result: %.300r", self.label, result)
        return UpstreamError(
            "The cluster returned an answer the gateway cannot read.", code=ErrorCode.COMPUTE_BAD_RESULT
        )

    async def submit(self, request: UpstreamRequest) -> bytes:
        request = await form_in_task(request)
        future = await self._submit(request, self._task(request))
        timeout = self.config.task_timeout
        try:
            result = await asyncio.wait_for(self._outcome(future), timeout)
        except TimeoutError:
            logger.warning("compute task for %s on %s timed out after %g s", request.request_id, self.label, timeout)
            raise UpstreamError(
                f"The cluster did not answer within {timeout:g} s. Please retry; a node may have been starting.",
                code=ErrorCode.COMPUTE_TIMEOUT,
            ) from None
        except Exception as exc:
            raise self.task_failed(exc) from None
        return self.reply(result)

    async def open_stream(self, request: UpstreamRequest) -> ComputeStream:
        gateway = settings.GATEWAY
        request = await form_in_task(request)
        channel = await self._relay_hub.open(lifetime=gateway.RELAY_MAX_STREAM_SECONDS)
        try:
            relay = {"relay_url": relay_url(channel.task_id), "token": channel.token}
            future = await self._submit(request, self._task(request, relay))
            stream = ComputeStream(
                channel,
                self._outcome(future),
                self,
                first_chunk=self.config.first_chunk_timeout or gateway.RELAY_FIRST_CHUNK_SECONDS,
                idle=self.config.idle_timeout or gateway.RELAY_IDLE_SECONDS,
                lifetime=gateway.RELAY_MAX_STREAM_SECONDS,
            )
            await stream.start()
        except BaseException:
            await channel.close()  # revoked: the function's next POST gets 403 and it stops vLLM
            raise
        return stream

    @abstractmethod
    async def health(self) -> BackendHealth: ...

    async def wake(self) -> None:
        """A local pool starts its workers as tasks come; a backend with an endpoint to wake says how."""
        return None

    async def aclose(self) -> None:
        """Executors are shared by every Endpoint that uses them, so a replaced backend leaves them running."""
        return None


def _retrieve(finished: asyncio.Future[Any]) -> None:
    # A stream that completes never looks at its task's result; mark it seen so asyncio does not warn.
    if not finished.cancelled():
        finished.exception()


class ComputeStream:
    """A streamed answer arriving through the relay while its task runs."""

    def __init__(
        self,
        channel: RelayChannel,
        finished: asyncio.Future[Any],
        backend: ComputeBackend,
        *,
        first_chunk: float,
        idle: float,
        lifetime: float,
    ) -> None:
        self._channel = channel
        self._finished = finished
        finished.add_done_callback(_retrieve)
        self._backend = backend
        self._first_chunk = first_chunk
        self._idle = idle
        self._lifetime = lifetime
        self._deadline = time.monotonic() + lifetime
        self._seq = 0
        self._ready: list[bytes] = []
        self._ended = False
        # An error relayed after events not yet given out: raised once they are (one read may bring both).
        self._failure: GatewayError | None = None

    async def start(self) -> None:
        """Wait for the first message, so that a refusal (e.g. a prompt too long) is raised before streaming."""
        while not self._ready and not self._ended:
            self._take(await self._receive(self._first_chunk, first=True))

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while True:
            events, self._ready = self._ready, []
            for event in events:
                yield event
            if self._failure is not None:
                raise self._failure
            if self._ended:
                return
            self._take(await self._receive(self._idle, first=False))

    async def aclose(self) -> None:
        await self._channel.close()

    def _take(self, messages: list[RelayMessage]) -> None:
        for message in messages:
            if message.seq < self._seq:
                continue  # a retried POST that had arrived the first time
            if message.seq > self._seq:
                raise UpstreamError("The stream from the cluster lost messages.", code=ErrorCode.RELAY_INCOMPLETE)
            self._seq += 1
            if message.error is not None:
                error = message.error
                failure = task_error(
                    error.status, error.code, error.message, server=self._backend.label, body=error.body
                )
                if not self._ready:
                    raise failure
                # Events came before it in the same read: the client gets them first, then the error.
                self._failure, self._ended = failure, True
                return
            if message.done:
                self._ended = True
                return
            self._ready.extend(message.events)

    async def _receive(self, limit: float, *, first: bool) -> list[RelayMessage]:
        """The next messages; waits until they come, the task ends, or `limit` s pass (which raises)."""
        while True:
            if self._finished.done():
                # The task has ended, and whatever it relayed was accepted before it returned.
                messages = await self._channel.read(0)
                if messages:
                    return messages
                raise self._ended_early()
            remaining = self._deadline - time.monotonic()
            if remaining <= 0:
                raise UpstreamError(
                    f"The stream exceeded the longest the gateway allows ({self._lifetime:g} s).",
                    code=ErrorCode.STREAM_TOO_LONG,
                )
            read = asyncio.ensure_future(self._channel.read(min(limit, remaining)))
            try:
                await asyncio.wait((read, self._finished), return_when=asyncio.FIRST_COMPLETED)
            finally:
                if not read.done():
                    read.cancel()
                    await asyncio.wait((read,))  # a read may finish as it is cancelled: keep its messages
            messages = [] if read.cancelled() else read.result()
            if messages:
                return messages
            if not self._finished.done() and limit < remaining:
                raise self._timed_out(limit, first=first)

    def _timed_out(self, limit: float, *, first: bool) -> UpstreamError:
        if first:
            message = (
                f"The cluster did not start answering within {limit:g} s. The model may be starting on a node "
                "that was just allocated; please retry in a few minutes."
            )
        else:
            message = f"The model server on the cluster sent nothing for {limit:g} s."
        return UpstreamError(message, code=ErrorCode.UPSTREAM_TIMEOUT)

    def _ended_early(self) -> GatewayError:
        try:
            result = self._finished.result()
        except Exception as exc:
            return self._backend.task_failed(exc)
        failure = _error_of(result) if isinstance(result, dict) else None
        if failure is not None:
            status, code, message, body = failure
            return task_error(status, code, message, server=self._backend.label, body=body)
        logger.warning("compute task on %s ended before its stream did: %.300r", self._backend.label, result)
        return UpstreamError(
            "The cluster ended the task before its stream was complete.", code=ErrorCode.RELAY_INCOMPLETE
        )
