"""What the status board shares across workers and hosts, through Django's cache (Redis when REDIS_URL is set).

Per endpoint, one record: its state and since when (written only by the worker that holds the endpoint's lock,
so a change is made, logged and measured once, whichever worker saw it first), what the sources said, and its
metrics. Per cluster, its jobs as last read by whichever worker polled the scheduler. The admin reads the same
records, so under WSGI it shows what the workers see. In the embedded default (no Redis) the cache is the
process's own memory, which is all there is to share.

Every call is guarded: with the cache unreachable a read is a miss and a write does nothing (logged once per
outage); the board then keeps its own view, and nothing reaches a request.
"""

from __future__ import annotations

import logging
import math
import threading
from dataclasses import dataclass, field, replace
from typing import Any

from django.core.cache import BaseCache, cache
from pydantic import ValidationError

from resource_server.status.base import EndpointStatus, State
from resource_server.status.jobs import ClusterJobs

logger = logging.getLogger(__name__)

# Records are rewritten every round; an endpoint or cluster gone from the registry is forgotten after this.
KEEP_SECONDS = 7 * 86400
# Longest an endpoint's lock is held: one round's read and write, with a worker that dies holding it.
ENDPOINT_LOCK_SECONDS = 10


def endpoint_key(endpoint_id: int) -> str:
    return f"status:endpoint:{endpoint_id}"


def endpoint_lock_key(endpoint_id: int) -> str:
    return f"status:endpoint:{endpoint_id}:lock"


def jobs_key(cluster: str) -> str:
    return f"status:jobs:{cluster}"


def jobs_lock_key(cluster: str) -> str:
    return f"status:jobs:{cluster}:lock"


def _number(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


@dataclass(frozen=True, slots=True)
class EndpointRecord:
    """An endpoint's state as every worker sees it. Times are wall clock (time.time())."""

    state: State
    since: float
    detail: str = ""
    ready_at: float | None = None  # when it is expected to answer (queued, starting); None: unknown
    queue_position: int | None = None
    stale_since: float | None = None  # when the reading behind it was taken, if its source failed since
    maintenance_message: str | None = None
    maintenance_ends: float | None = None
    updated_at: float = 0.0  # when a worker last wrote it
    seconds_in: dict[str, float] = field(default_factory=dict)  # state -> seconds of its ended stretches
    turned_away: int = 0  # requests answered 503 because the model was cold (every worker's)

    @classmethod
    def of(cls, status: EndpointStatus, now: float) -> EndpointRecord:
        """The record of a freshly derived status (`eta_seconds`, `stale_seconds` relative to `now`)."""
        return cls(
            state=status.state,
            since=status.since,
            detail=status.detail,
            ready_at=None if status.eta_seconds is None else now + status.eta_seconds,
            queue_position=status.queue_position,
            stale_since=None if status.stale_seconds is None else now - status.stale_seconds,
            maintenance_message=status.maintenance_message,
            maintenance_ends=status.maintenance_ends,
            updated_at=now,
        )

    def status(self, now: float) -> EndpointStatus:
        """As readers want it at `now`: the ETA and the staleness counted from now."""
        return EndpointStatus(
            self.state,
            since=self.since,
            detail=self.detail,
            eta_seconds=None if self.ready_at is None else max(0.0, self.ready_at - now),
            queue_position=self.queue_position,
            stale_seconds=None if self.stale_since is None else max(0.0, now - self.stale_since),
            maintenance_message=self.maintenance_message,
            maintenance_ends=self.maintenance_ends,
        )

    def moved_to(self, after: EndpointRecord, now: float) -> EndpointRecord:
        """`after`, entered at `now`, carrying this record's totals plus the stretch that ends now."""
        seconds_in = dict(self.seconds_in)
        seconds_in[self.state.value] = seconds_in.get(self.state.value, 0.0) + max(0.0, now - self.since)
        return replace(after, since=now, seconds_in=seconds_in, turned_away=self.turned_away)

    def refreshed(self, after: EndpointRecord) -> EndpointRecord:
        """`after` in the same state: what the sources say now, with this record's since and totals."""
        return replace(after, since=self.since, seconds_in=self.seconds_in, turned_away=self.turned_away)

    def as_dict(self) -> dict[str, Any]:
        return {
            "state": self.state.value,
            "since": self.since,
            "detail": self.detail,
            "ready_at": self.ready_at,
            "queue_position": self.queue_position,
            "stale_since": self.stale_since,
            "maintenance_message": self.maintenance_message,
            "maintenance_ends": self.maintenance_ends,
            "updated_at": self.updated_at,
            "seconds_in": dict(self.seconds_in),
            "turned_away": self.turned_away,
        }

    @classmethod
    def parse(cls, raw: object) -> EndpointRecord | None:
        """A record as stored, or None for anything else (another version's, or damaged): then it is rewritten."""
        if not isinstance(raw, dict):
            return None
        try:
            state = State(raw["state"])
            since = _number(raw["since"])
            seconds_in = raw.get("seconds_in") or {}
            position = raw.get("queue_position")
            if since is None or not isinstance(seconds_in, dict):
                return None
            return cls(
                state=state,
                since=since,
                detail=str(raw.get("detail") or ""),
                ready_at=_number(raw.get("ready_at")),
                queue_position=position if isinstance(position, int) else None,
                stale_since=_number(raw.get("stale_since")),
                maintenance_message=raw.get("maintenance_message") or None,
                maintenance_ends=_number(raw.get("maintenance_ends")),
                updated_at=_number(raw.get("updated_at")) or 0.0,
                seconds_in={str(key): float(value) for key, value in seconds_in.items() if _number(value) is not None},
                turned_away=int(raw.get("turned_away") or 0),
            )
        except (KeyError, TypeError, ValueError):
            return None


@dataclass(frozen=True, slots=True)
class JobsRecord:
    """A cluster's jobs as last read: the last good reading (kept when a later one fails) and the last error."""

    jobs: ClusterJobs | None
    read_at: float | None  # wall clock of the last good reading
    error: str | None  # why the latest attempt failed, when it did
    attempted_at: float  # wall clock of the latest attempt, good or not: the next poll is due from it

    def as_dict(self) -> dict[str, Any]:
        return {
            "jobs": None if self.jobs is None else self.jobs.model_dump(mode="json"),
            "read_at": self.read_at,
            "error": self.error,
            "attempted_at": self.attempted_at,
        }

    @classmethod
    def parse(cls, raw: object) -> JobsRecord | None:
        if not isinstance(raw, dict):
            return None
        attempted_at = _number(raw.get("attempted_at"))
        if attempted_at is None:
            return None
        try:
            jobs = None if raw.get("jobs") is None else ClusterJobs.model_validate(raw["jobs"])
        except ValidationError:
            return None
        error = raw.get("error")
        return cls(jobs, _number(raw.get("read_at")), str(error) if error else None, attempted_at)


class Shared:
    """Django's cache with every call guarded (see the module doc). Safe to use from several threads."""

    def __init__(self, store: BaseCache | None = None) -> None:
        self._store = store if store is not None else cache
        self._lock = threading.Lock()
        self._failing = False

    @property
    def available(self) -> bool:
        """Whether the last call reached the cache."""
        return not self._failing

    def _failed(self, what: str, exc: Exception) -> None:
        with self._lock:
            first, self._failing = not self._failing, True
        if first:
            logger.warning(
                "status: the shared cache is unavailable (%s on %s); each worker keeps its own view",
                type(exc).__name__,
                what,
            )

    def _worked(self) -> None:
        if self._failing:
            with self._lock:
                self._failing = False
            logger.info("status: the shared cache is back")

    def get(self, key: str) -> object:
        try:
            value = self._store.get(key)
        except Exception as exc:
            self._failed("get", exc)
            return None
        self._worked()
        return value

    def get_many(self, keys: list[str]) -> dict[str, Any]:
        try:
            values = self._store.get_many(keys)
        except Exception as exc:
            self._failed("get_many", exc)
            return {}
        self._worked()
        return values

    def set(self, key: str, value: object, timeout: float = KEEP_SECONDS) -> bool:
        try:
            self._store.set(key, value, timeout=timeout)
        except Exception as exc:
            self._failed("set", exc)
            return False
        self._worked()
        return True

    def add(self, key: str, value: object, timeout: float) -> bool | None:
        """Set `key` unless it exists: True if this call set it, False if it existed, None: cache unreachable.
        Redis keeps whole seconds, so `timeout` is rounded up (never to 0, which would not keep it at all)."""
        try:
            added = self._store.add(key, value, timeout=max(1, math.ceil(timeout)))
        except Exception as exc:
            self._failed("add", exc)
            return None
        self._worked()
        return bool(added)

    def delete(self, key: str) -> None:
        try:
            self._store.delete(key)
        except Exception as exc:
            self._failed("delete", exc)
            return
        self._worked()


def endpoint_records(endpoint_ids: list[int], shared: Shared | None = None) -> dict[int, EndpointRecord]:
    """The shared records of these endpoints (those known), in one read: for the admin."""
    keys = {endpoint_key(endpoint_id): endpoint_id for endpoint_id in endpoint_ids}
    found = (shared or Shared()).get_many(list(keys))
    records = {keys[key]: EndpointRecord.parse(raw) for key, raw in found.items() if key in keys}
    return {endpoint_id: record for endpoint_id, record in records.items() if record is not None}


def jobs_record(cluster: str, shared: Shared | None = None) -> JobsRecord | None:
    """The cluster's jobs as last read by any worker, if any has: for the admin."""
    return JobsRecord.parse((shared or Shared()).get(jobs_key(cluster)))
