"""Compute tasks packed and run the way Globus Compute does it, on both sides of an endpoint.

The gateway registers functions as source text and sends arguments as JSON (see `compute_functions`).
The local backend's worker processes import this module to play the endpoint's part, so it loads no
Django: only the SDK's serializers and the compute functions.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
from collections.abc import Callable
from multiprocessing.connection import wait
from typing import Any

from globus_compute_sdk.serialize import ComputeSerializer

from compute_functions import CODE_STRATEGY, DATA_STRATEGY


def compute_serializer() -> ComputeSerializer:
    """Source text and JSON out; only those accepted back, so a task result can never make us unpickle."""
    return ComputeSerializer(
        strategy_code=CODE_STRATEGY,
        strategy_data=DATA_STRATEGY,
        allowed_deserializer_types=[CODE_STRATEGY, DATA_STRATEGY],
    )


def function_code(function: Callable[..., Any]) -> str:
    """The function as `Client.register_function` uploads it: one packed buffer of serialized code."""
    serializer = compute_serializer()
    return serializer.pack_buffers([serializer.serialize(function)])


def pack_task(serializer: ComputeSerializer, code: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    """What an endpoint receives for one task: the registered code, then the arguments as the submitter
    serialized them."""
    buffers = [*serializer.unpack_buffers(code), serializer.serialize(args), serializer.serialize(kwargs)]
    return serializer.pack_buffers(buffers)


def run_task(task: str, result_serializers: list[str]) -> str:
    """Endpoint side, configured like `endpoint_configs/` (`allowed_serializers`): deserialize with only the
    allowed strategies, run, and serialize the result with the first of the submitter's strategies that works."""
    function, args, kwargs = compute_serializer().unpack_and_deserialize(task)
    return ComputeSerializer.serialize_from_list(function(*args, **kwargs), result_serializers)


def result_of(payload: str) -> Any:
    """Gateway side: the task's result, refused unless it came back as JSON data."""
    return compute_serializer().deserialize(payload)


def exit_with_parent() -> None:
    """Process-pool initializer: end this worker as soon as the process that started it has ended.

    A server ended by a signal (uvicorn re-raises SIGTERM) never tells its pool to stop; its idle workers
    would wait for work forever, and keep the fork server alive with them.
    """
    parent = multiprocessing.parent_process()
    if parent is not None:
        threading.Thread(target=_exit_when_gone, args=(parent.sentinel,), daemon=True).start()


def _exit_when_gone(sentinel: int) -> None:
    wait([sentinel])
    os._exit(0)
