"""The shipped local endpoint config, run by globus-compute-endpoint's real GlobusComputeEngine (LocalProvider).

Its `worker_init` runs verbatim, with $HOME pointing at a stand-in checkout whose `vllm` is the test shim
(fakes/model_server.py behind `vllm serve`): a vLLM that fails to load must end the block before any worker
starts, and the next task must bring up a fresh block that serves it.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped]  # the venv has no types-PyYAML

from compute_functions import inference
from tests.endpoint_configs.test_configs import CONFIG_DIR, LAUNCHER, STUB, stop_launched
from tests.servers import ROOT, free_port

pytestmark = pytest.mark.server  # starts the engine's interchange and the block's worker pool

loader = pytest.importorskip(
    "globus_compute_endpoint.endpoint.config.utils",
    reason="globus-compute-endpoint is a cluster-side package; install the `endpoint` extra",
)


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout:g} s: {what}"
        time.sleep(0.2)


class Site:
    """$HOME as the local config expects it: a checkout, a Python environment whose `vllm` is the shim."""

    def __init__(self, home: Path, port: int) -> None:
        self.home = home
        checkout = home / "REPLACE_ME" / "inference-gateway" / "endpoint_configs"
        (checkout / "local").mkdir(parents=True)
        (checkout / "launch_vllm.sh").symlink_to(LAUNCHER)
        (checkout / "local" / "models.txt").write_text(f"model-a {port}\n")
        bin_dir = home / "REPLACE_ME" / "envs" / "vllm" / "bin"
        bin_dir.mkdir(parents=True)
        (bin_dir / "vllm").write_text(STUB.format(python=sys.executable, root=str(ROOT)))
        (bin_dir / "vllm").chmod(0o755)
        (bin_dir / "activate").write_text(f'export PATH="{bin_dir}:$PATH"\n')
        self.records = home / "records"
        self.control = home / "control"
        self.records.mkdir()
        self.control.mkdir()
        self.logs = home / ".globus_compute" / "local-vllm" / "vllm-logs"


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Site]:
    site = Site(tmp_path / "home", free_port())
    # The block inherits the engine's environment, as on a login node: the endpoint's own commands on PATH.
    monkeypatch.setenv("HOME", str(site.home))
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("STUB_RECORD_DIR", str(site.records))
    monkeypatch.setenv("STUB_CONTROL_DIR", str(site.control))
    yield site
    stop_launched(site.logs)


def local_engine(run_dir: Path) -> Any:
    """The engine of endpoint_configs/local/config.yaml as the endpoint's loader builds it, started."""
    config = yaml.safe_load((CONFIG_DIR / "local" / "config.yaml").read_text())
    engine_config = config["engine"]
    # As on polaris-pbs and slurm: a failed block must not put the engine in a bad state for good.
    engine_config["block_error_handler"] = False
    engine_config["job_status_kwargs"] = {"strategy_period": 0.5}  # a faster poll, the same strategy
    engine_config["max_workers_per_node"] = 1
    engine = loader.load_config_yaml(yaml.safe_dump(config)).engine
    engine.start(endpoint_id=uuid.uuid4(), run_dir=str(run_dir))
    return engine


def health_task(engine: Any, port: int, read_timeout: float = 600) -> Future[Any]:
    """Submit compute_functions.inference in health mode, serialized as the gateway registers and submits it."""
    from globus_compute_common.messagepack import pack
    from globus_compute_common.messagepack.message_types import Task
    from globus_compute_endpoint.engines.base import GCFuture
    from globus_compute_sdk.serialize import ComputeSerializer, JSONData, PureSourceTextInspect

    serde = ComputeSerializer(strategy_code=PureSourceTextInspect(), strategy_data=JSONData())
    request = {"mode": "health", "vllm": {"host": "127.0.0.1", "port": port, "read_timeout": read_timeout}}
    buffers = [serde.serialize(inference), serde.serialize((request,)), serde.serialize({})]
    task_id = uuid.uuid4()
    future = GCFuture(task_id)
    engine.submit(future, pack(Task(task_id=task_id, task_buffer=serde.pack_buffers(buffers))), {})
    return future


def test_a_vllm_that_fails_to_load_ends_the_block_and_the_next_task_gets_a_fresh_one(
    site: Site, tmp_path: Path
) -> None:
    from globus_compute_common.messagepack import unpack
    from globus_compute_sdk.serialize import ComputeSerializer

    port = int((site.home / "REPLACE_ME/inference-gateway/endpoint_configs/local/models.txt").read_text().split()[1])
    (site.control / "fail-start").touch()
    engine = local_engine(tmp_path / "run")
    executor = engine.executor
    try:
        wait_for(lambda: "0" in executor.status_facade and executor.status_facade["0"].terminal, "block 0 ends")

        assert executor.status_facade["0"].exit_code == 1  # worker_init's `exit 1`, before the worker pool
        assert engine.get_connected_managers() == []  # no worker ever answered for a dead model
        assert "stub: the model failed to load" in (site.logs / f"vllm-{port}.log").read_text()
        assert not executor.bad_state_is_set

        (site.control / "fail-start").unlink()  # the next node loads the model
        future = health_task(engine, port)

        result = unpack(future.result(timeout=120))
        health = ComputeSerializer().deserialize(result.data)
        assert health["healthy"] is True, health
        assert health["models"] == ["model-a"]
        assert executor.status_facade["1"].state.name == "RUNNING"  # a second block, started for the task
    finally:
        engine.shutdown()


def test_with_two_blocks_one_that_ends_is_replaced_at_the_next_task(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The walltime overlap needs the engine to bring a second block back while the first still serves: Parsl
    starts blocks only for load, so the cluster configs' `parallelism` must make one task count as load."""
    from globus_compute_common.messagepack import unpack
    from parsl.jobs.states import JobState

    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    polaris_engine = yaml.safe_load((CONFIG_DIR / "polaris-pbs" / "config.yaml").read_text())["engine"]
    polaris = polaris_engine["provider"]
    config = yaml.safe_load((CONFIG_DIR / "local" / "config.yaml").read_text())
    engine_config = config["engine"]
    engine_config["block_error_handler"] = False
    engine_config["job_status_kwargs"] = {**polaris_engine["job_status_kwargs"], "strategy_period": 0.5}
    engine_config["max_workers_per_node"] = 4
    # The interchange learns that a block's workers are gone only from their missing heartbeats: by default
    # after 120 s, and a task it hands them meanwhile is lost (answered as failed once they expire). Beats
    # every second, expired after a few, let the test wait for it (below) in seconds.
    engine_config["heartbeat_period"] = 1
    engine_config["heartbeat_threshold"] = 6
    provider = engine_config["provider"]
    provider.update({key: polaris[key] for key in ("init_blocks", "min_blocks", "max_blocks", "parallelism")})
    provider["worker_init"] = ""  # no vLLM: this is about blocks, the task only has to run somewhere
    engine = loader.load_config_yaml(yaml.safe_dump(config)).engine
    engine.start(endpoint_id=uuid.uuid4(), run_dir=str(tmp_path / "run"))
    executor = engine.executor

    def running() -> set[str]:
        return {block for block, status in executor.status_facade.items() if status.state == JobState.RUNNING}

    def managed_blocks() -> set[str]:
        return {str(manager["block_id"]) for manager in engine.get_connected_managers()}

    try:
        wait_for(lambda: running() == {"0", "1"} and len(engine.get_connected_managers()) == 2, "two blocks serve")
        job = executor.blocks_to_job_id["0"]
        os.killpg(os.getpgid(executor.provider.resources[job]["remote_pid"]), signal.SIGKILL)  # its walltime is up
        wait_for(lambda: executor.status_facade["0"].terminal, "block 0 ends")
        wait_for(lambda: managed_blocks() == {"1"}, "the interchange forgets block 0's workers")

        # Parsl sees load only while a task is outstanding when its strategy runs: like a real request, this one
        # takes seconds (a vLLM that accepts the connection and answers nothing until the read timeout).
        with socket.create_server(("127.0.0.1", 0)) as silent:
            future = health_task(engine, silent.getsockname()[1], read_timeout=5)
            result = unpack(future.result(timeout=120))
            assert not result.is_error, result  # served by block 1...
        wait_for(lambda: running() == {"1", "2"}, "...and the task brought a fresh block for the one that ended")
    finally:
        engine.shutdown()
