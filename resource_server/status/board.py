"""The status board: every enabled endpoint's state, kept fresh in the background and never on the request path.

Every `interval` seconds a round (`probe`) gathers what each source says, all at once and each cut at its
timeout, then derives each endpoint's state (`derive.py`):
- the backend's health (`Backend.health()`, from the backend pool, so the same instance and connections as
  requests): direct, GET /v1/models; globus_compute, its endpoint's status (online, workers, outstanding
  tasks); local, a health task;
- the cluster's batch jobs (`scheduler.py`), polled once per cluster per poll period across all workers;
- maintenance windows, read with the routing table (so they apply as routing applies them);
- the model's load time: the median of its last starts (EndpointStart rows), read each round.
A source that fails, times out or returns garbage leaves its last reading in force, marked stale.

Across workers and hosts (`shared.py`): the worker holding an endpoint's lock in the shared cache compares the
state it derived with the shared one; a change is written, logged and measured (an EndpointStart from starting
to live) by that worker only, and every worker takes `since` and the numbers from the shared record. Readers
(`status`, `jobs`, `metrics`, `model_card`) only read this worker's dicts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import statistics
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, Protocol

from django.db import DatabaseError
from django.db.models import F, Window
from django.db.models.functions import RowNumber
from pydantic import BaseModel

from resource_server.db import db_run
from resource_server.dispatch.base import Backend, BackendHealth
from resource_server.models import EndpointStart
from resource_server.selectors.endpoints import ClusterRoute, EndpointRoute, RoutingTable
from resource_server.selectors.jobs import JobsReading
from resource_server.status.base import UNPROBED, EndpointStatus, State
from resource_server.status.derive import Maintenance, derive_status, endpoint_jobs, serving_job
from resource_server.status.scheduler import JobsPoller, SchedulerConfig, SchedulerReader
from resource_server.status.shared import (
    ENDPOINT_LOCK_SECONDS,
    EndpointRecord,
    Shared,
    endpoint_key,
    endpoint_lock_key,
)

logger = logging.getLogger(__name__)

# The load time in an ETA is the median of this many of the endpoint's latest starts.
LOAD_SAMPLES = 9
# A worker that starts takes the shared records written within this many rounds.
_ADOPT_ROUNDS = 3
# A change into these states is a warning in the log; into the others, information.
_WARNED = frozenset({State.OFFLINE})
_HEALTHY = frozenset({State.LIVE, State.DRAINING})


class BackendSource(Protocol):
    """Where the board gets an endpoint's backend (the backend pool)."""

    def get(self, endpoint_id: int, backend: str, config: BaseModel) -> Backend: ...


@dataclass(frozen=True, slots=True)
class EndpointMetrics:
    """For HPC operations, per endpoint, across every worker (the current stretch of its state included)."""

    seconds_in_state: dict[str, float]  # state -> seconds spent in it, since the shared record began
    load_seconds: tuple[float, ...]  # its latest measured loads (job start to first healthy), newest first
    turned_away: int  # requests answered 503 while it was cold

    @property
    def queued_seconds(self) -> float:
        return self.seconds_in_state.get(State.QUEUED.value, 0.0)

    @property
    def starting_seconds(self) -> float:
        return self.seconds_in_state.get(State.STARTING.value, 0.0)

    @property
    def live_seconds(self) -> float:
        """Live or draining: answering requests."""
        return self.seconds_in_state.get(State.LIVE.value, 0.0) + self.seconds_in_state.get(State.DRAINING.value, 0.0)


@dataclass(frozen=True, slots=True)
class _Shared:
    """One endpoint's outcome of a round's sharing step."""

    record: EndpointRecord  # what this worker now holds
    before: EndpointRecord | None  # the state it changed from, when this worker made the change
    changed: bool
    flushed: int  # turned-away requests added to the shared count


def _recent_loads(endpoint_ids: list[int]) -> dict[int, list[float]]:
    """Each endpoint's latest LOAD_SAMPLES load times, newest first."""
    latest = (
        EndpointStart.objects.filter(endpoint_id__in=endpoint_ids)
        .annotate(rank=Window(RowNumber(), partition_by=[F("endpoint_id")], order_by=F("live_at").desc()))
        .filter(rank__lte=LOAD_SAMPLES)
        .order_by("endpoint_id", "-live_at")
        .values_list("endpoint_id", "load_seconds")
    )
    loads: dict[int, list[float]] = {}
    for endpoint_id, seconds in latest:
        loads.setdefault(endpoint_id, []).append(seconds)
    return loads


def _record_start(endpoint_id: int, job_id: str, started_at: float, live_at: float) -> None:
    EndpointStart.objects.create(
        endpoint_id=endpoint_id,
        job_id=job_id[:128],
        started_at=datetime.fromtimestamp(started_at, UTC),
        live_at=datetime.fromtimestamp(live_at, UTC),
        load_seconds=live_at - started_at,
    )


class StatusBoard:
    """Every enabled endpoint's state (see the module doc). `interval` <= 0 turns the rounds off: every endpoint
    stays unknown, which the route stage treats as able to answer."""

    def __init__(
        self,
        *,
        backends: BackendSource,
        table: Callable[[], Awaitable[RoutingTable]],
        scheduler: SchedulerReader,
        interval: float,
        timeout: float,
        drain_seconds: float,
        shared: Shared | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._backends = backends
        self._table = table
        self.interval = interval
        self._timeout = timeout
        self._drain_seconds = drain_seconds
        self._shared = shared if shared is not None else Shared()
        self._clock = clock
        self._jobs = JobsPoller(reader=scheduler, shared=self._shared, clock=clock)
        self._records: dict[int, EndpointRecord] = {}
        self._health: dict[int, tuple[BackendHealth, float]] = {}  # the last known reading, and when
        self._health_unknown: set[int] = set()  # endpoints whose latest check could not tell
        self._cards: dict[int, dict[str, dict[str, Any]]] = {}  # endpoint id -> model name -> its server's card
        self._loads: dict[int, list[float]] = {}  # endpoint id -> latest load times, newest first
        self._clusters: dict[str, ClusterRoute] | None = None  # as of the last round; None: none yet
        self._turned_away: Counter[int] = Counter()  # not yet added to the shared count
        self._changed: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._polls: dict[str, asyncio.Task[None]] = {}  # cluster -> its scheduler poll under way

    # --- readers: never block, never touch the network ------------------------------------------------------

    def status(self, endpoint_id: int) -> EndpointStatus:
        """The endpoint's state as this worker last learnt it (unknown before its first round)."""
        record = self._records.get(endpoint_id)
        return UNPROBED if record is None else record.status(self._clock())

    def model_card(self, endpoint_id: int, model: str) -> dict[str, Any] | None:
        """The model card (vLLM's `GET /v1/models` item) the endpoint's server last listed for `model`."""
        return self._cards.get(endpoint_id, {}).get(model)

    def jobs(self, cluster_name: str) -> JobsReading:
        """What is known of the cluster's batch jobs: the last good reading (None: never read, or its login
        endpoint is down), when it was read, and the last error since. `configured` is False for a cluster
        whose scheduler the gateway does not read."""
        if self._clusters is None:
            return JobsReading(None)  # no round yet: nothing is known, not even whether it is read
        cluster = self._clusters.get(cluster_name)
        if cluster is None or cluster.scheduler is None:
            return JobsReading(None, configured=False)
        record = self._jobs.record(cluster_name)
        if record is None:
            return JobsReading(None)
        return JobsReading(record.jobs, read_at=record.read_at, error=record.error)

    def metrics(self) -> dict[int, EndpointMetrics]:
        """Per endpoint: seconds spent in each state, measured load times, requests turned away cold."""
        now = self._clock()
        metrics = {}
        for endpoint_id, record in self._records.items():
            seconds = dict(record.seconds_in)
            seconds[record.state.value] = seconds.get(record.state.value, 0.0) + max(0.0, now - record.since)
            metrics[endpoint_id] = EndpointMetrics(
                seconds_in_state=seconds,
                load_seconds=tuple(self._loads.get(endpoint_id, ())),
                turned_away=record.turned_away + self._turned_away[endpoint_id],
            )
        return metrics

    def turned_away(self, endpoint_id: int) -> None:
        """Count a request answered 503 because the endpoint was cold (the route stage calls it)."""
        self._turned_away[endpoint_id] += 1

    async def wait_for_change(self, timeout: float) -> bool:  # noqa: ASYNC109 - a waiter's own bound, in its API
        """Wait until some endpoint's state changes in this worker, or `timeout` s: whether one changed."""
        if self._changed is None:
            self._changed = asyncio.Event()
        changed = self._changed
        try:
            async with asyncio.timeout(timeout):
                await changed.wait()
        except TimeoutError:
            return False
        return True

    # --- the rounds ------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Take what other workers know now, then a round every `interval` (the first one interval away)."""
        if self.interval > 0 and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="status-board")

    async def stop(self) -> None:
        task, self._task = self._task, None
        polls, self._polls = list(self._polls.values()), {}
        for running in (task, *polls):
            if running is not None:
                running.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await running

    async def _run(self) -> None:
        try:
            await self.adopt()
        except Exception:
            logger.warning("status: could not read what other workers know; probing from scratch", exc_info=True)
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.probe()
            except Exception:
                # The endpoints could not be listed (the database is down): keep what we knew, try next time.
                logger.warning("status round failed; keeping the last known states", exc_info=True)

    async def adopt(self) -> None:
        """Take the shared states of the enabled endpoints, without probing (a worker that just started). A record
        no worker has written for a few rounds is left: no gateway was checking it, so it says nothing now."""
        table = await self._table()
        ids = [route.id for routes in table.by_model.values() for route in routes]
        found = await asyncio.to_thread(self._shared.get_many, [endpoint_key(endpoint_id) for endpoint_id in ids])
        recent = self._clock() - _ADOPT_ROUNDS * max(self.interval, 1.0)
        for endpoint_id in ids:
            record = EndpointRecord.parse(found.get(endpoint_key(endpoint_id)))
            if record is not None and record.updated_at >= recent and endpoint_id not in self._records:
                self._records[endpoint_id] = record
        for name, cluster in table.clusters.items():
            if cluster.scheduler is not None:
                await self._jobs.adopt(name)
        self._clusters = table.clusters

    async def probe(self) -> None:
        """One round: every source at once, then each endpoint's state derived and shared (see the module doc)."""
        evidence_at = self._clock()
        table = await self._table()
        routes = {route.id: route for routes in table.by_model.values() for route in routes}
        schedulers = {name: cluster.scheduler for name, cluster in table.clusters.items() if cluster.scheduler}
        polls = self._start_polls(schedulers)
        healths, _ = await asyncio.gather(
            asyncio.gather(*(self._probe_one(route) for route in routes.values())),
            # A slow scheduler does not hold the round up: a poll still running counts in the next one.
            asyncio.wait(polls, timeout=self._timeout) if polls else asyncio.sleep(0),
        )
        self._clusters = table.clusters
        self._jobs.forget(set(schedulers))
        await self._read_loads([endpoint_id for endpoint_id, route in routes.items() if route.job_name])
        now = self._clock()
        for endpoint_id in set(self._records) - set(routes):  # disabled or removed since
            self._forget(endpoint_id)
        derived: dict[int, EndpointRecord] = {}
        for (endpoint_id, route), health in zip(routes.items(), healths, strict=True):
            self._note_health(endpoint_id, health, now)
            derived[endpoint_id] = EndpointRecord.of(self._derive(route, now), now)
        pending = dict(self._turned_away)
        outcomes = await asyncio.to_thread(self._share, derived, pending, evidence_at, now)
        changed_here = False
        for endpoint_id, outcome in outcomes.items():
            before = self._records.get(endpoint_id)
            self._records[endpoint_id] = outcome.record
            changed_here = changed_here or before is None or before.state is not outcome.record.state
            if outcome.flushed:
                self._turned_away[endpoint_id] -= outcome.flushed
            if outcome.changed:
                await self._changed_state(routes[endpoint_id], outcome.before, outcome.record, now)
        self._turned_away = +self._turned_away  # drop the zeros
        if changed_here:
            self._notify()

    def _forget(self, endpoint_id: int) -> None:
        self._records.pop(endpoint_id, None)
        self._health.pop(endpoint_id, None)
        self._health_unknown.discard(endpoint_id)
        self._cards.pop(endpoint_id, None)
        self._loads.pop(endpoint_id, None)

    def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        if changed is not None:
            changed.set()

    async def _probe_one(self, endpoint: EndpointRoute) -> BackendHealth:
        try:
            backend = self._backends.get(endpoint.id, endpoint.backend, endpoint.config)
            async with asyncio.timeout(self._timeout):
                return await backend.health()
        except TimeoutError:
            return BackendHealth(False, f"no answer to the health check within {self._timeout:g} s")
        except Exception as exc:
            return BackendHealth(False, f"health check failed ({type(exc).__name__})")

    def _start_polls(self, schedulers: dict[str, SchedulerConfig]) -> list[asyncio.Task[None]]:
        """Each cluster's poll: the one under way, or a new one (which reads the shared record, and polls the
        scheduler only when due and no other worker is at it)."""
        for cluster in set(self._polls) - set(schedulers):
            self._polls.pop(cluster).cancel()
        for cluster, config in schedulers.items():
            poll = self._polls.get(cluster)
            if poll is None or poll.done():
                self._polls[cluster] = asyncio.get_running_loop().create_task(self._poll(cluster, config))
        return list(self._polls.values())

    async def _poll(self, cluster: str, config: SchedulerConfig) -> None:
        try:
            await self._jobs.poll(cluster, config)
        except Exception:
            logger.warning("status: polling the scheduler of cluster %s failed", cluster, exc_info=True)

    async def _read_loads(self, endpoint_ids: list[int]) -> None:
        if not endpoint_ids:
            self._loads = {}
            return
        try:
            self._loads = await db_run(_recent_loads, endpoint_ids)
        except DatabaseError:
            logger.warning("status: load times unavailable (database); keeping the last ones")

    def _note_health(self, endpoint_id: int, health: BackendHealth, now: float) -> None:
        if not health.known:
            self._health_unknown.add(endpoint_id)
            return
        self._health_unknown.discard(endpoint_id)
        self._health[endpoint_id] = (health, now)
        if health.models:  # kept while a probe lists none (a server down): the cards rarely change
            self._cards[endpoint_id] = {str(card.get("id")): card for card in health.models}

    def _derive(self, route: EndpointRoute, now: float) -> EndpointStatus:
        reading = self._health.get(route.id)
        health_stale = now - reading[1] if reading is not None and route.id in self._health_unknown else None
        cluster = (self._clusters or {}).get(route.cluster)
        record = self._jobs.record(route.cluster) if cluster is not None and cluster.scheduler else None
        jobs = endpoint_jobs(record.jobs if record is not None else None, route.job_name)
        jobs_stale = None
        if record is not None and record.error and record.read_at is not None:
            jobs_stale = now - record.read_at
        window = None
        if route.maintenance_message is not None:
            window = Maintenance(route.maintenance_message, route.maintenance_ends)
        loads = self._loads.get(route.id)
        previous = self._records.get(route.id)
        return derive_status(
            health=reading[0] if reading is not None else None,
            jobs=jobs,
            window=window,
            load_median=statistics.median(loads) if loads else None,
            now=now,
            drain_seconds=self._drain_seconds,
            previous=previous.status(now) if previous is not None else None,
            health_stale_seconds=health_stale,
            jobs_stale_seconds=jobs_stale,
        )

    def _share(
        self, derived: dict[int, EndpointRecord], pending: dict[int, int], evidence_at: float, now: float
    ) -> dict[int, _Shared]:
        """In a thread: each endpoint's derived state against the shared one, under the endpoint's lock."""
        token = secrets.token_hex(8)
        outcomes: dict[int, _Shared] = {}
        for endpoint_id, fresh in derived.items():
            local = self._records.get(endpoint_id)
            lock = endpoint_lock_key(endpoint_id)
            held = self._shared.add(lock, token, ENDPOINT_LOCK_SECONDS)
            if held is None:  # the cache is unreachable: this worker's own view, changes counted here
                outcomes[endpoint_id] = self._step(local, fresh, pending.get(endpoint_id, 0), evidence_at, now)
                continue
            if not held:  # another worker is at it: take what it last wrote
                shared = EndpointRecord.parse(self._shared.get(endpoint_key(endpoint_id)))
                kept = shared or local or fresh
                outcomes[endpoint_id] = _Shared(kept, None, False, 0)
                continue
            try:
                shared = EndpointRecord.parse(self._shared.get(endpoint_key(endpoint_id)))
                if shared is None and local is not None:
                    shared = local  # the cache lost it (restarted, flushed): this worker's view carries on
                outcome = self._step(shared, fresh, pending.get(endpoint_id, 0), evidence_at, now)
                if not self._shared.set(endpoint_key(endpoint_id), outcome.record.as_dict()):
                    outcome = replace(outcome, flushed=0)
                outcomes[endpoint_id] = outcome
            finally:
                self._shared.delete(lock)
        return outcomes

    @staticmethod
    def _step(
        known: EndpointRecord | None, fresh: EndpointRecord, turned_away: int, evidence_at: float, now: float
    ) -> _Shared:
        """The record after this round, from the one known (shared, or this worker's) and the one derived."""
        if known is None:
            return _Shared(replace(fresh, since=now, turned_away=turned_away), None, True, turned_away)
        if known.state is fresh.state:
            record = known.refreshed(fresh)
        elif known.since > evidence_at:
            # Another worker changed it after this round's readings were taken: theirs is newer.
            record = known
        else:
            moved = known.moved_to(fresh, now)
            return _Shared(replace(moved, turned_away=moved.turned_away + turned_away), known, True, turned_away)
        return _Shared(replace(record, turned_away=record.turned_away + turned_away), None, False, turned_away)

    async def _changed_state(
        self, route: EndpointRoute, before: EndpointRecord | None, after: EndpointRecord, now: float
    ) -> None:
        """Once per change, in the worker that made it: the log line, and a cold start's load time."""
        was = f"was {before.state} for {now - before.since:.0f} s" if before is not None else "first seen"
        level = logging.WARNING if after.state in _WARNED else logging.INFO
        logger.log(
            level,
            "endpoint %s (%s on %s) is %s (%s): %s",
            route.id,
            route.model,
            route.cluster,
            after.state,
            was,
            after.detail,
        )
        if before is None or before.state is not State.STARTING or after.state not in _HEALTHY:
            return
        record = self._jobs.record(route.cluster)
        job = serving_job(endpoint_jobs(record.jobs if record is not None else None, route.job_name) or [])
        if job is None or job.started_at is None or job.started_at > now:
            return
        try:
            await db_run(_record_start, route.id, job.id, job.started_at, now)
        except DatabaseError:
            logger.warning("status: the load time of endpoint %s could not be recorded (database)", route.id)
            return
        self._loads[route.id] = [now - job.started_at, *self._loads.get(route.id, [])][:LOAD_SAMPLES]
        logger.info("endpoint %s loaded in %.0f s (job %s)", route.id, now - job.started_at, job.id)
