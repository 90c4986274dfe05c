"""Limits through the full Django stack: 429s like OpenAI's, the x-ratelimit-* headers, budgets that settle to
what a request used, the project a request is charged to, and exempt service accounts."""

from __future__ import annotations

import uuid
from typing import Any

import orjson
import pytest
from asgiref.sync import sync_to_async
from django.test import AsyncClient

from resource_server.bootstrap import runtime
from resource_server.models import Limit, Project, RequestLog
from tests.conftest import Seeded
from tests.resource_server.api.test_inference_api import BASE, error_of, post

pytestmark = pytest.mark.django_db(transaction=True)

# 74 bytes, so a prompt estimate of 19 tokens: with max_tokens 5 the request reserves 24 tokens.
CHAT = {"model": "demo-model", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5}
RESERVED = len(orjson.dumps(CHAT)) // 4 + 1 + 5


async def chat(seeded: Seeded, body: dict[str, Any] = CHAT, **headers: str) -> Any:
    return await post(f"{BASE}/chat/completions", body, seeded, **headers)


async def rows() -> list[RequestLog]:
    assert await sync_to_async(runtime().usage_sink.flush)(timeout=10)
    return [row async for row in RequestLog.objects.order_by("created_at")]


async def test_past_the_requests_per_minute_a_request_gets_openais_429_naming_the_limit(seeded: Seeded) -> None:
    await Limit.objects.acreate(user=seeded.user, requests_per_minute=2)
    first, second, third = [await chat(seeded) for _ in range(3)]
    assert (first.status_code, second.status_code, third.status_code) == (200, 200, 429)
    assert first.headers["x-ratelimit-limit-requests"] == "2"
    assert first.headers["x-ratelimit-remaining-requests"] == "1"
    assert second.headers["x-ratelimit-remaining-requests"] == "0"
    assert third.headers["x-ratelimit-remaining-requests"] == "0"
    assert third.headers["x-ratelimit-reset-requests"].endswith("s")
    error = error_of(third)
    assert (error["code"], error["type"]) == ("rate_limit_exceeded", "requests")
    assert error["message"].startswith("Rate limit reached for requests per minute for user ada@anl.gov: limit 2")
    assert 1 <= int(third.headers["Retry-After"]) <= 30  # a slot comes back every 30 s at 2 a minute
    assert int(third.headers["retry-after-ms"]) > 0
    assert "x-should-retry" not in third.headers
    assert [(row.status_code, row.error_code) for row in await rows()] == [
        (200, ""),
        (200, ""),
        (429, "rate_limit_exceeded"),
    ]


async def test_a_spent_budget_is_insufficient_quota_and_tells_the_client_not_to_retry(seeded: Seeded) -> None:
    await Limit.objects.acreate(user=seeded.user, tokens_per_day=RESERVED + 1)
    assert (await chat(seeded)).status_code == 200  # it uses a few tokens of the budget: what is left is too few
    refused = await chat(seeded)
    assert refused.status_code == 429
    error = error_of(refused)
    assert (error["code"], error["type"]) == ("insufficient_quota", "insufficient_quota")
    assert 1 <= int(refused.headers["Retry-After"]) <= 86400, "it renews at midnight UTC"
    assert "tokens per day for user ada@anl.gov" in error["message"]
    assert refused.headers["x-should-retry"] == "false"
    assert "x-ratelimit-limit-requests" not in refused.headers, "a budget is not a per-minute limit"


async def test_a_budget_settles_to_what_the_request_used(seeded: Seeded) -> None:
    # Room for one reservation only: the second request fits once the first has given back what it did not use.
    await Limit.objects.acreate(user=seeded.user, tokens_per_day=RESERVED + RESERVED // 2)
    first = await chat(seeded)
    assert first.status_code == 200, first.content
    used = orjson.loads(first.content)["usage"]["total_tokens"]
    assert used < RESERVED // 2, "the fake model server counts words: a short prompt, 5 tokens out"
    assert 2 * RESERVED > RESERVED + RESERVED // 2, "without the settling the second would not fit"
    second = await chat(seeded)
    assert second.status_code == 200, second.content


async def test_a_refused_or_failed_request_gives_its_reservation_back(seeded: Seeded) -> None:
    failing = {**CHAT, "fake_vllm": {"status": 500}}
    await Limit.objects.acreate(user=seeded.user, concurrent=1, tokens_per_day=len(orjson.dumps(failing)) // 4 + 6)
    for _ in range(3):
        response = await chat(seeded, failing)
        assert response.status_code >= 500, response.content
    ok = await chat(seeded)
    assert ok.status_code == 200, ok.content


async def test_a_request_larger_than_a_whole_limit_is_told_so_and_not_to_retry(seeded: Seeded) -> None:
    await Limit.objects.acreate(user=seeded.user, tokens_per_minute=RESERVED - 1)
    refused = await chat(seeded)
    assert refused.status_code == 429
    error = error_of(refused)
    assert (error["code"], error["type"]) == ("rate_limit_exceeded", "tokens")
    assert error["message"].startswith(
        f"Request too large for the tokens per minute for user ada@anl.gov: limit {RESERVED - 1}"
    )
    assert refused.headers["x-should-retry"] == "false"


async def test_every_answer_carries_the_tightest_limits_headers(seeded: Seeded) -> None:
    await Limit.objects.acreate(user=seeded.user, requests_per_minute=100, tokens_per_minute=10_000)
    await Limit.objects.acreate(everyone=True, requests_per_minute=5)
    ok = await chat(seeded)
    assert ok.headers["x-ratelimit-limit-requests"] == "5"
    assert ok.headers["x-ratelimit-limit-tokens"] == "10000"
    assert ok.headers["x-ratelimit-remaining-tokens"] == str(10_000 - RESERVED)
    upstream_error = await chat(seeded, {**CHAT, "fake_vllm": {"status": 400, "message": "bad temperature"}})
    assert upstream_error.status_code == 400
    assert upstream_error.headers["x-ratelimit-remaining-requests"] == "3"


async def test_an_exempt_service_account_is_not_limited(seeded: Seeded) -> None:
    await Limit.objects.acreate(everyone=True, requests_per_minute=1)
    seeded.user.limits_exempt = True
    await seeded.user.asave()
    assert [(await chat(seeded)).status_code for _ in range(3)] == [200, 200, 200]


async def test_a_request_is_charged_to_the_project_it_names_if_the_caller_is_a_member(seeded: Seeded) -> None:
    climate = await Project.objects.acreate(name="climate", globus_group=uuid.uuid4())
    await Limit.objects.acreate(project=climate, requests_per_minute=1)
    # An API key's groups are its owner's Globus groups; this owner is in none.
    refused = await chat(seeded, **{"OpenAI-Project": "climate"})
    assert refused.status_code == 403
    assert error_of(refused)["code"] == "project_not_member"
    unknown = await chat(seeded, **{"OpenAI-Project": "proj_abc123"})
    assert unknown.status_code == 200, "a project the gateway does not know (OpenAI's) is ignored"
    assert [row.project_id for row in await rows()] == [None, None]


async def test_the_usage_route_reports_the_budgets_that_apply_and_what_is_left(seeded: Seeded) -> None:
    climate = await Project.objects.acreate(name="climate", globus_group=uuid.uuid4())
    await Limit.objects.acreate(user=seeded.user, tokens_per_day=10_000)
    await Limit.objects.acreate(api_key=seeded.api_key, tokens_per_day=20_000)
    await Limit.objects.acreate(everyone=True, model="demo-model", tokens_per_month=50_000)
    await Limit.objects.acreate(project=climate, tokens_per_day=1)  # not a member: not reported
    ok = await chat(seeded)
    used = orjson.loads(ok.content)["usage"]["total_tokens"]
    await rows()  # written, and so in the daily rollup
    response = await AsyncClient().get(f"{BASE}/usage", headers=seeded.auth)
    assert response.status_code == 200, response.content
    budgets = sorted(orjson.loads(response.content)["budgets"], key=lambda budget: (budget["limit"], budget["tokens"]))
    assert [
        (b["limit"], b["scope"], b["scope_name"], b["model"], b["tokens"], b["used"], b["remaining"]) for b in budgets
    ] == [
        ("tokens_per_day", "user", "ada@anl.gov", "", 10_000, used, 10_000 - used),
        ("tokens_per_day", "key", seeded.api_key.prefix, "", 20_000, used, 20_000 - used),
        ("tokens_per_month", "everyone", "", "demo-model", 50_000, used, 50_000 - used),
    ]
    assert budgets[0]["resets_at"].endswith("T00:00:00Z")
