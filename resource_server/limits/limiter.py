"""The limiter: reserves a request's checks in the store, settles them when it ends, keeps its slots alive.

One per worker (the composition root builds it with the store: Redis with REDIS_URL, else the database). A
request's concurrency slots are leases that expire after LIMITS_RESERVATION_TTL_SECONDS unless refreshed: the
limiter refreshes those of its requests in flight every third of that, so only a crashed worker's slots lapse.
When the store cannot be reached, LIMITS_BUDGETS_WHEN_STORE_DOWN / LIMITS_RATES_WHEN_STORE_DOWN say whether a
request is refused (closed) or let through unmetered (open); either way it is counted and logged.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass

from django.conf import settings

from resource_server.limits.base import Check, Kind, LimitStore, LimitStoreUnavailable, Verdict
from resource_server.limits.policy import BudgetSpan

logger = logging.getLogger(__name__)

_LOG_INTERVAL = 10.0  # at most one store-outage log line per this many seconds per worker
_SPANS_KEPT = 10_000  # budget spans remembered for seeding a missing counter (a few per user and period)


@dataclass(frozen=True, slots=True)
class Refusal:
    """A check the request did not pass."""

    check: Check
    verdict: Verdict  # its retry_after: seconds until that check could pass


class LimitReservation:
    """What one admitted request holds, until settled with what it used."""

    __slots__ = ("_limiter", "_settled", "checks", "id", "verdict")

    def __init__(self, limiter: Limiter, reservation_id: str, checks: Sequence[Check], verdict: Verdict) -> None:
        self._limiter = limiter
        self._settled: asyncio.Future[None] | None = None
        self.id = reservation_id
        self.checks = checks
        self.verdict = verdict

    @property
    def tight(self) -> bool:
        """The same request again would not fit now: whether this one's settle is applied decides the next one."""
        return any(
            state.remaining < check.amount for check, state in zip(self.checks, self.verdict.states, strict=True)
        )

    def settle(self, used_tokens: int) -> None:
        """Release and correct the reservation (once), started now; `settled()` waits until later requests see
        it. Nothing to do (no round trip) when it holds no slot and used exactly what it reserved (or reserved
        only requests)."""
        if self._settled is not None:
            return
        if any(
            check.kind is Kind.CONCURRENT or (check.kind is not Kind.REQUESTS and check.amount != used_tokens)
            for check in self.checks
        ):
            self._settled = self._limiter.settle_now(self, used_tokens)

    async def settled(self) -> None:
        """Wait until the caller's next request, which may follow at once on another worker, will see the settle:
        its slot free and its unused tokens back (or a budget near its end would refuse it wrongly). With Redis
        the settle is sent before this returns, and its reply is waited for only when the reservation was tight;
        with the database, until it has committed."""
        settling = self._settled
        if settling is None or settling.done():
            return
        if not self._limiter.store.settles_in_order or self.tight:
            await asyncio.shield(settling)


class Limiter:
    def __init__(self, store: LimitStore) -> None:
        self.store = store
        self.store_down = 0  # requests decided without the store (admitted open or refused closed)
        self._leases: dict[str, list[str]] = {}  # reservation -> its concurrency keys, while in flight
        self._refresher: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._settling: set[asyncio.Future[None]] = set()  # settles not done yet, waited for by aclose
        self._logged_at = float("-inf")
        self._spans: dict[str, BudgetSpan] = {}

    def span(self, key: str) -> BudgetSpan:
        """What the budget counter `key` counts (for its seed: the store asks while reserving it)."""
        return self._spans[key]

    async def reserve(self, checks: Sequence[Check], spans: dict[str, BudgetSpan]) -> LimitReservation | Refusal | None:
        """Reserve every check, or say which one refused. None: the store is down and the setting lets the
        request through unmetered. Raises LimitStoreUnavailable when the store is down and the setting says
        closed for one of the checks' kinds."""
        reservation_id = os.urandom(16).hex()  # unique; uuid4() costs ten times more
        if spans:
            if len(self._spans) > _SPANS_KEPT:
                self._spans.clear()
            self._spans.update(spans)
        try:
            verdict = await self.store.reserve(reservation_id, checks, now=time.time())
        except LimitStoreUnavailable:
            self._store_down()
            config = settings.GATEWAY
            budgets = any(check.kind is Kind.BUDGET for check in checks)
            rates = any(check.kind is not Kind.BUDGET for check in checks)
            if (budgets and config.LIMITS_BUDGETS_WHEN_STORE_DOWN == "closed") or (
                rates and config.LIMITS_RATES_WHEN_STORE_DOWN == "closed"
            ):
                raise
            return None
        if not verdict.admitted:
            return Refusal(checks[verdict.refused], verdict)
        leases = [check.key for check in checks if check.kind is Kind.CONCURRENT]
        if leases:
            self._leases[reservation_id] = leases
            self._keep_refreshing()
        return LimitReservation(self, reservation_id, checks, verdict)

    def settle_now(self, reservation: LimitReservation, used_tokens: int) -> asyncio.Future[None] | None:
        self._leases.pop(reservation.id, None)
        try:
            asyncio.get_running_loop()
        except RuntimeError:  # no loop (a request finished outside one): its leases lapse after the TTL
            return None
        settling = self.store.settle(reservation.id, reservation.checks, used_tokens=used_tokens, now=time.time())
        if not settling.done():
            self._settling.add(settling)
            settling.add_done_callback(self._settling.discard)
        return settling

    def start(self) -> None:
        """At worker start-up, on the event loop: the store opens its connections in the background."""
        task = asyncio.get_running_loop().create_task(self.store.warm(), name="limit-store-warm")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def aclose(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
        if self._tasks or self._settling:
            await asyncio.wait({*self._tasks, *self._settling}, timeout=2)
        await self.store.aclose()

    def _keep_refreshing(self) -> None:
        refresher = self._refresher
        if refresher is None or refresher.done() or refresher.get_loop() is not asyncio.get_running_loop():
            self._refresher = asyncio.get_running_loop().create_task(self._refresh_leases())

    async def _refresh_leases(self) -> None:
        interval = settings.GATEWAY.LIMITS_RESERVATION_TTL_SECONDS / 3
        while self._leases:
            await asyncio.sleep(interval)
            leases = [(key, reservation) for reservation, keys in list(self._leases.items()) for key in keys]
            if not leases:
                return
            try:
                await self.store.refresh(leases, now=time.time())
            except LimitStoreUnavailable:
                self._store_down()

    def _store_down(self) -> None:
        self.store_down += 1
        now = time.monotonic()
        if now - self._logged_at >= _LOG_INTERVAL:
            self._logged_at = now
            logger.warning(
                "the limits store cannot be reached; %d request(s) decided without it so far by this worker "
                "(LIMITS_BUDGETS_WHEN_STORE_DOWN=%s, LIMITS_RATES_WHEN_STORE_DOWN=%s)",
                self.store_down,
                settings.GATEWAY.LIMITS_BUDGETS_WHEN_STORE_DOWN,
                settings.GATEWAY.LIMITS_RATES_WHEN_STORE_DOWN,
            )
