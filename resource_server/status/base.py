"""What the gateway knows of each endpoint's state, as the route stage and the listings read it.

The state comes from every source an endpoint's backend has (model server health, Globus Compute endpoint
status, the cluster's batch scheduler), refreshed in the background and never on the request path. This
module is the seam: `StatusView` is what readers need; the status board (`resource_server/status/board.py`)
keeps it fresh.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Protocol


class State(enum.StrEnum):
    """An endpoint's state, in the route stage's order of preference (`RANK`)."""

    LIVE = "live"  # the model answers
    DRAINING = "draining"  # it answers, but its job is ending (exiting, or near its walltime)
    UNKNOWN = "unknown"  # not probed yet, or every source failed: treated as able to answer
    STARTING = "starting"  # its job runs and the model is loading
    QUEUED = "queued"  # its job waits in the scheduler's queue
    OFFLINE = "offline"  # no job and no answer
    MAINTENANCE = "maintenance"  # an admin's maintenance window is on


# Lower goes first. Only the states up to UNKNOWN are sent requests; the others answer 503 (cold start).
RANK = {state: rank for rank, state in enumerate(State)}
SERVING = frozenset({State.LIVE, State.DRAINING, State.UNKNOWN})


@dataclass(frozen=True, slots=True)
class EndpointStatus:
    state: State
    since: float  # wall-clock (time.time()) when it entered the state
    detail: str = ""  # for people: what the sources said, e.g. "job 123.polaris queued; position 3"
    eta_seconds: float | None = None  # until it is expected to answer (queued, starting); None when unknown
    queue_position: int | None = None  # its job's place among queued jobs of its queue, 1 first
    stale_seconds: float | None = None  # age of the newest source reading behind it, when a source failed since
    maintenance_message: str | None = None
    maintenance_ends: float | None = None  # wall clock; None: no end set

    @property
    def serving(self) -> bool:
        return self.state in SERVING


UNPROBED = EndpointStatus(State.UNKNOWN, since=0.0, detail="not checked yet")


class StatusView(Protocol):
    """What the route stage and the listings read: never blocks, never touches the network."""

    def status(self, endpoint_id: int) -> EndpointStatus: ...


class RouteStatus(StatusView, Protocol):
    """What the route stage needs besides each endpoint's status: to hold a request for a cold model until a
    state changes, and to count the requests it turned away cold (an operations metric, per endpoint)."""

    # A timeout of its own, not asyncio.timeout around it: a held request's wait is "a change or the next look".
    async def wait_for_change(self, timeout: float) -> bool:  # noqa: ASYNC109 - see the line above
        """Return when any endpoint's state changes (True), or after `timeout` seconds (False), whichever first."""
        ...

    def turned_away(self, endpoint_id: int) -> None:
        """Count one request answered 503 because this endpoint (its model's best) was cold."""
        ...
