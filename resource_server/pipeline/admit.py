"""The admit stage: a caller's limits and budgets, reserved before dispatch and settled when the request ends.

The request is charged to a project (`LimitRules.project_for`: the OpenAI-Project header, else the caller's first
project). Every limit that applies (limits/policy.py) is reserved in one atomic step of the store (Redis across
workers and hosts, else the database): one slot of each concurrency limit, one request of each requests-per-minute
bucket, and the request's worst case in tokens (its prompt estimated from its size, plus `max_tokens`, or the
model's context length) from each tokens-per-minute bucket and each budget. Refused: 429 like OpenAI's
(`rate_limit_exceeded`, or `insufficient_quota` for a budget), the limit named, with `Retry-After`. The meter
stage settles the reservation with the tokens the request used once its outcome is known, errors and client
disconnects included, so what an unfinished request reserved always comes back.

Every answer from here on carries OpenAI's `x-ratelimit-*` headers for the tightest requests-per-minute and
tokens-per-minute limit that applies (none when no such limit applies).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Protocol

from django.conf import settings

from resource_server.auth.base import Principal
from resource_server.errors import ErrorCode, PermissionDenied, RateLimited, ServiceUnavailable
from resource_server.limits.base import Check, CheckState, Kind, LimitStoreUnavailable
from resource_server.limits.limiter import Limiter, LimitReservation, Refusal
from resource_server.limits.policy import Demand, LimitRules, ProjectRefused, demand_of
from resource_server.pipeline.parse import ParsedRequest
from resource_server.routes import RouteDescriptor
from resource_server.selectors.endpoints import EndpointRoute
from resource_server.services.usage import UsageRecord

Headers = tuple[tuple[str, str], ...]


class Reservation(Protocol):
    @property
    def headers(self) -> Headers:
        """OpenAI's x-ratelimit-* headers as of the reservation."""
        ...

    def settle(self, record: UsageRecord) -> None:
        """Replace what was reserved by what the request used (`record` is final); never raises."""
        ...

    async def settled(self) -> None:
        """Wait until the settling is done (a JSON answer waits, so the caller's next request sees it)."""
        ...


class _Unlimited:
    """Nothing reserved, so nothing to settle."""

    __slots__ = ()
    headers: Headers = ()

    def settle(self, record: UsageRecord) -> None:
        return None

    async def settled(self) -> None:
        return None


UNLIMITED: Reservation = _Unlimited()


class _Held:
    __slots__ = ("_held", "headers")

    def __init__(self, held: LimitReservation, headers: Headers) -> None:
        self._held = held
        self.headers = headers

    def settle(self, record: UsageRecord) -> None:
        used = record.total_tokens
        if used is None:
            used = (record.prompt_tokens or 0) + (record.completion_tokens or 0)
        self._held.settle(used)

    async def settled(self) -> None:
        await self._held.settled()


async def admit(
    *,
    limiter: Limiter,
    rules: LimitRules,
    principal: Principal,
    descriptor: RouteDescriptor,
    request: ParsedRequest,
    candidates: Sequence[EndpointRoute],
    project: str,
    record: UsageRecord,
) -> Reservation:
    """Admit the request for `principal` or refuse it (429); what it may use stays reserved until settled.
    `project` is the OpenAI-Project header; the project charged goes on the usage `record`."""
    try:
        charged = rules.project_for(principal.groups, project)
    except ProjectRefused as refused:
        raise PermissionDenied(
            f"You are not a member of project {refused.name!r} (the OpenAI-Project header).",
            code=ErrorCode.PROJECT_NOT_MEMBER,
        ) from None
    record.project_id = None if charged is None else charged.id
    if principal.limits_exempt or rules.empty:
        return UNLIMITED
    first = candidates[0]
    plan = rules.plan(
        user_id=principal.user_id,
        username=principal.username,
        key_id=principal.api_key_id,
        project_id=None if charged is None else charged.id,
        model=first.model,
        endpoint_id=first.id,
        now=time.time(),
    )
    if not plan.templates:
        return UNLIMITED
    checks = plan.checks(_demand(descriptor, request, candidates))
    try:
        outcome = await limiter.reserve(checks, plan.spans)
    except LimitStoreUnavailable:
        raise ServiceUnavailable(
            "The gateway cannot check your limits and budgets right now. Please retry shortly.",
            retry_after=5,
            code=ErrorCode.LIMITS_UNAVAILABLE,
        ) from None
    if outcome is None:  # the store is down and the settings let this request through unmetered
        return UNLIMITED
    headers = rate_headers(checks, outcome.verdict.states)
    if isinstance(outcome, Refusal):
        raise _refusal(outcome, headers)
    return _Held(outcome, headers)


def _demand(descriptor: RouteDescriptor, request: ParsedRequest, candidates: Sequence[EndpointRoute]) -> Demand:
    default = settings.GATEWAY.LIMITS_DEFAULT_CONTEXT_TOKENS
    return demand_of(
        body_size=request.size,
        max_tokens=request.max_tokens,
        n=request.n,
        generates=bool(descriptor.fields.max_tokens),
        context_length=max(route.context_length or default for route in candidates),
    )


def _refusal(refusal: Refusal, headers: Headers) -> RateLimited:
    check = refusal.check
    state = refusal.verdict.states[refusal.verdict.refused]
    wait = max(refusal.verdict.retry_after, 0.0)
    hopeless = check.amount > check.limit > 0  # bigger than the whole limit: waiting cannot help
    extra = dict(headers)
    if hopeless:
        message = (
            f"Request too large for the {check.label}: limit {check.limit}, requested {check.amount}. "
            "Lower max_tokens (or shorten the prompt) so that it fits."
        )
        code, error_type = ErrorCode.RATE_LIMIT_EXCEEDED, "tokens" if check.kind is not Kind.CONCURRENT else "requests"
        extra["x-should-retry"] = "false"  # waiting cannot help
    elif check.kind is Kind.BUDGET and check.limit == 0:
        message = f"You have no {check.label}: ask the administrators."
        code, error_type = ErrorCode.INSUFFICIENT_QUOTA, "insufficient_quota"
        extra["x-should-retry"] = "false"
    elif check.kind is Kind.BUDGET:
        message = (
            f"You have used your {check.label}: limit {check.limit}, remaining {state.remaining}, this request "
            f"may use up to {check.amount}. It renews in {duration(wait)}; for more, ask the administrators."
        )
        code, error_type = ErrorCode.INSUFFICIENT_QUOTA, "insufficient_quota"
        extra["x-should-retry"] = "false"  # the OpenAI client would retry a 429 at once, to no avail
    else:
        used = check.limit - state.remaining
        retry = f" Please try again in {duration(wait)}." if wait > 0 else " Please try again when one ends."
        message = f"Rate limit reached for {check.label}: limit {check.limit}, used {used}.{retry}"
        code, error_type = ErrorCode.RATE_LIMIT_EXCEEDED, _kind_type(check)
        if wait > 0:
            extra["retry-after-ms"] = str(math.ceil(wait * 1000))
    retry_after = max(1, math.ceil(wait)) if not hopeless else 1
    return RateLimited(message, retry_after=retry_after, code=code, error_type=error_type, headers=extra)


def _kind_type(check: Check) -> str:
    """OpenAI's error `type` for a rate limit: which resource ran out."""
    return {Kind.CONCURRENT: "requests", Kind.REQUESTS: "requests", Kind.TOKENS: "tokens"}.get(check.kind, "requests")


def rate_headers(checks: Sequence[Check], states: Sequence[CheckState]) -> Headers:
    """x-ratelimit-{limit,remaining,reset}-{requests,tokens} of the tightest requests and tokens bucket."""
    headers: list[tuple[str, str]] = []
    for kind, name in ((Kind.REQUESTS, "requests"), (Kind.TOKENS, "tokens")):
        tightest = min(
            ((state, check) for check, state in zip(checks, states, strict=True) if check.kind is kind),
            key=lambda pair: pair[0].remaining,
            default=None,
        )
        if tightest is None:
            continue
        state, check = tightest
        headers += [
            (f"x-ratelimit-limit-{name}", str(check.limit)),
            (f"x-ratelimit-remaining-{name}", str(state.remaining)),
            (f"x-ratelimit-reset-{name}", duration(state.reset_seconds)),
        ]
    return tuple(headers)


def duration(seconds: float) -> str:
    """A duration as OpenAI writes its reset headers: 20ms, 1s, 6m0s, 1h2m3s (and 2d3h0m0s for a budget)."""
    if seconds < 1:
        return f"{max(math.ceil(seconds * 1000), 0)}ms"
    total = math.ceil(seconds)
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours}h{minutes}m{secs}s"
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"
