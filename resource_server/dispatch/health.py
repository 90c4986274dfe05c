"""Backend health, asked in one place: a background prober the composition root owns and the lifespan starts.

Every `interval` seconds it calls `Backend.health()` on each enabled endpoint's backend (from the backend
pool, so the same instance and connections as requests), all at once and each cut at `timeout`, and keeps
endpoint id -> `HealthState`. Never on the request path: the route stage only reads what it knows
(`selectors/endpoints.py:endpoint_candidates`: an endpoint found down is `offline`, and is sent no request).
Requests held for a cold model wait on `wait_for_change`; `turned_away` counts the ones answered 503 cold.

This is the seam the endpoint status (live, starting, queued, offline; from backend health, Globus Compute
endpoint status and the cluster's scheduler) will replace.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from pydantic import BaseModel

from resource_server.dispatch.base import Backend, BackendHealth
from resource_server.status.base import UNPROBED, EndpointStatus, State

logger = logging.getLogger(__name__)


class Probed(Protocol):
    """What the prober needs of an endpoint (a routing table's `EndpointRoute` is one)."""

    @property
    def id(self) -> int: ...

    @property
    def backend(self) -> str: ...

    @property
    def config(self) -> BaseModel: ...


class BackendSource(Protocol):
    """Where the prober gets an endpoint's backend (the backend pool)."""

    def get(self, endpoint_id: int, backend: str, config: BaseModel) -> Backend: ...


@dataclass(frozen=True, slots=True)
class HealthState:
    ok: bool
    detail: str
    since: float  # when it last changed, on the prober's clock


class HealthProber:
    """Probes every endpoint's backend in the background and remembers which are down.

    `interval` <= 0 disables it (every endpoint stays unknown, so candidates keep the registry's order).
    """

    def __init__(
        self,
        *,
        backends: BackendSource,
        endpoints: Callable[[], Awaitable[Iterable[Probed]]],
        interval: float,
        timeout: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._backends = backends
        self._endpoints = endpoints
        self.interval = interval
        self._timeout = timeout
        self._clock = clock
        self._states: dict[int, HealthState] = {}
        self._statuses: dict[int, EndpointStatus] = {}  # what `status` answers, made once per change
        self._waiters: set[asyncio.Future[None]] = set()  # requests held until a state changes
        self._turned_away: Counter[int] = Counter()
        self._cards: dict[int, dict[str, dict[str, Any]]] = {}  # endpoint id -> model name -> its server's card
        self._down: set[int] = set()
        self._task: asyncio.Task[None] | None = None

    @property
    def any_down(self) -> bool:
        return bool(self._down)

    def is_down(self, endpoint_id: int) -> bool:
        """Whether the last probe found this endpoint down (unknown counts as up)."""
        return endpoint_id in self._down

    def status(self, endpoint_id: int) -> EndpointStatus:
        """The endpoint's state as far as its health check tells (live or offline; unknown before a probe)."""
        return self._statuses.get(endpoint_id, UNPROBED)

    async def wait_for_change(self, timeout: float) -> None:  # noqa: ASYNC109 - the seam's signature (RouteStatus)
        """Return when a probe changes an endpoint's state (or `timeout` seconds pass)."""
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.add(waiter)
        try:
            async with asyncio.timeout(timeout):
                await waiter
        except TimeoutError:
            pass
        finally:
            self._waiters.discard(waiter)

    def turned_away(self, endpoint_id: int) -> None:
        """Count a request answered 503 because this endpoint was cold."""
        self._turned_away[endpoint_id] += 1

    def turned_away_count(self, endpoint_id: int) -> int:
        return self._turned_away[endpoint_id]

    def state(self, endpoint_id: int) -> HealthState | None:
        return self._states.get(endpoint_id)

    def model_card(self, endpoint_id: int, model: str) -> dict[str, Any] | None:
        """The model card (vLLM's `GET /v1/models` item) the endpoint's server last listed for `model`."""
        return self._cards.get(endpoint_id, {}).get(model)

    def start(self) -> None:
        """Probe every `interval` from now on; the first probe is one interval away, not at start."""
        if self.interval > 0 and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="health-prober")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.probe()
            except Exception:
                # The endpoints could not be listed (the database is down): keep what we knew, try next time.
                logger.warning("health probe round failed; keeping the last known states", exc_info=True)

    async def probe(self) -> None:
        """One round: every enabled endpoint at once, each cut at `timeout`."""
        targets = {endpoint.id: endpoint for endpoint in await self._endpoints()}
        results = await asyncio.gather(*(self._probe_one(endpoint) for endpoint in targets.values()))
        for endpoint_id in set(self._states) - set(targets):  # disabled or removed since
            del self._states[endpoint_id]
            self._statuses.pop(endpoint_id, None)
            self._cards.pop(endpoint_id, None)
            self._down.discard(endpoint_id)
        for endpoint_id, health in zip(targets, results, strict=True):
            self._record(endpoint_id, health.ok, health.detail)
            if health.models:  # kept while a probe lists none (a server down): the cards rarely change
                self._cards[endpoint_id] = {str(card.get("id")): card for card in health.models}

    async def _probe_one(self, endpoint: Probed) -> BackendHealth:
        try:
            backend = self._backends.get(endpoint.id, endpoint.backend, endpoint.config)
            async with asyncio.timeout(self._timeout):
                health = await backend.health()
        except TimeoutError:
            return BackendHealth(False, f"no answer to the health check within {self._timeout:g} s")
        except Exception as exc:
            return BackendHealth(False, f"health check failed ({type(exc).__name__})")
        return health

    def _record(self, endpoint_id: int, ok: bool, detail: str) -> None:
        before = self._states.get(endpoint_id)
        if before is not None and before.ok == ok:
            if before.detail != detail:
                self._states[endpoint_id] = HealthState(ok, detail, before.since)
                self._statuses[endpoint_id] = _status_of(self._states[endpoint_id])
            return
        self._states[endpoint_id] = health = HealthState(ok, detail, self._clock())
        self._statuses[endpoint_id] = _status_of(health)
        waiters, self._waiters = self._waiters, set()
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)
        if ok:
            self._down.discard(endpoint_id)
            if before is not None:
                logger.info("endpoint %s is healthy again: %s", endpoint_id, detail)
        else:
            self._down.add(endpoint_id)
            logger.warning("endpoint %s failed its health check: %s", endpoint_id, detail)


def _status_of(health: HealthState) -> EndpointStatus:
    """What a health check tells of the state: live or offline (since: on the prober's clock)."""
    return EndpointStatus(State.LIVE if health.ok else State.OFFLINE, since=health.since, detail=health.detail)
