"""Reading limits and usage for the limiter: its rules (with the routing table) and the tokens a budget used."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from django.db.models import Sum

from resource_server.auth.base import Principal
from resource_server.limits.policy import BudgetSpan, Demand, LimitRules, ProjectRef, Rule, Scope, checks_for
from resource_server.models import Limit, Project, UsageDaily


def limit_rules_load() -> LimitRules:
    """Every limit and project (a few rows: read whole with the routing table)."""
    by_user: dict[int, list[Rule]] = {}
    by_key: dict[int, list[Rule]] = {}
    by_project: dict[int, list[Rule]] = {}
    everyone: list[Rule] = []
    for row in Limit.objects.select_related("user", "api_key", "project"):
        if row.user is not None:
            scope, scope_id, name = Scope.USER, row.user.pk, row.user.username
            into = by_user.setdefault(scope_id, [])
        elif row.api_key is not None:
            scope, scope_id, name = Scope.KEY, row.api_key.pk, row.api_key.prefix
            into = by_key.setdefault(scope_id, [])
        elif row.project is not None:
            scope, scope_id, name = Scope.PROJECT, row.project.pk, row.project.name
            into = by_project.setdefault(scope_id, [])
        else:
            scope, scope_id, name, into = Scope.EVERYONE, 0, "every user", everyone
        into.append(
            Rule(
                scope=scope,
                scope_id=scope_id,
                scope_name=name,
                model=row.model,
                endpoint_id=row.endpoint_id,
                concurrent=row.concurrent,
                requests_per_minute=row.requests_per_minute,
                tokens_per_minute=row.tokens_per_minute,
                tokens_per_day=row.tokens_per_day,
                tokens_per_month=row.tokens_per_month,
                allocation_tokens=row.allocation_tokens,
                allocation_starts=row.allocation_starts,
                allocation_ends=row.allocation_ends,
            )
        )
    projects = [ProjectRef(project.pk, project.name, str(project.globus_group)) for project in Project.objects.all()]
    return LimitRules(by_user, by_key, by_project, everyone, projects)


def budget_used(span: BudgetSpan) -> int:
    """Tokens the budget's scope used in its period so far, from the daily rollup (rows still queued in a
    worker's usage writer are not in it yet)."""
    rows = UsageDaily.objects.filter(day__gte=span.first_day, day__lte=span.last_day)
    match span.scope:
        case Scope.USER | Scope.EVERYONE:
            rows = rows.filter(user_id=span.user_id)
        case Scope.KEY:
            rows = rows.filter(api_key_prefix=span.key_prefix)
        case Scope.PROJECT:
            rows = rows.filter(project_id=span.scope_id)
    if span.model:
        rows = rows.filter(model=span.model)
    if span.endpoint_id is not None:
        rows = rows.filter(endpoint_id=span.endpoint_id)
    return int(rows.aggregate(used=Sum("total_tokens"))["used"] or 0)


@dataclass(frozen=True, slots=True)
class Budget:
    """A token budget that applies to the caller, and what is left of it (the usage route reports them)."""

    limit: str  # which budget: tokens_per_day, tokens_per_month or allocation_tokens
    scope: str  # whose: user, key, project or everyone
    scope_name: str  # the user's, key's or project's name; empty for everyone
    model: str  # the model it is narrowed to; empty: every model
    tokens: int
    used: int
    remaining: int
    resets_at: datetime | None  # UTC: when a day's or month's budget starts again; None for an allocation


_SCOPE_WORDS = {Scope.USER: "user", Scope.KEY: "key", Scope.PROJECT: "project", Scope.EVERYONE: "everyone"}


def budgets_left(*, rules: LimitRules, principal: Principal, now: float) -> list[Budget]:
    """The caller's budgets (their own, their key's, every user's, and each of their projects'), with the tokens
    used so far as the daily rollup counts them (a request still running is not in it yet)."""
    mine = [project.id for project in rules.projects if project.group in principal.groups]
    applicable = rules.rules_for(user_id=principal.user_id, key_id=principal.api_key_id, project_id=None)
    for project_id in mine:
        applicable += rules.by_project.get(project_id, ())
    left = []
    for rule in applicable:
        checks, spans = checks_for(
            [rule],
            user_id=principal.user_id,
            username=principal.username,
            model=rule.model,
            endpoint_id=rule.endpoint_id or 0,
            demand=Demand(0),
            now=now,
        )
        for check in checks:
            span = spans.get(check.key)
            if span is None:
                continue
            used = budget_used(span)
            allocation = span.field == "allocation_tokens"
            left.append(
                Budget(
                    limit=span.field,
                    scope=_SCOPE_WORDS[rule.scope],
                    scope_name="" if rule.scope is Scope.EVERYONE else rule.scope_name,
                    model=rule.model,
                    tokens=check.limit,
                    used=used,
                    remaining=max(check.limit - used, 0),
                    resets_at=None if allocation else datetime.fromtimestamp(check.period_end, UTC),
                )
            )
    return left
