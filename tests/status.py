"""Endpoint states a test sets, at the route stage's seam (`RouteStatus`).

The states past live and offline (starting, queued, maintenance, with their ETA and queue position) come from
the cluster's batch scheduler and Globus Compute, which cannot run here; the status board derives them. This
stands in for the board where a test needs such a state: a test sets it, and a change wakes the requests held
for it, as the board's changes do. Endpoints it was told nothing of are unknown, as the board's are.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections import Counter
from typing import Any

from resource_server.bootstrap import Runtime, runtime_install
from resource_server.status.base import UNPROBED, EndpointStatus, State


class ScriptedStatus:
    def __init__(self) -> None:
        self._statuses: dict[int, EndpointStatus] = {}
        self._waiters: set[asyncio.Future[None]] = set()
        self.turned_away_counts: Counter[int] = Counter()
        self._waiting_changed = asyncio.Event()

    def status(self, endpoint_id: int) -> EndpointStatus:
        return self._statuses.get(endpoint_id, UNPROBED)

    def set(self, endpoint_id: int, state: State, **fields: Any) -> None:
        """The endpoint enters `state` now; requests waiting for a change wake up."""
        self._statuses[endpoint_id] = EndpointStatus(state, since=time.time(), **fields)
        waiters, self._waiters = self._waiters, set()
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def wait_for_change(self, timeout: float) -> bool:  # noqa: ASYNC109 - the seam's signature
        """True when a state was set while waiting, False at the timeout: as the status board answers."""
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.add(waiter)
        self._waiting_changed.set()
        try:
            async with asyncio.timeout(timeout):
                await waiter
            return True
        except TimeoutError:
            return False
        finally:
            self._waiters.discard(waiter)
            self._waiting_changed.set()

    def turned_away(self, endpoint_id: int) -> None:
        self.turned_away_counts[endpoint_id] += 1

    @property
    def waiting(self) -> int:
        """How many requests wait for a change now."""
        return len(self._waiters)

    async def until_waiting(self, count: int) -> None:
        """Until exactly `count` requests wait for a change (a request held, or let go); 10 s at most."""
        async with asyncio.timeout(10):
            while self.waiting != count:
                self._waiting_changed.clear()
                await self._waiting_changed.wait()


def scripted_status(runtime: Runtime) -> ScriptedStatus:
    """Install a runtime like `runtime` whose endpoint states the test sets; return them."""
    status = ScriptedStatus()
    runtime_install(dataclasses.replace(runtime, status=status))  # type: ignore[arg-type]  # the same seam
    return status
