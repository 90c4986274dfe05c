"""The composition root (Cosmic Python's `bootstrap`): builds the process's long-lived objects and hands
each the others it needs. Nothing of them exists at import time, and nothing talks to the outside world or
starts a thread until `Runtime.start` (or a first use: the usage writer starts with its first record).

Who builds it:
- the ASGI lifespan (`gateway/asgi.py`): at start-up it builds and starts the runtime, at shutdown stops it;
- tests: a pytest fixture builds a fresh runtime for every test and installs it (`runtime_install`);
- every other context (Django's test client, `manage.py` commands, the admin under WSGI, `runserver`, an
  ASGI server run without lifespan): `runtime()` builds one on first use in the process. Those contexts
  have no start-up hook to call, and building is cheap and touches nothing outside (the usage writer and
  the Redis connections start lazily on first use), so a first use is the right moment.

The doors (`api/fast.py`, the ninja views) ask `runtime()` per request and pass it to the pipeline.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass

from django.conf import settings

from resource_server.adapters.inflight import InFlight, in_flight_from_settings
from resource_server.adapters.relay import RelayHub, relay_hub_from_settings
from resource_server.auth.globus import GroupMemberships
from resource_server.db import db_run
from resource_server.dispatch.globus_compute import ComputeEndpoints
from resource_server.dispatch.local import LocalExecutors
from resource_server.dispatch.registry import BackendParts, BackendPool
from resource_server.limits.base import Check, LimitStore
from resource_server.limits.limiter import Limiter
from resource_server.limits.store_db import DatabaseLimitStore
from resource_server.limits.store_redis import RedisLimitStore
from resource_server.selectors.endpoints import RoutingCache
from resource_server.selectors.limits import budget_used
from resource_server.services.authentication import Authenticators
from resource_server.services.usage import UsageSink, usage_sink_from_settings
from resource_server.services.users import UserPrincipals
from resource_server.status.board import StatusBoard
from resource_server.status.scheduler import SchedulerReader

# A health check that takes longer than this counts as failed (the status board never waits for it longer).
HEALTH_PROBE_TIMEOUT_SECONDS = 5.0


@dataclass(frozen=True, slots=True)
class Runtime:
    """The long-lived objects of one gateway process."""

    relay_hub: RelayHub
    usage_sink: UsageSink
    compute_endpoints: ComputeEndpoints
    backend_pool: BackendPool
    group_memberships: GroupMemberships
    users: UserPrincipals
    authenticators: Authenticators
    routing: RoutingCache
    status: StatusBoard
    in_flight: InFlight
    limiter: Limiter

    def start(self) -> None:
        """At worker start-up, on the event loop: the usage writer (adopting journals left by stopped
        workers), the status board (its first round one interval from now), the sharing of in-flight
        counts with the other workers (with Redis) and the limit store's connections."""
        self.usage_sink.start()
        self.status.start()
        self.in_flight.start()
        self.limiter.start()

    async def stop(self, usage_seconds: float) -> None:
        """At shutdown, after the requests have ended: the status board and the in-flight sharing, then together
        the usage writer within `usage_seconds` (what it cannot write stays journaled for the next start) and the
        Globus Compute executors, without waiting for tasks (the SDK's exit hook would wait forever for a lost one)."""
        await self.status.stop()
        await self.in_flight.stop()
        await self.limiter.aclose()
        await asyncio.gather(
            asyncio.to_thread(self.compute_endpoints.close),
            asyncio.to_thread(self.usage_sink.stop, usage_seconds),
        )


def bootstrap() -> Runtime:
    """Build the process's long-lived objects from the settings, each handed what it depends on."""
    gateway = settings.GATEWAY
    relay_hub = relay_hub_from_settings()
    compute_endpoints = ComputeEndpoints()
    local_executors = LocalExecutors()
    backend_pool = BackendPool(
        BackendParts(relay_hub=relay_hub, compute_endpoints=compute_endpoints, local_executors=local_executors)
    )
    group_memberships = GroupMemberships()
    users = UserPrincipals()
    routing = RoutingCache()

    interval = gateway.HEALTH_PROBE_SECONDS
    return Runtime(
        relay_hub=relay_hub,
        usage_sink=usage_sink_from_settings(),
        compute_endpoints=compute_endpoints,
        backend_pool=backend_pool,
        group_memberships=group_memberships,
        users=users,
        authenticators=Authenticators.standard(groups=group_memberships, users=users),
        routing=routing,
        status=StatusBoard(
            backends=backend_pool,
            table=routing.table,
            scheduler=SchedulerReader(compute_endpoints=compute_endpoints, local_executors=local_executors),
            interval=interval,
            timeout=min(HEALTH_PROBE_TIMEOUT_SECONDS, interval) if interval > 0 else HEALTH_PROBE_TIMEOUT_SECONDS,
            drain_seconds=gateway.STATUS_DRAIN_SECONDS,
        ),
        in_flight=in_flight_from_settings(),
        limiter=limiter_from_settings(),
    )


def limiter_from_settings() -> Limiter:
    """Limits counted in Redis with REDIS_URL (across workers and hosts), else in the database (across workers;
    across hosts too when they share it). A budget counter the store lacks is read back from the daily rollup."""

    async def seed(check: Check) -> int:
        return await db_run(budget_used, limiter.span(check.key))

    gateway = settings.GATEWAY
    ttl = gateway.LIMITS_RESERVATION_TTL_SECONDS
    store: LimitStore = (
        RedisLimitStore(gateway.REDIS_URL, seed=seed, ttl=ttl, timeout=gateway.LIMITS_REDIS_TIMEOUT_SECONDS)
        if gateway.REDIS_URL
        else DatabaseLimitStore(seed=seed, ttl=ttl)
    )
    limiter = Limiter(store)
    return limiter


_current: Runtime | None = None
_building = threading.Lock()


def runtime() -> Runtime:
    """The process's runtime: the one installed (by the lifespan or a test), else one built now."""
    current = _current
    if current is None:
        with _building:  # WSGI serves from threads: two first uses must not build two
            if _current is None:
                runtime_install(bootstrap())
            current = _current
            assert current is not None
    return current


def runtime_install(built: Runtime | None) -> None:
    """Make `built` the process's runtime (None: the next `runtime()` builds a new one)."""
    global _current
    _current = built
