"""The `local` backend: the `globus_compute` path with a local process pool in place of Globus Compute.

The same compute function, packed with the same serializers and submitted through the same backend code,
runs in worker processes on the gateway's host and calls a vLLM (or the fake model server) from there.
Streams come back through the real relay route. It serves the demo and the end-to-end tests, and suits a
single workstation with a GPU.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from pydantic import Field

from compute_functions import DATA_STRATEGY, inference
from resource_server.adapters.relay import RelayHub
from resource_server.dispatch.base import BackendHealth, UpstreamRequest, model_cards
from resource_server.dispatch.compute import ComputeBackend, ComputeTaskConfig, settled

# compute_serde loads globus-compute-sdk (about 20 MB of a worker's memory): it is imported where
# used, and ahead of time in a thread by the routing table when an endpoint uses this backend (see registry).

_FUNCTION_IDS = uuid.UUID("5d2c7f0e-1c4b-4f7e-9a55-3b8e2f61c0a4")  # namespace of local function ids
_HEALTH_WAIT_SECONDS = 10.0


class LocalConfig(ComputeTaskConfig):
    workers: int = Field(
        default=16, ge=1, le=256, description="Worker processes: how many requests run at once (shared per count)."
    )


def _deliver(result: Future[Any], done: Future[str]) -> None:
    from resource_server.dispatch.compute_serde import result_of

    if (exc := done.exception()) is not None:
        result.set_exception(exc)
        return
    try:
        result.set_result(result_of(done.result()))
    except Exception as exc:
        result.set_exception(exc)


class LocalComputeExecutor:
    """Runs registered functions in worker processes, the way a Globus Compute endpoint runs tasks."""

    def __init__(self, workers: int) -> None:
        self._workers = workers
        self._functions: dict[str, str] = {}
        self._lock = threading.Lock()
        self._pool = self._new_pool()

    def _new_pool(self) -> ProcessPoolExecutor:
        # forkserver: workers start from a clean single-threaded process with the task code preloaded,
        # never as a fork of this multi-threaded server.
        from resource_server.dispatch.compute_serde import exit_with_parent

        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["resource_server.dispatch.compute_serde"])
        return ProcessPoolExecutor(self._workers, mp_context=context, initializer=exit_with_parent)

    def register_function(self, function: Callable[..., Any]) -> str:
        from resource_server.dispatch.compute_serde import function_code

        code = function_code(function)
        function_id = str(uuid.uuid5(_FUNCTION_IDS, code))
        with self._lock:
            self._functions[function_id] = code
        return function_id

    def submit_to_registered_function(
        self, function_id: str, args: tuple[Any, ...] | None = None, kwargs: dict[str, Any] | None = None
    ) -> Future[Any]:
        from resource_server.dispatch.compute_serde import compute_serializer, pack_task, run_task

        task = pack_task(compute_serializer(), self._functions[function_id], args or (), kwargs or {})
        result: Future[Any] = Future()
        with self._lock:
            try:
                running = self._pool.submit(run_task, task, [DATA_STRATEGY])
            except BrokenProcessPool:
                # A worker died (e.g. killed for memory): the pool refuses all work until replaced.
                self._pool = self._new_pool()
                running = self._pool.submit(run_task, task, [DATA_STRATEGY])
        running.add_done_callback(lambda done: _deliver(result, done))
        return result


class LocalExecutors:
    """One pool per worker count for the process, like one endpoint shared by every Endpoint row on it."""

    def __init__(self) -> None:
        self._executors: dict[int, LocalComputeExecutor] = {}
        self._lock = threading.Lock()

    def get(self, workers: int) -> LocalComputeExecutor:
        with self._lock:
            executor = self._executors.get(workers)
            if executor is None:
                executor = self._executors[workers] = LocalComputeExecutor(workers)
            return executor


class LocalBackend(ComputeBackend):
    config_model = LocalConfig
    config: LocalConfig

    def __init__(self, config: LocalConfig, *, relay_hub: RelayHub, executors: LocalExecutors) -> None:
        super().__init__(config, relay_hub=relay_hub)
        self._executor = executors.get(config.workers)
        self._function_id = self._executor.register_function(inference)
        self.label = f"local pool (vLLM at {config.vllm.host}:{config.vllm.port})"

    async def _submit(self, request: UpstreamRequest, task: dict[str, Any]) -> Future[Any]:
        # Submitting may start a worker process, which waits on the fork server: keep it off the loop.
        return await asyncio.to_thread(self._executor.submit_to_registered_function, self._function_id, (task,))

    async def health(self) -> BackendHealth:
        task = {"mode": "health", "vllm": self.config.vllm.model_dump()}
        future = await asyncio.to_thread(self._executor.submit_to_registered_function, self._function_id, (task,))
        try:
            result = await asyncio.wait_for(settled(future), _HEALTH_WAIT_SECONDS)
        except Exception as exc:
            # The pool did not run the check (busy, or a worker died): that says nothing of vLLM.
            return BackendHealth(ok=False, detail=f"health task failed ({type(exc).__name__})", known=False)
        if not isinstance(result, dict):
            return BackendHealth(ok=False, detail="unreadable health result")
        models = ", ".join(str(name) for name in result.get("models") or [])
        return BackendHealth(
            ok=result.get("healthy") is True,
            detail=f"vLLM serves: {models or 'nothing'}",
            models=model_cards({"data": result.get("cards")}),
        )
