"""The `local` backend's process pool: the real compute function in worker processes that never outlive it."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import time
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

from compute_functions import inference
from resource_server.dispatch.local import LocalComputeExecutor
from tests.servers import ROOT, free_port

# A gateway process in miniature: it runs a task in its pool, then dies the way uvicorn ends a worker
# (re-raising SIGTERM: no atexit, so the pool is never told to stop).
SERVER = """
import os, signal, sys
from compute_functions import inference
from resource_server.dispatch.local import LocalComputeExecutor

executor = LocalComputeExecutor(2)
function_id = executor.register_function(inference)
task = {"mode": "health", "vllm": {"host": "127.0.0.1", "port": int(sys.argv[1]), "connect_timeout": 1}}
print(executor.submit_to_registered_function(function_id, (task,)).result(timeout=60)["status"], flush=True)
os.kill(os.getpid(), signal.SIGTERM)
"""


def health_task(port: int) -> dict[str, Any]:
    return {"mode": "health", "vllm": {"host": "127.0.0.1", "port": port, "connect_timeout": 1}}


def session_members(session: int) -> list[int]:
    """Processes still in the session (the pool's fork server and workers stay in their parent's)."""
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getsid(int(entry.name)) == session:
                    members.append(int(entry.name))
            except ProcessLookupError:
                continue
    return members


def test_pool_workers_end_with_a_gateway_killed_by_a_signal(tmp_path: Path) -> None:
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "gateway.settings", "DATA_DIR": str(tmp_path)}
    server = subprocess.Popen(
        [sys.executable, "-c", SERVER, str(free_port())],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert server.stdout is not None
        first_line = server.stdout.readline()  # not to EOF: leftover workers would hold the pipe open
        server.wait(timeout=60)

        assert first_line.strip() == "503"  # a worker ran the function (nothing listens on that port)
        assert server.returncode == -signal.SIGTERM
        deadline = time.monotonic() + 15
        while session_members(server.pid):
            assert time.monotonic() < deadline, f"left behind: {session_members(server.pid)}"
            time.sleep(0.1)
    finally:
        for pid in session_members(server.pid):  # only if the test failed: do not leak them
            os.kill(pid, signal.SIGKILL)
        if server.stdout is not None:
            server.stdout.close()


def test_a_pool_broken_by_a_dead_worker_is_replaced(model_server: str) -> None:
    port = int(model_server.rsplit(":", 1)[1].split("/")[0])
    executor = LocalComputeExecutor(1)
    function_id = executor.register_function(inference)
    before = set(multiprocessing.active_children())
    assert executor.submit_to_registered_function(function_id, (health_task(port),)).result(timeout=60)["healthy"]
    [worker] = set(multiprocessing.active_children()) - before

    assert worker.pid is not None
    os.kill(worker.pid, signal.SIGKILL)  # e.g. the kernel's OOM killer
    worker.join(timeout=10)
    outcomes = []
    for _ in range(2):
        try:
            result = executor.submit_to_registered_function(function_id, (health_task(port),)).result(timeout=60)
            outcomes.append("healthy" if result["healthy"] else "unhealthy")
        except BrokenProcessPool:
            outcomes.append("broken")  # at most the request that met the dead worker fails

    assert outcomes[-1] == "healthy"
