"""Which limits apply to a request, what it reserves, and how refusals and headers read."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from resource_server.limits.base import Check, CheckState, Kind
from resource_server.limits.policy import (
    Demand,
    LimitRules,
    ProjectRef,
    ProjectRefused,
    Rule,
    Scope,
    checks_for,
    demand_of,
)
from resource_server.pipeline.admit import duration, rate_headers

NOW = datetime(2026, 11, 30, 15, 30, tzinfo=UTC).timestamp()
CLIMATE = ProjectRef(1, "climate", "g-climate")
FUSION = ProjectRef(2, "fusion", "g-fusion")


def test_a_request_without_max_tokens_reserves_the_models_whole_context() -> None:
    assert demand_of(body_size=400, max_tokens=None, n=1, generates=True, context_length=8192) == Demand(8192)


def test_a_request_reserves_its_prompt_estimate_plus_max_tokens_for_each_choice() -> None:
    assert demand_of(body_size=401, max_tokens=50, n=2, generates=True, context_length=8192) == Demand(101 + 100)


def test_an_absurd_max_tokens_reserves_at_most_the_context_length() -> None:
    assert demand_of(body_size=40, max_tokens=10**12, n=1, generates=True, context_length=4096) == Demand(4096)
    assert demand_of(body_size=40, max_tokens=10**12, n=3, generates=True, context_length=4096) == Demand(3 * 4096)


def test_a_route_that_generates_nothing_reserves_its_prompt_only() -> None:
    assert demand_of(body_size=4000, max_tokens=None, n=1, generates=False, context_length=8192) == Demand(1000)


def test_every_applicable_rule_is_checked_each_on_its_own_counter() -> None:
    rules = [
        Rule(Scope.USER, 7, "jdoe", requests_per_minute=10),
        Rule(Scope.EVERYONE, 0, "every user", requests_per_minute=100, concurrent=4),
        Rule(Scope.PROJECT, 1, "climate", tokens_per_day=10_000),
        Rule(Scope.USER, 7, "jdoe", model="other-model", concurrent=1),  # another model: does not apply
        Rule(Scope.KEY, 3, "igw_abc", endpoint_id=9, tokens_per_minute=500),  # another endpoint: does not apply
    ]
    checks, spans = checks_for(
        rules, user_id=7, username="jdoe", model="llama", endpoint_id=5, demand=Demand(120), now=NOW
    )
    assert [(check.key, check.kind, check.limit, check.amount) for check in checks] == [
        ("r:u7:*", Kind.REQUESTS, 10, 1),
        ("c:e:u7:*", Kind.CONCURRENT, 4, 1),
        ("r:e:u7:*", Kind.REQUESTS, 100, 1),
        ("b:p1:*:d20261130", Kind.BUDGET, 10_000, 120),
    ]
    budget = checks[-1]
    assert budget.period_end == datetime(2026, 12, 1, tzinfo=UTC).timestamp()
    assert budget.label == "tokens per day for project climate"
    assert list(spans) == ["b:p1:*:d20261130"]
    assert spans[budget.key].first_day.isoformat() == "2026-11-30"


def test_two_rules_on_one_scope_and_narrowing_share_counters_and_the_tighter_holds() -> None:
    rules = [Rule(Scope.USER, 7, "jdoe", concurrent=5), Rule(Scope.USER, 7, "jdoe", concurrent=2)]
    checks, _ = checks_for(rules, user_id=7, username="jdoe", model="m", endpoint_id=1, demand=Demand(1), now=NOW)
    assert [(check.key, check.limit) for check in checks] == [("c:u7:*", 2)]


def test_monthly_and_allocation_budgets_name_their_period() -> None:
    starts, ends = datetime(2026, 10, 1, tzinfo=UTC), datetime(2027, 4, 1, tzinfo=UTC)
    rule = Rule(
        Scope.PROJECT, 1, "climate", model="llama", tokens_per_month=5, allocation_tokens=9,
        allocation_starts=starts, allocation_ends=ends,
    )  # fmt: skip
    checks, spans = checks_for(
        [rule], user_id=7, username="jdoe", model="llama", endpoint_id=1, demand=Demand(1), now=NOW
    )
    assert [(check.key, check.limit, check.period_end) for check in checks] == [
        ("b:p1:m=llama:m202611", 5, datetime(2026, 12, 1, tzinfo=UTC).timestamp()),
        ("b:p1:m=llama:a202610010000-202704010000", 9, ends.timestamp()),
    ]
    assert checks[1].label == "tokens of the allocation for project climate on llama"
    assert spans[checks[1].key].first_day.isoformat() == "2026-10-01"


def test_outside_its_allocation_period_a_scope_has_nothing_to_spend() -> None:
    rule = Rule(
        Scope.PROJECT, 1, "climate", allocation_tokens=9,
        allocation_starts=datetime(2027, 1, 1, tzinfo=UTC), allocation_ends=datetime(2027, 6, 1, tzinfo=UTC),
    )  # fmt: skip
    checks, _ = checks_for([rule], user_id=7, username="jdoe", model="m", endpoint_id=1, demand=Demand(1), now=NOW)
    assert [(check.kind, check.limit) for check in checks] == [(Kind.BUDGET, 0)]


def test_a_request_is_charged_to_the_project_it_names_or_else_the_callers_first() -> None:
    rules = LimitRules(projects=[CLIMATE, FUSION])
    both = frozenset({"g-climate", "g-fusion"})
    assert rules.project_for(both, "") == CLIMATE
    assert rules.project_for(both, "fusion") == FUSION
    assert rules.project_for(both, "g-fusion") == FUSION, "the group id names it too"
    assert rules.project_for(frozenset({"g-fusion"}), "") == FUSION
    assert rules.project_for(frozenset(), "") is None
    # A name the gateway does not know (the OpenAI client sends OPENAI_PROJECT_ID, meant for OpenAI): ignored.
    assert rules.project_for(both, "proj_abc123") == CLIMATE
    with pytest.raises(ProjectRefused):
        rules.project_for(frozenset({"g-climate"}), "fusion")


def test_rate_headers_name_the_tightest_requests_and_tokens_limits() -> None:
    checks = [
        Check("r:u7:*", Kind.REQUESTS, 10, 1),
        Check("r:e:u7:*", Kind.REQUESTS, 100, 1),
        Check("t:u7:*", Kind.TOKENS, 5000, 300),
        Check("b:u7:*:d20261130", Kind.BUDGET, 9, 300),
    ]
    states = [CheckState(9, 6.0), CheckState(40, 0.5), CheckState(4700, 3.6), CheckState(0, 3600)]
    assert rate_headers(checks, states) == (
        ("x-ratelimit-limit-requests", "10"),
        ("x-ratelimit-remaining-requests", "9"),
        ("x-ratelimit-reset-requests", "6s"),
        ("x-ratelimit-limit-tokens", "5000"),
        ("x-ratelimit-remaining-tokens", "4700"),
        ("x-ratelimit-reset-tokens", "4s"),
    )
    assert rate_headers(checks[3:], states[3:]) == ()


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0ms"), (0.0201, "21ms"), (1, "1s"), (59.2, "1m0s"), (360, "6m0s"), (3723, "1h2m3s"), (90061, "1d1h1m1s")],
)
def test_durations_read_as_openai_writes_them(seconds: float, text: str) -> None:
    assert duration(seconds) == text
