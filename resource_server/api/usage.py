"""Your own usage: requests and tokens per day and model, read from the daily rollup (`GET /v1/usage`)."""

from __future__ import annotations

import contextlib
import datetime as dt
import re
from typing import Annotated, Any, Literal

from django.http import HttpRequest
from django.utils import timezone
from ninja import Field, Query, Router, Schema

from resource_server.api.openapi import AUTHENTICATED, REQUEST_ID_HEADER, documented
from resource_server.api.security import bearer_auth
from resource_server.auth.base import Principal
from resource_server.bootstrap import runtime
from resource_server.db import db_run
from resource_server.errors import InvalidRequest
from resource_server.selectors.usage import UsageLine, UsageSums, UserUsage, user_usage_get

router = Router(auth=bearer_auth, tags=["Account"])

DEFAULT_DAYS = 30
MAX_DAYS = 366  # a leap year: what the daily rollup answers cheaply for one user, and what a report needs
_ISO_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")


class UsageTotalsOut(Schema):
    requests: int = Field(description="Requests made, whatever their outcome.")
    errors: int = Field(description="Requests answered with a status of 400 or above.")
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int = Field(description="As the model server reported them; requests without usage count 0.")
    mean_latency_ms: float | None = Field(description="Mean time from request to answer's end; null: no requests.")

    @staticmethod
    def fields_of(sums: UsageSums) -> dict[str, Any]:
        return {
            "requests": sums.requests,
            "errors": sums.errors,
            "prompt_tokens": sums.prompt_tokens,
            "completion_tokens": sums.completion_tokens,
            "total_tokens": sums.total_tokens,
            "mean_latency_ms": None if sums.mean_latency_ms is None else round(sums.mean_latency_ms, 1),
        }


class UsageDayOut(UsageTotalsOut):
    date: dt.date = Field(description="The UTC day.")
    model: str = Field(description="The model name as requests named it.")


class UsageModelOut(UsageTotalsOut):
    model: str


class BudgetOut(Schema):
    limit: str = Field(description="`tokens_per_day`, `tokens_per_month` or `allocation_tokens`.")
    scope: str = Field(description="Whose budget: `user`, `key`, `project` or `everyone`.")
    scope_name: str = Field(description="The user's, API key's or project's name; empty for `everyone`.")
    model: str = Field(description="The model it is narrowed to; empty: every model.")
    tokens: int = Field(description="The budget.")
    used: int
    remaining: int
    resets_at: dt.datetime | None = Field(description="When it starts again (UTC); null for an allocation.")


class UsageOut(Schema):
    object: Literal["usage"] = "usage"
    username: str
    since: dt.date = Field(description="First UTC day of the period.")
    until: dt.date = Field(description="Last UTC day of the period (included).")
    data: list[UsageDayOut] = Field(description="One entry per day and model with requests, oldest first.")
    models: list[UsageModelOut] = Field(description="The period's totals per model.")
    totals: UsageTotalsOut = Field(description="The period's totals.")
    budgets: list[BudgetOut] = Field(
        description="Token budgets that apply to you and what is left of them (empty when none applies)."
    )

    @staticmethod
    def of(usage: UserUsage) -> UsageOut:
        def day(line: UsageLine) -> UsageDayOut:
            return UsageDayOut(date=line.key[0], model=line.key[1], **UsageTotalsOut.fields_of(line.sums))

        return UsageOut(
            username=usage.username,
            since=usage.since,
            until=usage.until,
            data=[day(line) for line in usage.days],
            models=[UsageModelOut(model=line.key[0], **UsageTotalsOut.fields_of(line.sums)) for line in usage.models],
            totals=UsageTotalsOut(**UsageTotalsOut.fields_of(usage.totals)),
            budgets=[BudgetOut.model_validate(budget) for budget in usage.budgets],
        )


def usage_period(since: str | None, until: str | None, days: int | None, *, today: dt.date) -> tuple[dt.date, dt.date]:
    """The period the query asks for, both ends included: `since`/`until`, or the `days` up to `until` (default:
    today), or the last 30 days. A bad value is a 400 naming its parameter."""
    if days is not None and since is not None:
        raise InvalidRequest("Give either `days` or `since`, not both.", param="days")
    last = _date(until, "until") if until is not None else today
    first = _date(since, "since") if since is not None else last - dt.timedelta(days=(days or DEFAULT_DAYS) - 1)
    if first > last:
        raise InvalidRequest(f"`since` ({first}) is after `until` ({last}).", param="since")
    if (last - first).days + 1 > MAX_DAYS:
        raise InvalidRequest(
            f"The period is {(last - first).days + 1} days long; ask for at most {MAX_DAYS} at once.", param="since"
        )
    return first, last


def _date(value: str, param: str) -> dt.date:
    if _ISO_DATE.fullmatch(value):
        with contextlib.suppress(ValueError):  # e.g. 2026-02-30
            return dt.date.fromisoformat(value)
    raise InvalidRequest(f"`{param}` is not a date (YYYY-MM-DD): {value[:40]!r}.", param=param)


Since = Annotated[
    str | None,
    Query(description="First UTC day (YYYY-MM-DD).", example="2026-11-01"),
]
Until = Annotated[
    str | None,
    Query(
        description="Last UTC day, included (default: today).",
        example="2026-11-30",
    ),
]
Days = Annotated[
    int | None,
    Query(
        ge=1,
        le=MAX_DAYS,
        description=f"The period's length in days, up to `until` (default {DEFAULT_DAYS}).",
        example=30,
    ),
]

_DOC = documented(
    "Your own usage (every request of your user, whichever Globus token or API key made it) per UTC day and "
    f"model over a period, with totals per model and overall, and the token budgets that apply to you. The "
    f"period: `since` and `until` (both included), or the `days` up to `until` (default: today); by default "
    f"the last {DEFAULT_DAYS} days, at most {MAX_DAYS} days at once. Read from a daily rollup kept as requests "
    "are recorded: a request appears within a few seconds of its end.",
    "400",
    *AUTHENTICATED,
    ok={"description": "Your usage over the period.", "headers": REQUEST_ID_HEADER},
)


@router.get(
    "/v1/usage",
    response=UsageOut,
    summary="Your usage by day and model",
    operation_id="usage_get",
    openapi_extra=_DOC,
)
async def usage(request: HttpRequest, since: Since = None, until: Until = None, days: Days = None) -> UsageOut:
    first, last = usage_period(since, until, days, today=timezone.now().date())
    principal: Principal = request.auth  # type: ignore[attr-defined]
    rules = (await runtime().routing.table()).limits
    found = await db_run(user_usage_get, principal=principal, since=first, until=last, rules=rules)
    return UsageOut.of(found)
