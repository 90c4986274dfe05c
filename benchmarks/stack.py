"""The processes under test, all on 127.0.0.1: the fake model server, the gateway as deployed, the load generator.

The gateway (gunicorn master and its one uvicorn worker) is pinned to the gateway core and everything else
to the client core, when the machine has two cores to give. Each gets a fresh SQLite database and data
directory in a temporary folder, seeded with the project's own management commands.
"""

from __future__ import annotations

import contextlib
import os
import platform
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import IO, Any

import orjson

from benchmarks import procfs

REPO = Path(__file__).resolve().parent.parent
MODEL = "demo-model"
HPC_MODEL = "demo-model-hpc"  # seed_demo's endpoint of the `local` backend: the compute function and the relay
HPC_WORKERS = 8  # its pool size (seed_demo): tasks that run at once
PACKAGES = (
    "Django",
    "django-ninja",
    "pydantic",
    "gunicorn",
    "uvicorn",
    "uvicorn-worker",
    "uvloop",
    "httptools",
    "h11",
    "httpx",
    "httpcore",
    "sniffio",
    "anyio",
    "orjson",
    "aiohttp",
)


@dataclass(frozen=True, slots=True)
class Cores:
    """Which CPUs the gateway and the client side (fake model server, load generator, harness) run on."""

    gateway: frozenset[int] | None
    client: frozenset[int] | None

    @classmethod
    def detect(cls) -> Cores:
        available = sorted(os.sched_getaffinity(0))
        if len(available) < 2:
            return cls(None, None)  # one core: nothing to separate, and the report says so
        return cls(frozenset(available[:1]), frozenset(available[1:]))

    def describe(self) -> str:
        if self.gateway is None or self.client is None:
            return "not pinned (fewer than 2 cores)"
        return f"gateway on CPU {sorted(self.gateway)}, model server + load generator on CPU {sorted(self.client)}"


def _preexec(cpus: frozenset[int] | None) -> Callable[[], None]:
    def setup() -> None:
        if cpus is not None:
            os.sched_setaffinity(0, cpus)
        # 1024 streams hold 2048 sockets in the gateway: lift the soft limit to the hard one.
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    return setup


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_until_up(url: str, process: subprocess.Popen[bytes], log: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args!r} exited; see {log}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=1) as response:  # noqa: S310 (a loopback http URL we built)
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{url} did not come up within {timeout:.0f} s; see {log}")


@contextmanager
def _process(
    args: list[str],
    *,
    cwd: Path,
    env: dict[str, str],
    cpus: frozenset[int] | None,
    log: Path,
    session: bool = False,
    stop_timeout: float = 30.0,
) -> Iterator[subprocess.Popen[bytes]]:
    """A process writing to `log` (appended: a restarted server keeps one log), stopped on exit.

    `session`: it leads a process group of its own, killed whole on exit, so that whatever it started (a
    gunicorn master's workers and their process pools) goes with it even if it dies first.
    """
    with log.open("ab") as sink:
        process = subprocess.Popen(  # noqa: S603 (our own interpreter and scripts, no shell)
            args,
            cwd=cwd,
            env={**os.environ, **env},
            stdout=sink,
            stderr=subprocess.STDOUT,
            preexec_fn=_preexec(cpus),
            start_new_session=session,
        )
    try:
        yield process
    finally:
        try:
            process.terminate()
            try:
                process.wait(timeout=stop_timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        finally:
            if session:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)


@contextmanager
def redis_server() -> Iterator[str]:
    """A Redis of the harness's own (`redis-server` from PATH) on a free port, keeping nothing on disk, pinned to
    the client core like the model server: the limits' counters then cost the gateway's core only what the
    gateway itself does, as with a Redis on other cores or another host. Yields its URL."""
    cores = Cores.detect()
    port = free_port()
    args = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    with (
        tempfile.TemporaryDirectory(prefix="gateway-bench-redis-") as workdir,
        _process(
            args, cwd=Path(workdir), env={}, cpus=cores.client, log=(log := Path(workdir) / "redis.log")
        ) as process,
    ):
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        break
            except OSError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start; see {log}:\n{log.read_text()[-2000:]}")
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"


def _manage(source: Path, env: dict[str, str], *args: str) -> str:
    """Run `python manage.py ...` of the gateway under test; return its stdout."""
    done = subprocess.run(  # noqa: S603 (our own interpreter and manage.py, no shell)
        [sys.executable, "manage.py", *args],
        cwd=source,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode:
        raise RuntimeError(f"manage.py {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return done.stdout


# Cold-path keys: made with the project's service in one process, since one command per key takes seconds.
_MAKE_KEYS = """
from resource_server.services.api_keys import api_key_create, user_get_or_create_local
user, _ = user_get_or_create_local(username="bench-cold@example.org")
for index in range({count}):
    print(api_key_create(owner=user, name=f"cold-{{index}}")[1])
"""
_DIRECT_ONLY = """
from resource_server.models import Endpoint
Endpoint.objects.exclude(backend="direct").delete()
"""
# The gateway+limits side's user: a limit of every kind the S1/S2 requests meet (concurrency, both rates, and the
# day's and month's budgets), each so high that no request of a run is refused, so every request pays for all
# of them. The budgets are seeded from the daily rollup on their first request, as in production.
_LIMITS_USER = "bench-limits@example.org"
_GENEROUS_LIMIT = """
from resource_server.models import Limit, User
Limit.objects.create(
    user=User.objects.get(username="{user}"),
    concurrent=100_000,
    requests_per_minute=2_000_000_000,
    tokens_per_minute=10**15,
    tokens_per_day=10**15,
    tokens_per_month=10**15,
    note="benchmark: every kind of check, none refuses",
)
"""
# The endpoint must admit as many upstream connections as the benchmark opens streams.
_WIDEN_POOL = """
from resource_server.models import Endpoint
endpoint = Endpoint.objects.get(model="{model}")
endpoint.backend_config = {{**endpoint.backend_config, "max_connections": {connections}}}
endpoint.full_clean()
endpoint.save()
"""


@dataclass
class Stack:
    """Running processes and what the load generator needs to reach and watch them."""

    source: Path
    cores: Cores
    fake_port: int
    gateway_port: int
    fake_pid: int
    gateway_master_pid: int
    gateway_worker_pid: int
    warm_key: str
    cold_keys: list[str]
    workdir: Path
    loadgen: LoadGenerator
    imported_from: str
    direct_only: bool = False
    limits_key: str | None = None  # the gateway+limits side's key (its user has a limit of every kind)
    notes: list[str] = field(default_factory=list)

    def pids(self) -> dict[str, int]:
        return {"gateway": self.gateway_worker_pid, "fake": self.fake_pid}

    def worker_memory_kb(self, which: str = "VmRSS") -> int:
        return procfs.memory_kb(self.gateway_worker_pid, which)

    def move_compute_workers_off_the_gateway_core(self) -> int:
        """Pin the worker's child processes (the `local` backend's pool, which stands in for a cluster
        node, and its forkserver, whose later children inherit this) to the client core; how many."""
        moved = 0
        pending = procfs.children(self.gateway_worker_pid)
        while pending:
            pid = pending.pop()
            pending += procfs.children(pid)
            if self.cores.client is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.sched_setaffinity(pid, self.cores.client)
                    moved += 1
        return moved


class LoadGenerator:
    """The load generator process: one JSON job in, one JSON result out."""

    def __init__(self, process: subprocess.Popen[bytes]) -> None:
        self._process = process
        assert process.stdin is not None and process.stdout is not None
        self._stdin: IO[bytes] = process.stdin
        self._stdout: IO[bytes] = process.stdout

    @property
    def pid(self) -> int:
        return self._process.pid

    def run(self, job: dict[str, Any]) -> dict[str, Any]:
        self._stdin.write(orjson.dumps(job) + b"\n")
        self._stdin.flush()
        line = self._stdout.readline()
        if not line:
            raise RuntimeError("the load generator exited")
        result: dict[str, Any] = orjson.loads(line)
        if "failed" in result:
            raise RuntimeError(f"load generator: {result['failed']}")
        return result


@contextmanager
def started(
    source: Path,
    *,
    cold_keys: int,
    max_streams: int,
    gateway_env: dict[str, str],
    direct_only: bool = False,
    limits: bool = False,
) -> Iterator[Stack]:
    """Seed a fresh database, start the three processes, and stop them all on exit.

    The demo's seed registers a compute endpoint beside the direct one; the scenarios use only the direct
    one, but its registration makes the worker load globus-compute-sdk. `direct_only` drops it, to measure
    a gateway that serves direct endpoints only. `limits` adds a second key, whose user has a limit of every
    kind (`_GENEROUS_LIMIT`); the limits are counted in Redis when `gateway_env` sets REDIS_URL, else in the
    gateway's database.
    """
    cores = Cores.detect()
    if cores.client is not None:
        os.sched_setaffinity(0, cores.client)  # the harness itself stays off the gateway's core
    with ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="gateway-bench-")))
        fake_port, gateway_port = free_port(), free_port()
        # One worker, as the targets are per core; the embedded default database, whatever the caller's env says.
        env = {"DATA_DIR": str(workdir / "data"), "DATABASE_URL": "", "REDIS_URL": "", "GATEWAY_WORKERS": "1"}
        env["RELAY_PUBLIC_URL"] = f"http://127.0.0.1:{gateway_port}"  # where the compute function posts events
        env |= gateway_env
        # The gateway must import the tree under test, not whatever the venv's editable install points at.
        imported_from = _manage(
            source, env, "shell", "--no-imports", "-c", "import resource_server; print(resource_server.__file__)"
        ).strip()
        _manage(source, env, "migrate", "--verbosity", "0")
        _manage(source, env, "seed_demo", "--model-url", f"http://127.0.0.1:{fake_port}/v1", "--model", MODEL)
        _manage(
            source,
            env,
            "shell",
            "--no-imports",
            "-c",
            _WIDEN_POOL.format(model=MODEL, connections=max(256, 2 * max_streams)),
        )
        if direct_only:
            _manage(source, env, "shell", "--no-imports", "-c", _DIRECT_ONLY)
        warm_key = _manage(source, env, "create_api_key", "--user", "bench@example.org", "--name", "bench").strip()
        limits_key = None
        if limits:
            limits_key = _manage(source, env, "create_api_key", "--user", _LIMITS_USER, "--name", "bench").strip()
            _manage(source, env, "shell", "--no-imports", "-c", _GENEROUS_LIMIT.format(user=_LIMITS_USER))
        cold = (
            _manage(source, env, "shell", "--no-imports", "-c", _MAKE_KEYS.format(count=cold_keys)).split()
            if cold_keys
            else []
        )

        fake_log = workdir / "fake.log"
        fake = stack.enter_context(
            _process(
                [
                    sys.executable,
                    "-m",
                    "fakes.model_server",
                    "--port",
                    str(fake_port),
                    "--model",
                    MODEL,
                    "--model",
                    HPC_MODEL,  # the compute function asks vLLM for the model by the endpoint's name
                ],
                cwd=REPO,  # the fake is the harness's instrument: this checkout's, whatever tree is measured
                env={},
                cpus=cores.client,
                log=fake_log,
            )
        )
        _wait_until_up(f"http://127.0.0.1:{fake_port}/health", fake, fake_log)

        gateway_log = workdir / "gateway.log"
        gunicorn = str(Path(sys.executable).with_name("gunicorn"))
        master = stack.enter_context(
            _process(
                [
                    gunicorn,
                    "-c",
                    "deploy/gunicorn.conf.py",
                    "--chdir",
                    str(source),
                    "--bind",
                    f"127.0.0.1:{gateway_port}",
                ],
                cwd=source,
                env=env,
                cpus=cores.gateway,
                log=gateway_log,
            )
        )
        _wait_until_up(f"http://127.0.0.1:{gateway_port}/resource_server/health", master, gateway_log)
        [worker] = procfs.children(master.pid)

        loadgen_process = stack.enter_context(_loadgen_process(cores.client))
        yield Stack(
            source=source,
            cores=cores,
            fake_port=fake_port,
            gateway_port=gateway_port,
            fake_pid=fake.pid,
            gateway_master_pid=master.pid,
            gateway_worker_pid=worker,
            warm_key=warm_key,
            cold_keys=cold,
            workdir=workdir,
            loadgen=LoadGenerator(loadgen_process),
            imported_from=imported_from,
            direct_only=direct_only,
            limits_key=limits_key,
        )


@contextmanager
def _loadgen_process(cpus: frozenset[int] | None) -> Iterator[subprocess.Popen[bytes]]:
    process = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.loadgen"],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        preexec_fn=_preexec(cpus),
    )
    try:
        yield process
    finally:
        assert process.stdin is not None
        process.stdin.close()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def machine() -> dict[str, Any]:
    """The machine and software a result was measured on."""
    model = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.partition(":")[2].strip()
            break
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "load_average": os.getloadavg(),
        "packages": versions,
    }


def source_revision(source: Path) -> str:
    """The commit of the gateway under test, marked dirty when its tree has changes."""
    try:
        head = subprocess.run(  # noqa: S603 (read-only git query, no shell)
            ["git", "-C", str(source), "rev-parse", "--short", "HEAD"],  # noqa: S607 (git from PATH)
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(  # noqa: S603 (read-only git query, no shell)
            ["git", "-C", str(source), "status", "--porcelain", "--untracked-files=no"],  # noqa: S607 (git from PATH)
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{head}{'+changes' if dirty else ''}"
