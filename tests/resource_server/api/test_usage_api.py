"""GET /resource_server/v1/usage: the caller's own usage per day and model, from the daily rollup the usage writer
keeps; a bad period is a 400 in OpenAI's envelope naming the parameter."""

from __future__ import annotations

import uuid
from datetime import UTC, date, datetime, timedelta
from typing import Any

import orjson
import pytest
from asgiref.sync import sync_to_async
from django.db import transaction
from django.test import AsyncClient
from django.utils import timezone

from resource_server.models import Project, UsageDaily, User
from resource_server.services.api_keys import api_key_create
from resource_server.services.usage import UsageRecord, _insert_rows

pytestmark = pytest.mark.django_db(transaction=True)

URL = "/resource_server/v1/usage"


@pytest.fixture
def ada() -> tuple[User, dict[str, str]]:
    user = User.objects.create(identity_id="id-ada", username="ada@anl.gov")
    _, key = api_key_create(owner=user, name="test")
    return user, {"Authorization": f"Bearer {key}"}


async def _get(query: str, auth: dict[str, str]) -> tuple[int, dict[str, Any]]:
    response = await AsyncClient().get(f"{URL}{query}", headers=auth)
    return response.status_code, orjson.loads(response.content)


async def test_the_callers_usage_by_day_and_model_with_totals(ada: tuple[User, dict[str, str]]) -> None:
    user, auth = ada
    bob = await User.objects.acreate(identity_id="id-bob", username="bob@anl.gov")
    project = await Project.objects.acreate(name="climate", globus_group=uuid.uuid4())
    rows = [
        # Two rows of one day and model (other key, other project) add up; other days and models stay apart.
        dict(day=date(2026, 11, 2), model="llama", requests=3, errors=1, prompt_tokens=30, completion_tokens=6,
             total_tokens=36, latency_ms_sum=300.0, api_key_prefix="igw_a"),
        dict(day=date(2026, 11, 2), model="llama", requests=1, prompt_tokens=10, completion_tokens=2,
             total_tokens=12, latency_ms_sum=100.0, project_id=project.pk),
        dict(day=date(2026, 11, 1), model="mistral", requests=2, prompt_tokens=5, completion_tokens=5,
             total_tokens=10, latency_ms_sum=50.0),
        dict(day=date(2026, 10, 31), model="llama", requests=9, total_tokens=900),  # before the period
    ]  # fmt: skip
    for row in rows:
        await UsageDaily.objects.acreate(user_id=user.pk, **row)
    await UsageDaily.objects.acreate(day=date(2026, 11, 2), user_id=bob.pk, model="llama", requests=50)  # not ours

    status, body = await _get("?since=2026-11-01&until=2026-11-30", auth)

    assert status == 200, body
    assert body["object"] == "usage" and body["username"] == "ada@anl.gov"
    assert (body["since"], body["until"]) == ("2026-11-01", "2026-11-30")
    assert body["data"] == [
        {"date": "2026-11-01", "model": "mistral", "requests": 2, "errors": 0, "prompt_tokens": 5,
         "completion_tokens": 5, "total_tokens": 10, "mean_latency_ms": 25.0},
        {"date": "2026-11-02", "model": "llama", "requests": 4, "errors": 1, "prompt_tokens": 40,
         "completion_tokens": 8, "total_tokens": 48, "mean_latency_ms": 100.0},
    ]  # fmt: skip
    assert [(entry["model"], entry["total_tokens"]) for entry in body["models"]] == [("llama", 48), ("mistral", 10)]
    assert body["totals"] == {
        "requests": 6, "errors": 1, "prompt_tokens": 45, "completion_tokens": 13, "total_tokens": 58,
        "mean_latency_ms": 75.0,
    }  # fmt: skip
    assert body["budgets"] == []


async def test_requests_the_usage_writer_stored_are_in_the_answer(ada: tuple[User, dict[str, str]]) -> None:
    user, auth = ada
    now = timezone.now()
    records = [
        UsageRecord(
            request_id=uuid.uuid4().hex,
            user_id=user.pk,
            route="chat/completions",
            created_at=now,
            model="llama",
            status_code=200,
            total_tokens=7,
            latency_ms=10.0,
        )
        for _ in range(3)
    ]

    def insert() -> None:
        with transaction.atomic():
            _insert_rows(records)

    await sync_to_async(insert)()
    status, body = await _get("", auth)
    assert status == 200
    assert body["data"] == [
        {"date": now.date().isoformat(), "model": "llama", "requests": 3, "errors": 0, "prompt_tokens": 0,
         "completion_tokens": 0, "total_tokens": 21, "mean_latency_ms": 10.0},
    ]  # fmt: skip


async def test_the_default_period_is_the_last_30_days_and_days_counts_back_from_until(
    ada: tuple[User, dict[str, str]],
) -> None:
    _, auth = ada
    today = datetime.now(UTC).date()
    status, body = await _get("", auth)
    assert status == 200
    assert (body["since"], body["until"]) == ((today - timedelta(days=29)).isoformat(), today.isoformat())
    status, body = await _get("?days=7&until=2026-11-30", auth)
    assert (body["since"], body["until"]) == ("2026-11-24", "2026-11-30")
    status, body = await _get("?since=2026-11-20&until=2026-11-20", auth)
    assert status == 200 and body["data"] == [] and body["totals"]["requests"] == 0
    assert body["totals"]["mean_latency_ms"] is None


@pytest.mark.parametrize(
    ("query", "param"),
    [
        ("?since=yesterday", "since"),
        ("?since=2026-02-30", "since"),
        ("?until=2026-13-01", "until"),
        ("?since=2026-11-30&until=2026-11-01", "since"),
        ("?since=2024-01-01&until=2026-11-30", "since"),  # longer than 366 days
        ("?days=0", "days"),
        ("?days=367", "days"),
        ("?days=ten", "days"),
        ("?days=7&since=2026-11-01", "days"),
    ],
)
async def test_a_bad_period_is_a_400_naming_its_parameter(
    ada: tuple[User, dict[str, str]], query: str, param: str
) -> None:
    _, auth = ada
    status, body = await _get(query, auth)
    assert status == 400, body
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["param"] == param
    assert body["error"]["type"] == "invalid_request_error"


async def test_usage_needs_credentials() -> None:
    response = await AsyncClient().get(URL)
    assert response.status_code == 401
    assert orjson.loads(response.content)["error"]["code"] == "missing_credentials"
