"""Endpoint configs load with globus-compute-endpoint's own loader; launch_vllm.sh starts and waits for servers."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import suppress
from pathlib import Path
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped]  # the venv has no types-PyYAML

from compute_functions import CODE_STRATEGY, DATA_STRATEGY, inference
from tests.servers import ROOT, free_port

CONFIG_DIR = ROOT / "endpoint_configs"
LAUNCHER = CONFIG_DIR / "launch_vllm.sh"
PROVIDERS = {
    "polaris-pbs": "PBSProProvider",
    "polaris-pbs-multinode": "PBSProProvider",
    "slurm": "SlurmProvider",
    "local": "LocalProvider",
}
# The sites behind a batch scheduler: their blocks end at a walltime and may fail on a node.
CLUSTER_SITES = sorted(site for site, provider in PROVIDERS.items() if provider != "LocalProvider")
POLARIS_SITES = sorted(site for site in PROVIDERS if site.startswith("polaris"))


def config_text(site: str) -> str:
    return (CONFIG_DIR / site / "config.yaml").read_text()


def config_data(site: str) -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load(config_text(site))
    return config


def seconds(walltime: str) -> int:
    hours, minutes, secs = (int(part) for part in walltime.split(":"))
    return hours * 3600 + minutes * 60 + secs


def test_there_is_a_config_for_each_site() -> None:
    assert {path.parent.name for path in CONFIG_DIR.glob("*/config.yaml")} == PROVIDERS.keys()


@pytest.mark.parametrize("site", sorted(PROVIDERS))
def test_config_accepts_only_the_gateway_function_and_serializers(site: str) -> None:
    config = yaml.safe_load(config_text(site))

    assert config["engine"]["allowed_serializers"] == [CODE_STRATEGY, DATA_STRATEGY]
    assert config["allowed_functions"]
    assert config["idle_heartbeats_soft"] == 0  # never shut down for idleness


@pytest.mark.parametrize("site", sorted(PROVIDERS))
def test_worker_init_launches_the_models_file_shipped_for_the_site(site: str) -> None:
    worker_init = yaml.safe_load(config_text(site))["engine"]["provider"]["worker_init"]

    assert "endpoint_configs/launch_vllm.sh" in worker_init
    assert re.findall(r"endpoint_configs/([\w-]+/models\.txt)", worker_init) == [f"{site}/models.txt"]
    assert (CONFIG_DIR / site / "models.txt").is_file()


@pytest.mark.parametrize("site", sorted(PROVIDERS))
def test_worker_init_ends_the_block_when_vllm_does_not_serve(site: str) -> None:
    worker_init = config_data(site)["engine"]["provider"]["worker_init"]
    launch = worker_init[worker_init.index('bash "$GATEWAY_DIR/endpoint_configs/launch_vllm.sh"') :]

    # A failing line in worker_init does not stop the job script: only `exit` keeps the workers from starting.
    assert launch.rstrip().endswith("|| exit 1")
    assert " -o $$ " in launch  # the supervisors watch this job, and end it when vLLM is beyond restarting
    assert re.search(r"^export VLLM_LOG_DIR=\S+$", worker_init, re.MULTILINE)  # where the function reads vLLM's state


@pytest.mark.parametrize("site", sorted(PROVIDERS))
def test_every_config_keeps_retries_off_and_says_why(site: str) -> None:
    lines = config_text(site).splitlines()
    settings = "\n".join(line for line in lines if not line.lstrip().startswith("#"))
    comments = " ".join(line.lstrip().lstrip("#").strip() for line in lines if line.lstrip().startswith("#"))

    assert "max_retries_on_system_failure" not in settings  # 0, the engine's default
    assert "Retries stay off" in comments
    assert "keeps one attempt per streamed task" in comments  # why a retry cannot splice two answers
    assert "Do not set max_retries_on_system_failure" in comments


@pytest.mark.parametrize("site", CLUSTER_SITES)
def test_a_failed_block_does_not_stop_a_cluster_endpoint(site: str) -> None:
    assert config_data(site)["engine"]["block_error_handler"] is False


@pytest.mark.parametrize("site", CLUSTER_SITES)
def test_cluster_blocks_overlap_their_walltimes(site: str) -> None:
    engine = config_data(site)["engine"]
    provider = engine["provider"]
    walltime = seconds(provider["walltime"])

    assert provider["init_blocks"] == provider["min_blocks"] == provider["max_blocks"] == 2
    # One outstanding task must count as load for a missing block (see test_engine_blocks.py).
    assert provider["parallelism"] > engine["max_workers_per_node"] * provider["nodes_per_block"]
    assert f" -w {walltime} -s " in provider["worker_init"]  # the blocks stagger on the walltime they have


@pytest.mark.parametrize("site", POLARIS_SITES)
def test_polaris_pins_the_interface_the_broker_port_and_the_documented_cpus(site: str) -> None:
    config = config_data(site)

    assert config["amqp_port"] == 443
    assert config["engine"]["address"] == {"type": "address_by_interface", "ifname": "bond0"}
    assert config["engine"]["provider"]["cpus_per_node"] == 32
    assert "pbsnodes" in config_text(site)  # how to check what the nodes offer


def test_the_multinode_template_spreads_one_model_over_every_gpu_of_the_block() -> None:
    provider = config_data("polaris-pbs-multinode")["engine"]["provider"]
    models = [
        line.split()
        for line in (CONFIG_DIR / "polaris-pbs-multinode" / "models.txt").read_text().splitlines()
        if line and not line.startswith("#")
    ]

    assert len(models) == 1
    args = models[0]
    tensor = int(args[args.index("--tensor-parallel-size") + 1])
    pipeline = int(args[args.index("--pipeline-parallel-size") + 1])
    assert args[args.index("--distributed-executor-backend") + 1] == "ray"
    assert provider["nodes_per_block"] == pipeline > 1
    assert tensor * pipeline == 4 * provider["nodes_per_block"]  # Polaris: 4 GPUs a node
    assert "ray start --head" in provider["worker_init"]
    assert provider["launcher"] == {"type": "SimpleLauncher"}  # one worker pool, beside vLLM's API server


@pytest.mark.parametrize("site", sorted(PROVIDERS))
def test_config_loads_with_the_endpoints_own_loader(site: str) -> None:
    loader = pytest.importorskip(
        "globus_compute_endpoint.endpoint.config.utils",
        reason="globus-compute-endpoint is a cluster-side package; install the `endpoint` extra to check configs",
    )
    # The loader resolves the interface here and now; bond0 exists on Polaris's login nodes only.
    text = config_text(site).replace("ifname: bond0", "ifname: lo")

    config = loader.load_config_yaml(text)

    engine = config.engine
    try:
        assert type(config).__name__ == "UserEndpointConfig"
        assert type(engine).__name__ == "GlobusComputeEngine"
        assert type(engine.executor.provider).__name__ == PROVIDERS[site]
        assert engine.executor.provider.min_blocks >= 1  # a node stays hot with the models loaded
        assert engine.max_retries_on_system_failure == 0
        if site in CLUSTER_SITES:
            assert engine.executor.block_error_handler.__name__ == "noop_error_handler"
        if site in POLARIS_SITES:
            assert config.amqp_port == 443
            assert engine.executor.provider.cpus_per_node == 32
        assert {strategy.__name__ for strategy in engine.serde.allowed_deserializer_types} == {
            CODE_STRATEGY.rsplit(".", 1)[1],
            DATA_STRATEGY.rsplit(".", 1)[1],
        }
    finally:
        engine.shutdown()


# --- launch_vllm.sh ----------------------------------------------------------------------------

# Stands in for `vllm serve MODEL --host H --port P [args]`: records how it was called, then serves the fake
# model server (fakes/model_server.py). `--stub-crash` or a `fail-start` file in $STUB_CONTROL_DIR makes it
# fail to load; `--stub-delay S` makes it load for S seconds. Killing it is vLLM dying.
STUB = """#!{python}
import json, os, sys, time

sys.path.insert(0, {root!r})
args = sys.argv[1:]
port = int(args[args.index("--port") + 1])
record = {{"argv": args, "cuda": os.environ.get("CUDA_VISIBLE_DEVICES")}}
with open(os.path.join(os.environ["STUB_RECORD_DIR"], f"{{port}}.json"), "w") as out:
    json.dump(record, out)
if "--stub-crash" in args or os.path.exists(os.path.join(os.environ["STUB_CONTROL_DIR"], "fail-start")):
    sys.exit("stub: the model failed to load")
if "--stub-delay" in args:
    time.sleep(float(args[args.index("--stub-delay") + 1]))

from fakes.model_server import main

main(["--host", args[args.index("--host") + 1], "--port", str(port), "--model", args[1]])
"""


class Launcher:
    def __init__(self, tmp_path: Path) -> None:
        self.logs = tmp_path / "logs"
        self.records = tmp_path / "records"
        self.records.mkdir()
        self.control = tmp_path / "control"
        self.control.mkdir()
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        stub = bin_dir / "vllm"
        stub.write_text(STUB.format(python=sys.executable, root=str(ROOT)))
        stub.chmod(0o755)
        path = f"{bin_dir}{os.pathsep}{os.environ['PATH']}"
        self.env = {
            **os.environ,
            "PATH": path,
            "STUB_RECORD_DIR": str(self.records),
            "STUB_CONTROL_DIR": str(self.control),
        }

    def run(self, *args: str, timeout: float = 5) -> subprocess.CompletedProcess[str]:
        options = ["-l", str(self.logs), "-t", str(timeout), "-i", "0.1", *args]
        return subprocess.run(
            ["bash", str(LAUNCHER), *options], env=self.env, capture_output=True, text=True, timeout=30
        )

    def call(self, port: int) -> dict[str, Any]:
        record: dict[str, Any] = json.loads((self.records / f"{port}.json").read_text())
        return record

    def pid(self, port: int) -> int:
        return int((self.logs / f"vllm-{port}.pid").read_text())

    def state(self, port: int) -> dict[str, Any]:
        state: dict[str, Any] = json.loads((self.logs / f"vllm-{port}.state").read_text())
        return state

    def serving(self, port: int) -> bool:
        return (self.logs / f"vllm-{port}.state").is_file() and self.state(port)["state"] == "serving"

    def stop_all(self) -> None:
        stop_launched(self.logs)


def stop_launched(log_dir: Path) -> None:
    """Stop what launch_vllm.sh started: supervisors first, or they would restart the servers stopped after them."""
    for pattern in ("*.supervisor.pid", "vllm-*[0-9].pid"):
        for pid_file in log_dir.glob(pattern):
            with suppress(ProcessLookupError, ValueError):
                os.kill(int(pid_file.read_text()), signal.SIGTERM)


@pytest.fixture
def launcher(tmp_path: Path) -> Iterator[Launcher]:
    launcher = Launcher(tmp_path)
    yield launcher
    launcher.stop_all()


def healthy(port: int) -> bool:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
        return bool(response.status == 200)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def eventually(condition: Callable[[], bool], timeout: float = 30) -> bool:
    """Whether `condition` holds within `timeout` s (a generous bound, not a timing assertion)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def test_launcher_is_valid_bash() -> None:
    assert subprocess.run(["bash", "-n", str(LAUNCHER)], capture_output=True).returncode == 0


def test_starts_each_model_on_its_port_and_returns_once_all_are_healthy(launcher: Launcher, tmp_path: Path) -> None:
    slow, quick = free_port(), free_port()
    models = tmp_path / "models.txt"
    models.write_text(
        f"# comment line\n\nCUDA_VISIBLE_DEVICES=0,1 org/model-a {slow} --tensor-parallel-size 2 --stub-delay 0.5\n"
    )

    result = launcher.run("-f", str(models), "-m", f"model-b {quick}")

    assert result.returncode == 0, result.stderr
    assert healthy(slow)  # no retry: the script waited for the slow one
    assert healthy(quick)
    vllm_args = ["--tensor-parallel-size", "2", "--stub-delay", "0.5"]
    assert launcher.call(slow) == {
        "argv": ["serve", "org/model-a", "--host", "127.0.0.1", "--port", str(slow), *vllm_args],
        "cuda": "0,1",
    }
    assert launcher.call(quick)["cuda"] is None
    assert alive(launcher.pid(slow))
    assert alive(launcher.pid(quick))
    assert (launcher.logs / f"vllm-{slow}.log").is_file()


def test_rerun_on_a_warm_node_leaves_the_running_server_alone(launcher: Launcher) -> None:
    port = free_port()
    assert launcher.run("-m", f"model-a {port}").returncode == 0
    first_pid = launcher.pid(port)

    result = launcher.run("-m", f"model-a {port}")

    assert result.returncode == 0
    assert "already serves" in result.stdout
    assert launcher.pid(port) == first_pid
    assert alive(first_pid)


def test_a_server_that_exits_fails_fast_and_shows_its_log(launcher: Launcher) -> None:
    started = time.monotonic()

    result = launcher.run("-m", f"broken-model {free_port()} --stub-crash", timeout=30)

    assert result.returncode == 1
    assert time.monotonic() - started < 10
    assert "exited" in result.stderr
    assert "stub: the model failed to load" in result.stderr


def test_a_server_not_healthy_in_time_fails_and_names_the_port(launcher: Launcher) -> None:
    port = free_port()

    result = launcher.run("-m", f"slow-model {port} --stub-delay 30", timeout=1)

    assert result.returncode == 1
    assert f"port {port} not healthy after 1s" in result.stderr
    # The block is about to end: nothing half-loaded may keep holding the GPUs.
    assert eventually(lambda: not alive(launcher.pid(port)))


def test_a_spec_without_a_port_is_a_usage_error(launcher: Launcher) -> None:
    result = launcher.run("-m", "model-without-port")

    assert result.returncode == 2
    assert "bad spec" in result.stderr


def test_a_failed_start_stops_the_servers_that_did_start(launcher: Launcher) -> None:
    broken, fine = free_port(), free_port()

    result = launcher.run("-m", f"model-a {fine}", "-m", f"broken-model {broken} --stub-crash", timeout=30)

    assert result.returncode == 1
    assert launcher.state(broken)["state"] == "failed"
    assert eventually(lambda: not alive(launcher.pid(fine)))


def test_a_server_that_dies_after_serving_is_restarted(launcher: Launcher) -> None:
    port = free_port()
    assert launcher.run("-m", f"model-a {port}", "-r", "2", "-b", "1").returncode == 0
    first = launcher.pid(port)
    assert launcher.state(port) == {"state": "serving", "attempt": 0, "max_attempts": 2, "detail": "healthy"}

    os.kill(first, signal.SIGKILL)  # vLLM dies

    assert eventually(lambda: launcher.state(port)["state"] == "serving" and launcher.pid(port) != first)
    assert launcher.state(port)["attempt"] == 1
    assert healthy(port)
    assert "restart 1 of 2 in 1s" in (launcher.logs / f"vllm-{port}.log").read_text()


def test_while_vllm_restarts_the_compute_function_says_so(launcher: Launcher, monkeypatch: pytest.MonkeyPatch) -> None:
    port = free_port()
    assert launcher.run("-m", f"model-a {port}", "-r", "5", "-b", "120").returncode == 0
    os.kill(launcher.pid(port), signal.SIGKILL)
    assert eventually(lambda: launcher.state(port)["state"] == "restarting")
    monkeypatch.setenv("VLLM_LOG_DIR", str(launcher.logs))

    result = inference({"route": "completions", "body": {"prompt": "hi"}, "vllm": {"host": "127.0.0.1", "port": port}})

    assert result["status"] == 503
    assert result["error"]["code"] == "vllm_restarting"
    assert "restarting (attempt 1 of 5)" in result["error"]["message"]


def start_block(launcher: Launcher, port: int, *options: str) -> subprocess.Popen[bytes]:
    """A block's job shell in its own process group, as a scheduler runs it: worker_init (the launcher, told
    this shell's PID), then the worker pool in the foreground (here a sleep)."""
    script = 'bash "$0" -l "$1" -i 0.1 -o $$ "${@:2}" || exit 1; sleep 600'
    return subprocess.Popen(
        ["bash", "-c", script, LAUNCHER, str(launcher.logs), *options, "-m", f"model-a {port}"],
        env=launcher.env,
        start_new_session=True,
    )


def end_block(block: subprocess.Popen[bytes]) -> None:
    with suppress(ProcessLookupError):
        os.killpg(block.pid, signal.SIGKILL)
    block.wait(timeout=30)


def test_out_of_restarts_the_block_is_ended(launcher: Launcher) -> None:
    port = free_port()
    block = start_block(launcher, port, "-r", "1", "-b", "0")
    try:
        assert eventually(lambda: launcher.serving(port))
        (launcher.control / "fail-start").touch()  # the restart will fail to load, as after a GPU fault

        os.kill(launcher.pid(port), signal.SIGKILL)

        assert block.wait(timeout=60) != 0  # the worker pool was stopped, so the job (the block) ended
        assert launcher.state(port) == {
            "state": "failed",
            "attempt": 1,
            "max_attempts": 1,
            "detail": "exited with status 1; no restarts left",
        }
    finally:
        end_block(block)


def test_supervisors_stop_vllm_when_the_block_ends(launcher: Launcher) -> None:
    port = free_port()
    block = start_block(launcher, port)
    assert eventually(lambda: launcher.serving(port))
    server = launcher.pid(port)

    block.kill()  # the scheduler ends the job shell (walltime)
    block.wait(timeout=30)

    assert eventually(lambda: not alive(server))
    assert launcher.state(port)["state"] == "serving"  # stopped on purpose, not a failure to restart


def test_two_blocks_are_staggered_by_half_a_walltime(launcher: Launcher, tmp_path: Path) -> None:
    shared = tmp_path / "blocks"
    walltime = 20
    stagger = ("-w", str(walltime), "-s", str(shared))
    blocks = []
    try:
        blocks.append(start_block(launcher, free_port(), *stagger))
        assert eventually(lambda: len(list(shared.glob("*.end"))) == 1)
        first_end = int(next(shared.glob("*.end")).read_text())

        blocks.append(start_block(launcher, free_port(), *stagger))  # both start together, as with init_blocks 2

        assert eventually(lambda: len(list(shared.glob("*.end"))) == 2)
        assert sorted(int(path.read_text()) for path in shared.glob("*.end")) == [first_end - walltime // 2, first_end]
        assert blocks[1].wait(timeout=walltime) != 0  # it ended itself half a walltime early...
        assert blocks[0].poll() is None  # ...while the other one serves
        assert eventually(lambda: len(list(shared.glob("*.end"))) == 1)  # an ended block leaves no plan behind

        blocks.append(start_block(launcher, free_port(), *stagger))  # its successor

        assert eventually(lambda: len(list(shared.glob("*.end"))) == 2)
        assert sorted(int(path.read_text()) for path in shared.glob("*.end")) == [first_end, first_end + walltime // 2]
    finally:
        for block in blocks:
            end_block(block)
