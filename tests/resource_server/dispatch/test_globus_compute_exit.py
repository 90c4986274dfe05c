"""A gateway process exits even while it holds a task the endpoint lost.

The SDK's exit hook waits for every open future of every executor; a lost task's never completes. The process
is a real child interpreter with the real SDK, over the session's stood-in service and engine.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from fakes.compute_service import RunningCompute
from resource_server.dispatch.globus_compute import ComputeEndpoints, ComputeEndpointsClosed, Credentials
from tests.conftest import COMPUTE_CLIENT_ID, COMPUTE_CLIENT_SECRET
from tests.servers import ROOT

# Submits one task and waits until the service has accepted it (it has a task id: the endpoint's to lose),
# prints that id, closes the executors, and ends: the interpreter's exit is what is under test.
_HOLD_A_LOST_TASK = """
import asyncio, sys, time

import django

django.setup()
from compute_functions import inference
from resource_server.dispatch.globus_compute import ComputeEndpoints, Credentials

client_id, secret, endpoint_id, request_id = sys.argv[1:]
credentials = Credentials(client_id, secret)
endpoints = ComputeEndpoints()
function_id = endpoints.client(credentials).register_function(inference)
future = asyncio.run(endpoints.submit(credentials, endpoint_id, function_id, {"request_id": request_id}))
deadline = time.monotonic() + 30
while getattr(future, "task_id", None) is None:
    if time.monotonic() > deadline:
        sys.exit("the service did not accept the task within 30 s")
    time.sleep(0.05)
print(future.task_id, flush=True)
endpoints.close()
"""


def test_a_process_holding_a_lost_task_exits_once_its_executors_are_closed(
    compute_service: RunningCompute, tmp_path: Path
) -> None:
    endpoint_id = compute_service.service.add_endpoint()
    request_id = uuid.uuid4().hex
    compute_service.service.lose(request_id)  # accepted, never run, never answered
    env = {
        **os.environ,
        **compute_service.environment,
        "DJANGO_SETTINGS_MODULE": "gateway.settings",
        "DATA_DIR": str(tmp_path),
    }
    child = subprocess.Popen(
        [sys.executable, "-c", _HOLD_A_LOST_TASK, COMPUTE_CLIENT_ID, COMPUTE_CLIENT_SECRET, endpoint_id, request_id],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # A hang guard, not a timing: without `close` the SDK's exit hook waits for the lost task forever.
        out, err = child.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        child.kill()
        out, err = child.communicate()
        raise AssertionError(f"the process did not exit within 60 s after closing its executors\n{err}") from None

    assert child.returncode == 0, err
    task = compute_service.service.tasks[out.strip()]
    assert task.request_id == request_id
    assert task.result is None  # it was held open to the end: lost, not answered


async def test_closing_stops_the_executors_and_makes_no_more() -> None:
    endpoints = ComputeEndpoints()
    credentials = Credentials(str(uuid.uuid4()), "secret")
    endpoint_id, function_id = str(uuid.uuid4()), str(uuid.uuid4())
    executor = endpoints._executor(credentials, endpoint_id)

    endpoints.close()

    with pytest.raises(RuntimeError, match="is shutdown"):  # the SDK's own refusal
        executor.submit_to_registered_function(function_id, args=({},))
    # A new executor would hold the process at exit again: a submission is refused, the status unknown.
    with pytest.raises(ComputeEndpointsClosed):
        await endpoints.submit(credentials, endpoint_id, function_id, {})
    assert (await endpoints.status(credentials, endpoint_id)).online is None
