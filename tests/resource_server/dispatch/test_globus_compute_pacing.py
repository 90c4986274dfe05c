"""The SDK Executor's submission pacing comes from the gateway's settings, not the SDK's defaults."""

from __future__ import annotations

import concurrent.futures
import uuid
from typing import Any, cast

from globus_compute_sdk import Executor

from resource_server.dispatch.globus_compute import ComputeEndpoints, Credentials


def _executor() -> Executor:
    endpoints = ComputeEndpoints()
    executor = endpoints._executor(Credentials(str(uuid.uuid4()), "secret"), str(uuid.uuid4()))
    assert isinstance(executor, Executor)
    return executor


def test_the_executor_paces_submissions_as_the_settings_say(settings: Any) -> None:
    settings.GATEWAY = settings.GATEWAY.model_copy(
        update={
            "GLOBUS_COMPUTE_BATCH_SIZE": 32,
            "GLOBUS_COMPUTE_API_BURST_LIMIT": 6,
            "GLOBUS_COMPUTE_API_BURST_WINDOW_SECONDS": 3,
        }
    )
    executor = _executor()
    try:
        assert (executor.batch_size, executor.api_burst_limit, executor.api_burst_window_s) == (32, 6, 3)
    finally:
        cast(concurrent.futures.Executor, executor).shutdown(wait=False)


def test_by_default_it_paces_less_than_the_sdk(settings: Any) -> None:
    executor = _executor()
    try:
        # The SDK's defaults (4 batches per 16 s) delay every request past the fourth in 16 s by seconds.
        steady_interval = executor.api_burst_window_s / executor.api_burst_limit
        assert steady_interval <= 0.125
        assert executor.batch_size == 128
    finally:
        cast(concurrent.futures.Executor, executor).shutdown(wait=False)
