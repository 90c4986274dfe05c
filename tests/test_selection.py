"""The tiers tests/selection.py gives: `make test-fast` runs only `unit`, so a test that starts a server must
never be one, and the guard must catch one that does."""

from __future__ import annotations

import multiprocessing
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from tests import selection
from tests.selection import TIERS, Guard, tier_of
from tests.servers import ROOT


@pytest.mark.parametrize(
    ("path", "fixtures", "marked", "tier"),
    [
        ("tests/e2e/test_x.py", set(), set(), "e2e"),
        ("tests/e2e/test_x.py", set(), {"unit"}, "e2e"),
        ("tests/integration/test_x.py", {"transactional_db"}, set(), "integration"),
        ("tests/resource_server/test_x.py", {"seeded", "transactional_db"}, set(), "server"),
        ("tests/resource_server/test_x.py", {"model_server"}, set(), "server"),
        ("tests/resource_server/test_x.py", {"db", "settings"}, set(), "unit"),
        ("tests/resource_server/test_x.py", {"db"}, {"slow"}, "slow"),
        ("tests/resource_server/test_x.py", {"db"}, {"server"}, "server"),
        ("tests/resource_server/test_x.py", {"seeded"}, {"slow"}, "slow"),
        ("tests/resource_server/test_x.py", {"seeded"}, {"unit"}, "unit"),  # wrongly: the guard will fail it
        ("tests/e2e_helpers/test_x.py", set(), set(), "unit"),  # a directory, not a name prefix
    ],
)
def test_tier_comes_from_the_directory_then_the_table_then_the_file_then_the_fixtures(
    path: str, fixtures: set[str], marked: set[str], tier: str
) -> None:
    assert tier_of(path, "test_x", fixtures, marked) == tier


def test_a_test_named_in_the_table_gets_its_tier_in_any_directory_whatever_it_uses() -> None:
    file, name = "test_config.py", "test_production_process_refuses_to_boot_on_sqlite"
    assert selection.TIER_OF_TEST[f"{file}::{name}"] == "server"
    assert tier_of(f"tests/gateway/{file}", name, set(), set()) == "server"
    assert tier_of(f"tests/elsewhere/{file}", name, set(), {"unit"}) == "server"
    assert tier_of(f"tests/gateway/{file}", name + "_renamed", set(), set()) == "unit"  # the guard then holds it


def test_every_test_in_this_session_has_exactly_one_tier(request: pytest.FixtureRequest) -> None:
    for item in request.session.items:
        tiers = {mark.name for mark in item.iter_markers()} & set(TIERS)
        assert len(tiers) == 1, f"{item.nodeid} has tiers {sorted(tiers)}"


def test_the_session_runs_its_tiers_in_order_unit_first(request: pytest.FixtureRequest) -> None:
    order = [
        TIERS.index(next(m.name for m in item.iter_markers() if m.name in TIERS)) for item in request.session.items
    ]
    assert order == sorted(order), "a slower tier's test runs before a faster tier's"


@contextmanager
def watching() -> Iterator[Guard]:
    """A guard of its own, started; the session's guard (which watches this unit test) looks away meanwhile."""
    guard = Guard()
    guard.install()
    guard.start()
    with selection.guard.looking_away():
        yield guard
    guard.stop()


def test_the_guard_sees_a_process_start() -> None:
    with watching() as watched:
        # The audit events that starting a process raises, raised without starting one.
        sys.audit("subprocess.Popen", "/bin/true", ["/bin/true"], None, None)
        sys.audit("os.system", b"true")
        [popen, system] = watched.stop()
    assert popen.startswith("started a process (subprocess.Popen") and "/bin/true" in popen
    assert system.startswith("started a process (os.system")


def test_the_guard_counts_every_multiprocessing_process_made_even_one_never_started() -> None:
    with watching() as watched:
        multiprocessing.get_context("spawn").Process(target=abs, args=(-1,))  # made, never started
        assert watched.stop() == ["made 1 multiprocessing process(es) (a process pool?)"]


def test_the_guard_allows_loopback_and_unix_sockets_but_not_other_hosts() -> None:
    with watching() as watched, socket.socket() as sock:
        for address in (("127.0.0.1", 9), ("::1", 9, 0, 0), ("::ffff:127.0.0.1", 9, 0, 0), "/tmp/gateway.sock"):
            sys.audit("socket.connect", sock, address)
        for host in ("localhost", "127.0.0.1", None):
            sys.audit("socket.getaddrinfo", host, 80, 0, 0, 0)
        assert watched.stop() == []
        watched.start()
        sys.audit("socket.connect", sock, ("192.0.2.10", 443))
        sys.audit("socket.getaddrinfo", "auth.globus.org", 443, 0, 0, 0)
        assert watched.stop() == ["connected to ('192.0.2.10', 443)", "looked up 'auth.globus.org'"]


def test_the_guard_is_quiet_when_stopped() -> None:
    with watching() as watched:
        watched.stop()
        sys.audit("subprocess.Popen", "/bin/true", ["/bin/true"], None, None)
        assert watched.violations == []


def test_no_test_under_e2e_or_integration_is_unit() -> None:
    """Every test there starts servers or needs PostgreSQL and Redis, so `make test-fast` must select none."""
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "unit", "tests/e2e", "tests/integration"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == pytest.ExitCode.NO_TESTS_COLLECTED, result.stdout + result.stderr
    deselected = re.search(r"\((\d+) deselected\)", result.stdout)
    assert deselected is not None and int(deselected.group(1)) > 20, result.stdout
