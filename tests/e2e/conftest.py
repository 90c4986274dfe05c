"""What the end-to-end modules share: a gateway process on the tests' database, and its usage rows."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from resource_server.models import RequestLog
from tests.servers import gateway_server, server_database_url


@contextmanager
def e2e_gateway(tmp_path_factory: Any, *, workers: int = 1, **env: str) -> Iterator[str]:
    """The gateway as deployed (`workers` gunicorn workers), on the tests' database; `env` adds or overrides
    settings. Yields its URL."""
    defaults = {
        "DATABASE_URL": server_database_url(),
        "DATA_DIR": str(tmp_path_factory.mktemp("gateway")),
        "USAGE_FLUSH_SECONDS": "0.05",
        # Rows are re-created for every test, so the server must not remember them.
        "ROUTING_CACHE_SECONDS": "0",
        "API_KEY_CACHE_SECONDS": "0",
    }
    with gateway_server(defaults | env, workers=workers) as url:
        yield url


def usage_row(timeout: float = 10.0, **lookup: Any) -> RequestLog:
    """The first usage row matching `lookup`, waiting for the gateway's background writer."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        row = RequestLog.objects.filter(**lookup).first()
        if row is not None:
            return row
        time.sleep(0.05)
    raise AssertionError(f"no RequestLog row for {lookup}")


# How long the usage row count must hold still before a test's rows count as written: four of the gateway's
# flush intervals (USAGE_FLUSH_SECONDS, 0.05 s here), read every interval.
SETTLED_SECONDS = 0.2
SETTLE_POLL_SECONDS = 0.05


@pytest.fixture(autouse=True)
def _usage_writes_settled(transactional_db: None) -> Iterator[None]:
    """Let the gateway write a test's last usage rows before the test database is emptied.

    Emptying it (TRUNCATE) while the gateway inserts a row can deadlock in PostgreSQL, which then fails
    the next test's set-up. The gateway writes every 0.05 s here: the row count holding still for
    SETTLED_SECONDS means it is done. (Torn down before `transactional_db`, which it depends on.)
    """
    yield
    deadline = time.monotonic() + 5
    count = RequestLog.objects.count()
    still_since = time.monotonic()
    while time.monotonic() < deadline and time.monotonic() - still_since < SETTLED_SECONDS:
        time.sleep(SETTLE_POLL_SECONDS)
        latest = RequestLog.objects.count()
        if latest != count:
            count, still_since = latest, time.monotonic()
