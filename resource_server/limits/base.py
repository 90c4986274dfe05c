"""The limiter's seam: the checks one request must pass, and the store that keeps their counters atomically.

A request's applicable limits (limits/policy.py) become `Check`s. A `LimitStore` takes all of a request's checks
in one atomic step: if every one passes, it reserves them all, else none (`reserve`). When the request ends, the
reservation is settled with the tokens it really used (`settle`): what was reserved beyond that comes back, and
its concurrency slots are released. Stores: Redis (a Lua script, one round trip; across workers and hosts) and
the database (one transaction; without Redis). Both pass the same contract tests.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from enum import StrEnum
from typing import NamedTuple, Protocol


class Kind(StrEnum):
    # Slots held while the request is in flight (a lease per reservation that expires unless refreshed, so a
    # crashed worker's slots come back within LIMITS_RESERVATION_TTL_SECONDS).
    CONCURRENT = "concurrent"
    # Token buckets of capacity `limit`, refilled at `limit` per `window` seconds: requests per minute (amount 1)
    # and tokens per minute (amount: the worst case reserved; settled to the tokens used).
    REQUESTS = "requests"
    TOKENS = "tokens"
    # Tokens used in a period (a day, a month, an allocation) that ends at `period_end`: used + amount <= limit.
    BUDGET = "budget"


class Check(NamedTuple):
    """One limit as one request meets it (a tuple: made for every request, so cheap to make)."""

    key: str  # the counter's name: scope, narrowing, kind and (budgets) period, e.g. "b:u12:m=llama:d20261130"
    kind: Kind
    limit: int
    amount: int  # what this request takes: 1 (concurrent, requests) or tokens (tokens, budget)
    window: float = 60.0  # REQUESTS, TOKENS: seconds to refill the whole bucket
    period_end: float = 0.0  # BUDGET: epoch seconds at which the period ends (its counter can go then)
    label: str = ""  # the limit in words, named in a refusal: "tokens per day for user jdoe@anl.gov"


class CheckState(NamedTuple):
    """One check after the step (admitted or not): for the x-ratelimit-* headers and the usage route."""

    remaining: int  # what is left of the limit (never below 0)
    reset_seconds: float  # until the counter is back to its full limit (bucket full, period over, no slot held)


class Verdict(NamedTuple):
    admitted: bool
    states: tuple[CheckState, ...]  # one per check, in the order given
    refused: int = -1  # the index of the first check that did not pass
    # Refused: seconds until that check could pass. 0: unknown (a concurrency slot: any request may end first),
    # or never (the request alone takes more than the limit, `amount > limit`: the caller says so).
    retry_after: float = 0.0


# Used tokens of a budget when its counter is missing (the store was emptied, or this period's first request):
# read from the daily usage rollup, so a Redis restart does not give budgets back. Called outside any store
# transaction; a DatabaseError it raises reaches the caller of `reserve` as `LimitStoreUnavailable`.
BudgetSeed = Callable[[Check], Awaitable[int]]


class LimitStore(Protocol):
    async def reserve(self, reservation: str, checks: Sequence[Check], *, now: float) -> Verdict:
        """Atomically: all checks pass and are reserved under `reservation`, or none is. Raise
        `LimitStoreUnavailable` when the store cannot be reached within its timeout.

        `reservation` is unique per request (it is remembered until settled, at most a day); reserving it again
        is admitted without counting twice, so a call retried after a lost answer is safe. The checks' keys are
        distinct, limits >= 1 (ValueError otherwise). `now` (epoch seconds) is the caller's clock, used for every
        time the stores compare, so that both stores agree, and tests can move time."""
        ...

    # True: a settle is sent to the store before `settle` returns, so requests reserved after it see it without
    # waiting for its reply; False: only once the future `settle` returns is done.
    settles_in_order: bool

    def settle(
        self, reservation: str, checks: Sequence[Check], *, used_tokens: int, now: float
    ) -> asyncio.Future[None]:
        """The request ended having used `used_tokens`: TOKENS and BUDGET counters move by (used - amount), its
        CONCURRENT slots are released. Started at once (on the running event loop); the future it returns is
        done when the store has applied it, and never fails (a lost settle only leaves a lease to expire). Pass
        the checks given to `reserve`. Settling a reservation that was not taken (refused, unknown, settled
        already) releases nothing it does not hold and moves no tokens."""
        ...

    async def refresh(self, leases: Sequence[tuple[str, str]], *, now: float) -> None:
        """Keep the (key, reservation) concurrency leases of requests still in flight from expiring, for another
        LIMITS_RESERVATION_TTL_SECONDS from `now`; a lease already expired stays so (its slot may be taken). Never
        raises: a failed round is logged, and the next one (well within the TTL) tries again."""
        ...

    async def warm(self) -> None:
        """At worker start-up: open what the request path would otherwise open under load (Redis's connections,
        whose connect is timed by the check's short timeout). Never raises."""
        ...

    async def aclose(self) -> None: ...


class LimitStoreUnavailable(Exception):
    """The store could not be reached (Redis or the database down, or slower than its timeout)."""
