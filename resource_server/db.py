"""ORM calls made from async code outside Django's request cycle, on a connection that works.

Django keeps connections usable around its own requests: `close_old_connections` runs on
request_started and request_finished, in the thread that runs the request's ORM calls, and drops a
connection that failed or outlived CONN_MAX_AGE. The lean inference path (api/fast.py), the routing
table's background reloads and the authenticators run ORM calls outside any Django request, through
sync_to_async in one long-lived thread per worker. No signal ever fires there, so before this module a
connection broken by a database restart or a network cut stayed broken in that thread for the life of
the worker: every later query failed at once without trying to reconnect.

`db_run` does Django's housekeeping in that thread before each call, without the per-request probe
(`SELECT 1`) that CONN_HEALTH_CHECKS adds: a healthy connection costs nothing extra. A connection that
went bad while idle (the first query after an outage finds it so) is replaced once and the call retried,
so the first request after the database returns is answered rather than failed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import ParamSpec, TypeVar

from asgiref.sync import sync_to_async
from django.db import InterfaceError, OperationalError, connections

P = ParamSpec("P")
T = TypeVar("T")

# How long a request waits for the database when it has an earlier answer to fall back on (a key checked
# before, the routing table it has): a database that stops answering, rather than refusing connections,
# would otherwise hold such requests until the network gives up, minutes later.
DATABASE_PATIENCE_SECONDS = 2.0


async def db_run(function: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
    """Run `function` (ORM code; it must be safe to run twice) in the worker's ORM thread.

    It runs where Django's async ORM would (sync_to_async, thread-sensitive), on a usable connection.
    Database errors reach the caller as Django's DatabaseError subclasses, as from the ORM itself.
    """
    return await sync_to_async(_run_on_usable_connection)(function, *args, **kwargs)


def _run_on_usable_connection(function: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
    reused = connections_prepare()
    try:
        return function(*args, **kwargs)
    except (OperationalError, InterfaceError):
        # Retried only when a connection kept from an earlier call turned out to be dead: a failure
        # on a fresh connection (database down) or on a live one (a timeout, a lock) is the answer.
        if not reused or not _any_broken():
            raise
        connections.close_all()
        return function(*args, **kwargs)


def connections_prepare() -> bool:
    """Django's close_old_connections for this thread, minus its health probe of a healthy connection.

    Drops each connection that had an error since its last commit and fails a probe, that outlived a
    positive CONN_MAX_AGE, or whose autocommit was left changed. Returns whether a connection is kept.
    CONN_MAX_AGE=0 means "one connection per request" to Django; this thread serves no request, and a
    connection per call would cost a connect on every cache miss, so it keeps its connection then.
    """
    kept = False
    for conn in connections.all(initialized_only=True):
        if conn.connection is None or conn.in_atomic_block:
            # A transaction open on this thread belongs to its caller (a test's, or an atomic block):
            # closing the connection under it would break it. Django's test client skips this housekeeping too.
            kept = kept or conn.connection is not None
            continue
        obsolete = bool(conn.settings_dict["CONN_MAX_AGE"]) and time.monotonic() >= (conn.close_at or float("inf"))
        if conn.errors_occurred or obsolete or conn.get_autocommit() != conn.settings_dict["AUTOCOMMIT"]:
            # Django's own rule; it probes only a connection that had an error, and closes on failure.
            conn.close_if_unusable_or_obsolete()
        kept = kept or conn.connection is not None
    return kept


def _any_broken() -> bool:
    return any(conn.connection is None or not conn.is_usable() for conn in connections.all(initialized_only=True))
