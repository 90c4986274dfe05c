"""Which limits apply to a request, as `Check`s for the store, and what a request may use at worst.

The rules are read with the routing table (selectors/limits.py loads them; the table's reload brings admin edits
within ROUTING_CACHE_SECONDS), so deciding costs no database query. Every rule that applies is checked (the
tightest wins): the caller's user, API key, project and `everyone` rules, each narrowed or not to the model or to
the endpoint the request goes to first. Counters are per scope and narrowing, not per rule, so an admin who
changes a limit's value keeps what was already used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from enum import StrEnum

from resource_server.limits.base import Check, Kind

# Checks kept per caller and route (see LimitRules.checks); past this many, the cache starts again.
_PLANS_KEPT = 10_000
_TAKES_TOKENS = (Kind.TOKENS, Kind.BUDGET)

# A prompt's tokens, estimated from the body's size before the model server has counted them: about four bytes
# a token for English text; the reservation is settled to the real count when the request ends.
BYTES_PER_TOKEN = 4


class Scope(StrEnum):
    USER = "u"
    KEY = "k"
    PROJECT = "p"
    EVERYONE = "e"  # counted per user: the key names the user too


@dataclass(frozen=True, slots=True)
class Rule:
    """One `Limit` row, as the limiter reads it."""

    scope: Scope
    scope_id: int  # the user's, key's or project's id; 0 for everyone
    scope_name: str  # for messages: a username, a key prefix, a project name
    model: str = ""
    endpoint_id: int | None = None
    concurrent: int | None = None
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    tokens_per_day: int | None = None
    tokens_per_month: int | None = None
    allocation_tokens: int | None = None
    allocation_starts: datetime | None = None
    allocation_ends: datetime | None = None

    def applies_to(self, model: str, endpoint_id: int) -> bool:
        return (not self.model or self.model == model) and (self.endpoint_id is None or self.endpoint_id == endpoint_id)


@dataclass(frozen=True, slots=True)
class ProjectRef:
    id: int
    name: str
    group: str  # the Globus group id, as in a Principal's groups


@dataclass(slots=True)
class LimitRules:
    """Every limit and project, indexed the way a request looks them up."""

    by_user: dict[int, list[Rule]] = field(default_factory=dict)
    by_key: dict[int, list[Rule]] = field(default_factory=dict)
    by_project: dict[int, list[Rule]] = field(default_factory=dict)
    everyone: list[Rule] = field(default_factory=list)
    projects: list[ProjectRef] = field(default_factory=list)  # by name
    # (user, username, key, project, model, endpoint) -> its checks, until the next period boundary
    _plans: dict[tuple[int, str, int | None, int | None, str, int], CheckPlan] = field(
        default_factory=dict, repr=False, compare=False
    )

    @property
    def empty(self) -> bool:
        """No limit at all (projects may still be set, to charge requests to)."""
        return not (self.by_user or self.by_key or self.by_project or self.everyone)

    def project_for(self, groups: frozenset[str], asked: str) -> ProjectRef | None:
        """The project a request is charged to: the one named by the OpenAI-Project header if the caller belongs
        to it, else the caller's first project by name; None if the caller is in none.

        A header naming no project the gateway knows is ignored (the OpenAI client sends OPENAI_PROJECT_ID, set
        for OpenAI's own service, to whatever base URL it talks to); one naming a project the caller is not in
        is refused by the caller (`ProjectRefused`)."""
        asked = asked.strip()
        mine = [project for project in self.projects if project.group in groups]
        if asked:
            for project in self.projects:
                if asked in (project.name, project.group):
                    if project not in mine:
                        raise ProjectRefused(project.name)
                    return project
        return mine[0] if mine else None

    def rules_for(self, *, user_id: int, key_id: int | None, project_id: int | None) -> list[Rule]:
        rules = [*self.by_user.get(user_id, ()), *self.everyone]
        if key_id is not None:
            rules += self.by_key.get(key_id, ())
        if project_id is not None:
            rules += self.by_project.get(project_id, ())
        return rules

    def plan(
        self,
        *,
        user_id: int,
        username: str,
        key_id: int | None,
        project_id: int | None,
        model: str,
        endpoint_id: int,
        now: float,
    ) -> CheckPlan:
        """The checks of this caller's rules that apply to the request (`checks_for`), but for each request's demand.
        They do not change from one request to the next (which rules apply, their counters, labels and periods),
        so they are worked out once per caller and route and kept until the next boundary of a period (midnight
        UTC, an allocation's start or end). These rules are replaced as a whole when the limits are reloaded, and
        the kept plans with them."""
        plan_key = (user_id, username, key_id, project_id, model, endpoint_id)
        plan = self._plans.get(plan_key)
        if plan is None or now >= plan.until:
            if len(self._plans) >= _PLANS_KEPT:
                self._plans.clear()
            rules = self.rules_for(user_id=user_id, key_id=key_id, project_id=project_id)
            checks, spans = checks_for(
                rules,
                user_id=user_id,
                username=username,
                model=model,
                endpoint_id=endpoint_id,
                demand=Demand(0),
                now=now,
            )
            plan = self._plans[plan_key] = CheckPlan(tuple(checks), spans, _next_boundary(rules, now))
        return plan


@dataclass(frozen=True, slots=True)
class CheckPlan:
    """A caller's checks on one route, good until `until` (epoch seconds), their token amounts left to each
    request's demand."""

    templates: tuple[Check, ...]
    spans: dict[str, BudgetSpan]
    until: float

    def checks(self, demand: Demand) -> list[Check]:
        tokens = demand.tokens
        return [
            Check(check.key, check.kind, check.limit, tokens, check.window, check.period_end, check.label)
            if check.kind in _TAKES_TOKENS
            else check
            for check in self.templates
        ]


def _next_boundary(rules: list[Rule], now: float) -> float:
    """When the checks of `rules` next change by themselves: the next midnight UTC (a day's or a month's budget
    starts), or an allocation's start or end if sooner."""
    moment = datetime.fromtimestamp(now, UTC)
    boundary = moment.replace(hour=0, minute=0, second=0, microsecond=0) + timedelta(days=1)
    for rule in rules:
        for edge in (rule.allocation_starts, rule.allocation_ends):
            if edge is not None and moment < edge < boundary:
                boundary = edge
    return boundary.timestamp()


class ProjectRefused(Exception):
    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


@dataclass(frozen=True, slots=True)
class BudgetSpan:
    """What a budget counts, for reading its used tokens back from the daily rollup (a missing counter)."""

    scope: Scope
    scope_id: int
    user_id: int  # the everyone scope counts each user's tokens
    model: str
    endpoint_id: int | None
    first_day: date
    last_day: date
    field: str = ""  # the Limit field it comes from: tokens_per_day, tokens_per_month or allocation_tokens
    key_prefix: str = ""  # the key scope's key, as usage rows name it (the rule's scope_name)


@dataclass(frozen=True, slots=True)
class Demand:
    """What one request may use at worst, for the token limits."""

    tokens: int


def demand_of(*, body_size: int, max_tokens: int | None, n: int, generates: bool, context_length: int) -> Demand:
    """The request's worst case: its prompt estimated from the body's size, plus `max_tokens` for each of its `n`
    choices, or the model's whole context when it sets none (vLLM's default then fills the context); never more
    than `n` whole contexts, so an absurd `max_tokens` reserves at most the context length."""
    prompt = math.ceil(body_size / BYTES_PER_TOKEN)
    if not generates:
        return Demand(min(prompt, context_length))
    whole = context_length * n
    if max_tokens is None or max_tokens < 0:
        return Demand(whole)
    return Demand(min(prompt + max_tokens * n, whole))


def checks_for(
    rules: list[Rule], *, user_id: int, username: str, model: str, endpoint_id: int, demand: Demand, now: float
) -> tuple[list[Check], dict[str, BudgetSpan]]:
    """The checks of every rule that applies, and how to read back each budget's used tokens."""
    checks: list[Check] = []
    spans: dict[str, BudgetSpan] = {}
    moment = datetime.fromtimestamp(now, UTC)
    for rule in rules:
        if not rule.applies_to(model, endpoint_id):
            continue
        base = _counter_name(rule, user_id)
        who = _who(rule, username)
        on = f" on {rule.model}" if rule.model else f" on endpoint {rule.endpoint_id}" if rule.endpoint_id else ""
        if rule.concurrent is not None:
            checks.append(
                Check(f"c:{base}", Kind.CONCURRENT, rule.concurrent, 1, label=f"concurrent requests{who}{on}")
            )
        if rule.requests_per_minute is not None:
            checks.append(
                Check(f"r:{base}", Kind.REQUESTS, rule.requests_per_minute, 1, label=f"requests per minute{who}{on}")
            )
        if rule.tokens_per_minute is not None:
            checks.append(
                Check(
                    f"t:{base}", Kind.TOKENS, rule.tokens_per_minute, demand.tokens, label=f"tokens per minute{who}{on}"
                )
            )
        for limit, start, end, name, words, field_name in _periods(rule, moment):
            key = f"b:{base}:{name}"
            checks.append(
                Check(key, Kind.BUDGET, limit, demand.tokens, period_end=end.timestamp(), label=f"{words}{who}{on}")
            )
            spans[key] = BudgetSpan(
                rule.scope,
                rule.scope_id,
                user_id,
                rule.model,
                rule.endpoint_id,
                start.date(),
                end.date(),
                field_name,
                key_prefix=rule.scope_name if rule.scope is Scope.KEY else "",
            )
    return _tightest_per_counter(checks), spans


def _tightest_per_counter(checks: list[Check]) -> list[Check]:
    """One check per counter: two rules of one scope and narrowing (an admin may add both) share their counters,
    and the tighter limit is the one that holds."""
    kept: dict[str, Check] = {}
    for check in checks:
        other = kept.get(check.key)
        if other is None or check.limit < other.limit:
            kept[check.key] = check
    return list(kept.values())


def _counter_name(rule: Rule, user_id: int) -> str:
    scope = f"{rule.scope}{rule.scope_id}" if rule.scope is not Scope.EVERYONE else f"e:u{user_id}"
    narrowing = f"m={rule.model}" if rule.model else f"n{rule.endpoint_id}" if rule.endpoint_id else "*"
    return f"{scope}:{narrowing}"


def _who(rule: Rule, username: str) -> str:
    match rule.scope:
        case Scope.USER | Scope.EVERYONE:
            return f" for user {username}"
        case Scope.KEY:
            return f" for API key {rule.scope_name}"
        case Scope.PROJECT:
            return f" for project {rule.scope_name}"


def _periods(rule: Rule, moment: datetime) -> list[tuple[int, datetime, datetime, str, str, str]]:
    """The budgets in force at `moment`: (limit, start, end, counter suffix, words, the Limit's field)."""
    periods = []
    if rule.tokens_per_day is not None:
        day = moment.replace(hour=0, minute=0, second=0, microsecond=0)
        periods.append(
            (rule.tokens_per_day, day, day + timedelta(days=1), f"d{day:%Y%m%d}", "tokens per day", "tokens_per_day")
        )
    if rule.tokens_per_month is not None:
        month = moment.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        following = (month + timedelta(days=32)).replace(day=1)
        periods.append(
            (rule.tokens_per_month, month, following, f"m{month:%Y%m}", "tokens per month", "tokens_per_month")
        )
    starts, ends = rule.allocation_starts, rule.allocation_ends
    if rule.allocation_tokens is not None and starts is not None and ends is not None:
        if moment < starts or moment >= ends:
            # Outside its allocation period a scope has no allocation: nothing to spend.
            words = f"allocation (its period is {starts:%Y-%m-%d %H:%M} to {ends:%Y-%m-%d %H:%M} UTC)"
            periods.append(
                (0, moment, moment + timedelta(days=1), f"a{moment:%Y%m%d}-none", words, "allocation_tokens")
            )
        else:
            periods.append(
                (
                    rule.allocation_tokens,
                    starts,
                    ends,
                    f"a{starts:%Y%m%d%H%M}-{ends:%Y%m%d%H%M}",
                    "tokens of the allocation",
                    "allocation_tokens",
                )
            )
    return periods
