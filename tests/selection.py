"""Which tests the edit loop runs: every test gets exactly one tier marker, chosen here from where it lives and
what it uses, so test files need no marks of their own.

    unit         in-process and offline: no child process, no socket beyond loopback (`make test-fast`)
    slow         starts no process, but waits seconds of real time (a TTL, a lockout, a socket timeout)
    server       starts processes: the fake model server or Globus, gunicorn, `manage.py`, process pools
    e2e          tests/e2e: the gateway as deployed, driven over HTTP
    integration  tests/integration: PostgreSQL and Redis for real, outages included

A `unit` test runs under a guard: starting a process or reaching a non-loopback address fails it, naming
what it did, so a test that needs a server can never slip into `make test-fast` unnoticed.
"""

from __future__ import annotations

import ipaddress
import multiprocessing.process
import platform
import sys
from collections.abc import Generator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

TIERS = ("unit", "slow", "server", "e2e", "integration")

# Whole directories of one tier.
TIER_OF_DIRECTORY = {"tests/e2e": "e2e", "tests/integration": "integration"}

# Fixtures that start processes. A test that uses one of them (itself or through another fixture) is `server`.
PROCESS_FIXTURES = frozenset(
    {
        "model_server",  # tests/conftest.py: the fake vLLM server, a subprocess for the session
        "seeded",  # rows whose endpoint is served by `model_server`
        "compute_service",  # tests/conftest.py: Globus Compute stood in before the endpoint's real engine
        "fake_url",  # tests/fakes/test_globus_fake.py: the fake Globus Auth as a subprocess
        "vllm",  # tests/compute_functions/test_inference.py: a fake model server subprocess
        "fake_vllm",  # the same server's URL
        "paced_vllm",  # tests/resource_server/dispatch/test_relay_attempts.py: a slow-streaming fake vLLM
        "launcher",  # tests/endpoint_configs: runs the vLLM launch script with bash
        "wheel_files",  # tests/test_wheel.py: builds the wheel with pip
        "fake_scheduler",  # tests/conftest.py: the fake qstat, squeue... (fakes/scheduler), run as processes
    }
)

# Tests that start a process in their own body, or wait on the clock, which no fixture tells. Keyed by file
# name and test name, so an entry survives its file moving to another directory.
TIER_OF_TEST = {
    "test_config.py::test_production_process_refuses_to_boot_on_sqlite": "server",
    "test_config.py::test_production_process_refuses_to_boot_with_debug_on": "server",
    "test_config.py::test_urls_switch_to_postgres_and_redis": "server",
    "test_config.py::test_a_sqlite_url_gets_the_default_databases_options": "server",
    "test_model_server.py::test_module_entry_point_serves_the_given_models_behind_the_api_key": "server",
    "test_inference.py::test_api_key_from_the_named_variable_is_sent": "server",
    "test_local.py::test_pool_workers_end_with_a_gateway_killed_by_a_signal": "server",
    "test_configs.py::test_config_loads_with_the_endpoints_own_loader": "server",
    "test_configs.py::test_launcher_is_valid_bash": "server",
    "test_backend_kinds.py::test_setting_up_django_loads_no_backend_sdk_or_relay": "server",
    "test_bootstrap.py::test_importing_every_product_module_builds_nothing_long_lived_and_starts_no_thread": "server",
    "test_globus_compute_exit.py::test_a_process_holding_a_lost_task_exits_once_its_executors_are_closed": "server",
    "test_selection.py::test_no_test_under_e2e_or_integration_is_unit": "server",
    # Starts a fake model server where the held request's endpoint refused connections.
    "test_cold.py::test_a_request_asked_to_wait_is_held_while_its_endpoint_refuses_connections": "server",
    "test_admin.py::test_pause_ends_after_the_lockout_time": "slow",  # a 1 s lockout
    "test_globus.py::test_globus_errors_are_503_and_not_cached": "slow",  # the SDK's backoff between retries
    # Real Redis (skipped without REDIS_URL, which `make test-fast` unsets), reads that outlast its 5 s timeout.
    "test_relay_redis.py::test_a_read_waits_longer_than_redis_pys_default_socket_timeout": "slow",
    "test_relay_redis.py::test_a_long_read_is_made_of_short_blocking_reads_each_within_the_socket_timeout": "slow",
}

LOOPBACK_NAMES = frozenset({"localhost", "testserver"})


def tier_of(path: str, name: str, fixtures: set[str], marked: set[str]) -> str:
    """The tier of the test `name` in `path` (relative to the project root, with forward slashes)."""
    for directory, tier in TIER_OF_DIRECTORY.items():
        if path.startswith(directory + "/"):
            return tier
    if (chosen := TIER_OF_TEST.get(f"{path.rsplit('/', 1)[-1]}::{name}")) is not None:
        return chosen
    # A `pytestmark` or decorator in the test file comes next: for what the rules here cannot tell.
    if marked:
        return min(marked, key=TIERS.index)
    if fixtures & PROCESS_FIXTURES:
        return "server"
    return "unit"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    root = config.rootpath
    for item in items:
        path = Path(item.path).relative_to(root).as_posix()
        fixtures = set(getattr(item, "fixturenames", ()))
        marked = {mark.name for mark in item.iter_markers()} & set(TIERS)
        tier = tier_of(path, getattr(item, "originalname", item.name), fixtures, marked)
        if tier not in marked:
            item.add_marker(tier)
    # Unit tests first, then each slower tier: the unit guard never sees a process that an earlier server test
    # left running (the session's Globus Compute engine starts blocks from its own threads whenever it likes),
    # and a broken unit test fails the run in seconds. The sort is stable: order within a tier is kept.
    items.sort(key=lambda item: TIERS.index(next(m.name for m in item.iter_markers() if m.name in TIERS)))


class Guard:
    """Records what a unit test must not do: start a process, or open a socket to another host.

    Python's audit hooks see every process start (subprocess, os.fork, os.posix_spawn, os.system, exec) and
    every socket connect, in any thread. multiprocessing's spawn and forkserver starts are not audited, so its
    count of processes made is compared too. Once installed a hook stays for the process, so it checks a flag.
    """

    PROCESS_EVENTS = frozenset({"subprocess.Popen", "os.fork", "os.forkpty", "os.posix_spawn", "os.system"})

    def __init__(self) -> None:
        self.active = False
        self.violations: list[str] = []
        self._processes_made = 0
        self._installed = False
        self._away = False

    def install(self) -> None:
        if not self._installed:
            # The standard library runs `uname -p` once per process for platform.processor() (the openai client
            # sends it); run it now, before any test is watched.
            platform.processor()
            sys.addaudithook(self._audit)
            self._installed = True

    def start(self) -> None:
        self.violations.clear()
        self._processes_made = _multiprocessing_processes_made()
        self.active = True

    def stop(self) -> list[str]:
        self.active = False
        if made := _multiprocessing_processes_made() - self._processes_made:
            self.violations.append(f"made {made} multiprocessing process(es) (a process pool?)")
        return list(self.violations)

    @contextmanager
    def looking_away(self) -> Iterator[None]:
        """For the guard's own tests: what they raise on purpose is not a violation of the test raising it."""
        self._away = True
        made = _multiprocessing_processes_made()
        try:
            yield
        finally:
            self._processes_made += _multiprocessing_processes_made() - made
            self._away = False

    def _audit(self, event: str, args: tuple[Any, ...]) -> None:
        if not self.active or self._away:
            return
        if event in self.PROCESS_EVENTS or event.startswith("os.exec") or event.startswith("os.spawn"):
            self.violations.append(f"started a process ({event} {args[:2]!r})")
        elif event == "socket.connect" and not _is_local(args[1]):
            self.violations.append(f"connected to {args[1]!r}")
        elif event == "socket.getaddrinfo" and not _is_local((args[0], 0)):
            self.violations.append(f"looked up {args[0]!r}")


def _multiprocessing_processes_made() -> int:
    """How many Process objects multiprocessing has made here: the counter that numbers them, read, not stepped."""
    counter = multiprocessing.process._process_counter  # private, but the only trace of a pool already shut down
    return int(repr(counter).removeprefix("count(").removesuffix(")"))


def _is_local(address: Any) -> bool:
    """Whether a socket address stays on this machine (loopback, this host's any-address, a Unix socket path)."""
    if not isinstance(address, tuple):
        return True  # AF_UNIX: a path (str or bytes)
    host = address[0].decode() if isinstance(address[0], bytes) else address[0]
    if not host or host in LOOPBACK_NAMES:
        return True  # None or "": a lookup for binding
    try:
        ip = ipaddress.ip_address(str(host).split("%")[0])
    except ValueError:
        return False  # a host name to resolve
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or ip.is_unspecified or bool(mapped and mapped.is_loopback)


guard = Guard()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Generator[None, None, None]:
    return (yield from _guarded(item, "set-up"))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, None, None]:
    return (yield from _guarded(item, "call"))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> Generator[None, None, None]:
    if nextitem is None:
        # The session's fixtures end with the last test, whatever its tier (e.g. the Globus Compute engine).
        return (yield)
    return (yield from _guarded(item, "teardown"))


def _guarded(item: pytest.Item, phase: str) -> Generator[None, None, None]:
    if item.get_closest_marker("unit") is None:
        return (yield)
    guard.install()
    guard.start()
    try:
        result = yield
    finally:
        violations = guard.stop()
    if violations:
        pytest.fail(
            f"a unit test must stay in-process and offline, but its {phase} " + "; ".join(violations) + ". Give it "
            "a fixture from PROCESS_FIXTURES, or name it in TIER_OF_TEST, in tests/selection.py",
            pytrace=False,
        )
    return result
