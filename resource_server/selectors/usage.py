"""Reads of usage for people: a user's own (`GET /v1/usage`), the admin's usage page, `manage.py usage_report`.

Everything here reads the daily rollup (`UsageDaily`, kept by the usage writer as rows arrive), never the raw
request rows, so a report costs the same with ten thousand or a hundred million of them; names (users, projects,
endpoints and their clusters) are looked up afterwards, by id, in the small tables that hold them. Days are UTC
days; a period's `until` is included.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import date, timedelta
from typing import Any, Literal, get_args

from django.db.models import QuerySet, Sum

from resource_server.auth.base import Principal
from resource_server.limits.policy import LimitRules
from resource_server.models import Endpoint, Project, UsageDaily, User
from resource_server.selectors.limits import Budget, budgets_left

Dimension = Literal["day", "project", "user", "key", "model", "cluster", "endpoint"]
DIMENSIONS: tuple[Dimension, ...] = get_args(Dimension)
# The rollup's column each dimension is grouped by (a cluster is its endpoints, merged once they are named).
_COLUMN: dict[Dimension, str] = {
    "day": "day",
    "project": "project_id",
    "user": "user_id",
    "key": "api_key_prefix",
    "model": "model",
    "cluster": "endpoint_id",
    "endpoint": "endpoint_id",
}
_SUMS = ("requests", "errors", "prompt_tokens", "completion_tokens", "total_tokens", "latency_ms_sum")
NONE = "(none)"  # a request charged to no project, made without an API key, or never routed to an endpoint
_LOOKUP_CHUNK = 500  # ids per name lookup: under SQLite's limit on a statement's parameters


@dataclass(slots=True)
class UsageSums:
    requests: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    latency_ms_sum: float = 0.0

    @property
    def mean_latency_ms(self) -> float | None:
        return self.latency_ms_sum / self.requests if self.requests else None

    def add(self, other: UsageSums) -> None:
        self.requests += other.requests
        self.errors += other.errors
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens
        self.total_tokens += other.total_tokens
        self.latency_ms_sum += other.latency_ms_sum

    @staticmethod
    def of(values: Sequence[Any]) -> UsageSums:
        """From the sums in the order of `_SUMS` (None, for no rows, is 0)."""
        requests, errors, prompt, completion, total, latency = values
        return UsageSums(
            requests=requests or 0,
            errors=errors or 0,
            prompt_tokens=prompt or 0,
            completion_tokens=completion or 0,
            total_tokens=total or 0,
            latency_ms_sum=latency or 0.0,
        )


@dataclass(frozen=True, slots=True)
class UsageLine:
    """The usage of one group: `key` holds its value of each dimension asked for, in their order (a `date` for
    `day`, a name for the others)."""

    key: tuple[Any, ...]
    sums: UsageSums


@dataclass(frozen=True, slots=True)
class UsageFilter:
    """Which rows count: a period of UTC days (both included), optionally one user, project or model."""

    since: date
    until: date
    user_id: int | None = None
    project_id: int | None = None
    model: str | None = None

    def rows(self) -> QuerySet[UsageDaily]:
        rows = UsageDaily.objects.filter(day__gte=self.since, day__lte=self.until)
        if self.user_id is not None:
            rows = rows.filter(user_id=self.user_id)
        if self.project_id is not None:
            rows = rows.filter(project_id=self.project_id)
        if self.model is not None:
            rows = rows.filter(model=self.model)
        return rows


def usage_list(*, where: UsageFilter, by: Sequence[Dimension], largest: int | None = None) -> list[UsageLine]:
    """Usage summed per group of `by` (none: one line, the totals), sorted by key; or, with `largest`, only the
    `largest` groups by total tokens, largest first."""
    columns = list(dict.fromkeys(_COLUMN[dimension] for dimension in by))
    sums = {name: Sum(name) for name in _SUMS}
    merges = "cluster" in by  # clusters are known only once endpoints are named: merge, then cut
    if columns:
        rows = where.rows().order_by().values(*columns).annotate(**sums).values_list(*columns, *_SUMS)
        if largest is not None and not merges:
            rows = rows.order_by("-total_tokens", *columns)[:largest]
        fetched = list(rows)
    else:
        totals = where.rows().aggregate(**sums)
        fetched = [tuple(totals[name] for name in _SUMS)]
    at = {column: index for index, column in enumerate(columns)}
    names = _Names.of(fetched, at, by)
    places = [(dimension, at[_COLUMN[dimension]]) for dimension in by]
    width = len(columns)
    lines: dict[tuple[Any, ...], UsageSums] = {}
    for row in fetched:
        key = tuple(names.label(dimension, row[index]) for dimension, index in places)
        found = lines.get(key)
        if found is None:
            lines[key] = UsageSums.of(row[width:])
        else:  # two endpoints of one cluster
            found.add(UsageSums.of(row[width:]))
    if largest is not None:
        ordered = sorted(lines.items(), key=lambda item: (-item[1].total_tokens, _sortable(item[0])))
        return [UsageLine(key, sums) for key, sums in ordered[:largest]]
    return [UsageLine(key, lines[key]) for key in sorted(lines, key=_sortable)]


def usage_columns(by: Sequence[Dimension]) -> list[str]:
    """The column names of a report's rows (`usage_row`): the dimensions, then the sums."""
    return [*by, "requests", "errors", "prompt_tokens", "completion_tokens", "total_tokens", "mean_latency_ms"]


def usage_row(line: UsageLine) -> list[Any]:
    """A line as a report's row, in the order of `usage_columns` (days as ISO dates, the mean latency rounded)."""
    sums = line.sums
    mean = sums.mean_latency_ms
    return [
        *(value.isoformat() if isinstance(value, date) else value for value in line.key),
        sums.requests,
        sums.errors,
        sums.prompt_tokens,
        sums.completion_tokens,
        sums.total_tokens,
        None if mean is None else round(mean, 1),
    ]


def _sortable(key: tuple[Any, ...]) -> tuple[str, ...]:
    return tuple(value.isoformat() if isinstance(value, date) else str(value) for value in key)


class _Names:
    """The names behind the ids of the rows fetched: one lookup per kind, in the small tables."""

    def __init__(self) -> None:
        self.users: dict[int, str] = {}
        self.projects: dict[int, str] = {}
        self.endpoints: dict[int, tuple[str, str]] = {}  # id -> (cluster, "cluster/model (#id)")

    @staticmethod
    def of(rows: list[tuple[Any, ...]], at: dict[str, int], by: Sequence[Dimension]) -> _Names:
        """The names of the ids in `rows`, whose column `name` is at `at[name]`."""
        names = _Names()
        if "user" in by:
            ids = {row[at["user_id"]] for row in rows}
            names.users = dict(_chunked(User.objects.values_list("pk", "username"), ids))
        if "project" in by:
            ids = {row[at["project_id"]] for row in rows} - {0}
            names.projects = dict(_chunked(Project.objects.values_list("pk", "name"), ids))
        if "cluster" in by or "endpoint" in by:
            ids = {row[at["endpoint_id"]] for row in rows} - {0}
            endpoints = Endpoint.objects.values_list("pk", "cluster__name", "model")
            names.endpoints = {
                pk: (cluster, f"{cluster}/{model} (#{pk})") for pk, cluster, model in _chunked(endpoints, ids)
            }
        return names

    def label(self, dimension: Dimension, value: Any) -> Any:
        if dimension == "day":
            return value
        if dimension == "user":
            return self.users.get(value, f"(deleted user #{value})")
        if dimension == "project":
            return self.projects.get(value, f"(deleted project #{value})") if value else NONE
        if dimension == "key":
            return value or NONE
        if dimension == "model":
            return value
        if not value:
            return NONE
        endpoint = self.endpoints.get(value)
        if endpoint is None:
            return f"(deleted endpoint #{value})"
        return endpoint[0] if dimension == "cluster" else endpoint[1]


def _chunked(rows: QuerySet[Any, tuple[Any, ...]], ids: Iterable[int]) -> list[tuple[Any, ...]]:
    wanted = sorted(ids)
    found: list[tuple[Any, ...]] = []
    for start in range(0, len(wanted), _LOOKUP_CHUNK):
        found.extend(rows.filter(pk__in=wanted[start : start + _LOOKUP_CHUNK]))
    return found


# --- one user's own usage (GET /v1/usage)


@dataclass(frozen=True, slots=True)
class UserUsage:
    since: date
    until: date
    username: str
    days: list[UsageLine]  # key: (day, model)
    models: list[UsageLine]  # key: (model,)
    totals: UsageSums
    budgets: list[Budget] = field(default_factory=list)


def user_usage_get(*, principal: Principal, since: date, until: date, rules: LimitRules) -> UserUsage:
    """The caller's own usage per UTC day and model over a period, with totals per model and overall, and the
    token budgets that apply to them (`rules`: the limits as the routing table holds them).

    Every request of the caller's user counts, whichever credential made it (Globus token or any of their API
    keys).
    """
    where = UsageFilter(since=since, until=until, user_id=principal.user_id)
    days = usage_list(where=where, by=("day", "model"))
    models: dict[str, UsageSums] = {}
    totals = UsageSums()
    for line in days:
        models.setdefault(line.key[1], UsageSums()).add(line.sums)
        totals.add(line.sums)
    return UserUsage(
        since=since,
        until=until,
        username=principal.username,
        days=days,
        models=[UsageLine((model,), sums) for model, sums in sorted(models.items())],
        totals=totals,
        budgets=budgets_left(rules=rules, principal=principal, now=time.time()),
    )


# --- the admin's usage page


@dataclass(frozen=True, slots=True)
class UsageOverview:
    where: UsageFilter
    per_day: list[UsageLine]  # key: (day,); every day of the period, zero where nothing was used
    top_users: list[UsageLine]  # key: (username,); by tokens, largest first
    per_project: list[UsageLine]
    per_model: list[UsageLine]
    totals: UsageSums
    projects: list[tuple[int, str]]  # the filter's choices
    models: list[str]


TOP_USERS = 15


def usage_overview_get(*, where: UsageFilter) -> UsageOverview:
    """What the admin's usage page draws: totals per day (the charts), the users who used most tokens, totals per
    project and per model, and the filters' choices (projects; models that endpoints serve, plus the one chosen,
    so a misspelt model name in a request never becomes a choice)."""
    known = dict.fromkeys(sorted(set(Endpoint.objects.values_list("model", flat=True))))
    if where.model is not None:
        known[where.model] = None
    # Days and models from one pass over the period's rows: a few thousand lines, summed both ways here.
    per_day: dict[date, UsageSums] = {}
    per_model: dict[str, UsageSums] = {}
    totals = UsageSums()
    for line in usage_list(where=where, by=("day", "model")):
        day, model = line.key
        per_day.setdefault(day, UsageSums()).add(line.sums)
        per_model.setdefault(model, UsageSums()).add(line.sums)
        totals.add(line.sums)
    days = (where.until - where.since).days + 1
    every_day = [where.since + timedelta(days=offset) for offset in range(days)]
    return UsageOverview(
        where=where,
        per_day=[UsageLine((day,), per_day.get(day, UsageSums())) for day in every_day],
        top_users=usage_list(where=where, by=("user",), largest=TOP_USERS),
        per_project=usage_list(where=where, by=("project",)),
        per_model=[UsageLine((model,), sums) for model, sums in sorted(per_model.items())],
        totals=totals,
        projects=list(Project.objects.order_by("name").values_list("pk", "name")),
        models=sorted(known),
    )
