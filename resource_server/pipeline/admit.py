"""The admit stage: a caller's limits and budgets, reserved before dispatch and settled when the request ends.

There are no limits yet, so every request is admitted. The shape is the one limits need: `admit` reserves
atomically (Redis across workers) or refuses with 429; the meter stage settles the reservation with the
request's usage once its outcome is known, errors and client disconnects included, so what an unfinished
request reserved is always released.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from resource_server.auth.base import Principal
from resource_server.pipeline.parse import ParsedRequest
from resource_server.selectors.endpoints import EndpointRoute
from resource_server.services.usage import UsageRecord


class Reservation(Protocol):
    def settle(self, record: UsageRecord) -> None:
        """Replace what was reserved by what the request used (`record` is final); never raises."""
        ...


class _Unlimited:
    """Nothing reserved, so nothing to settle."""

    __slots__ = ()

    def settle(self, record: UsageRecord) -> None:
        return None


UNLIMITED: Reservation = _Unlimited()


async def admit(*, principal: Principal, request: ParsedRequest, candidates: Sequence[EndpointRoute]) -> Reservation:
    """Admit the request for `principal` or refuse it (429); what it may use stays reserved until settled."""
    return UNLIMITED
