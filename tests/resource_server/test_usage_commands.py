"""manage.py usage_report (usage from the daily rollup, by any dimensions, names not ids, CSV or JSON) and
manage.py prune_usage (raw rows past USAGE_RETENTION_DAYS deleted in batches, the rollup kept)."""

from __future__ import annotations

import csv
import io
import uuid
from datetime import timedelta
from typing import Any

import orjson
import pytest
from django.conf import settings
from django.core.management import CommandError, call_command
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from resource_server.models import Cluster, Endpoint, Project, RequestLog, UsageDaily, User

pytestmark = pytest.mark.django_db


@pytest.fixture
def usage() -> dict[str, Any]:
    today = timezone.now().date()
    polaris, aurora = Cluster.objects.create(name="polaris"), Cluster.objects.create(name="aurora")
    llama = Endpoint.objects.create(cluster=polaris, model="llama", backend_config={"base_url": "http://a:1/v1"})
    other = Endpoint.objects.create(cluster=aurora, model="llama", backend_config={"base_url": "http://b:1/v1"})
    ada = User.objects.create(identity_id="id-ada", username="ada@anl.gov")
    climate = Project.objects.create(name="climate", globus_group=uuid.uuid4())
    rows = [
        # (days ago, user id, project id, key, model, endpoint id, requests, tokens)
        (0, ada.pk, climate.pk, "igw_aaaa", "llama", llama.pk, 2, 200),
        (1, ada.pk, climate.pk, "igw_bbbb", "llama", other.pk, 3, 300),
        (2, ada.pk, 0, "", "mistral", 0, 1, 0),  # no project, no key, never routed (e.g. a 404)
        (5, 9999, climate.pk, "igw_cccc", "llama", 8888, 4, 400),  # a user and an endpoint deleted since
        (40, ada.pk, climate.pk, "igw_aaaa", "llama", llama.pk, 50, 5000),  # outside 30 days
    ]
    for days_ago, user_id, project_id, key, model, endpoint_id, requests, tokens in rows:
        UsageDaily.objects.create(
            day=today - timedelta(days=days_ago),
            user_id=user_id,
            project_id=project_id,
            api_key_prefix=key,
            model=model,
            endpoint_id=endpoint_id,
            requests=requests,
            total_tokens=tokens,
            latency_ms_sum=requests * 10.0,
        )
    return {"today": today}


def _report(*arguments: str) -> str:
    out = io.StringIO()
    call_command("usage_report", *arguments, stdout=out)
    return out.getvalue()


def test_report_by_project_and_model_as_csv_names_things(usage: dict[str, Any]) -> None:
    rows = list(csv.reader(io.StringIO(_report("--since", "30d", "--by", "project,model", "--format", "csv"))))
    assert rows == [
        ["project", "model", "requests", "errors", "prompt_tokens", "completion_tokens", "total_tokens",
         "mean_latency_ms"],
        ["(none)", "mistral", "1", "0", "0", "0", "0", "10.0"],
        ["climate", "llama", "9", "0", "0", "0", "900", "10.0"],
    ]  # fmt: skip


def test_report_by_user_key_cluster_and_endpoint(usage: dict[str, Any]) -> None:
    rows = list(csv.DictReader(io.StringIO(_report("--by", "user,key,cluster,endpoint"))))
    found = {(row["user"], row["key"], row["cluster"], row["endpoint"]): int(row["requests"]) for row in rows}
    llama = Endpoint.objects.get(cluster__name="polaris").pk
    other = Endpoint.objects.get(cluster__name="aurora").pk
    assert found == {
        ("ada@anl.gov", "igw_aaaa", "polaris", f"polaris/llama (#{llama})"): 2,
        ("ada@anl.gov", "igw_bbbb", "aurora", f"aurora/llama (#{other})"): 3,
        ("ada@anl.gov", "(none)", "(none)", "(none)"): 1,
        ("(deleted user #9999)", "igw_cccc", "(deleted endpoint #8888)", "(deleted endpoint #8888)"): 4,
    }


def test_report_by_cluster_merges_its_endpoints(usage: dict[str, Any]) -> None:
    report = orjson.loads(_report("--since", "90d", "--by", "cluster", "--format", "json", "--model", "llama"))
    assert report["by"] == ["cluster"]
    assert {row["cluster"]: row["total_tokens"] for row in report["rows"]} == {
        "(deleted endpoint #8888)": 400,
        "aurora": 300,
        "polaris": 5200,
    }


def test_report_as_json_per_day_with_a_date_since(usage: dict[str, Any]) -> None:
    today = usage["today"]
    since = today - timedelta(days=1)
    report = orjson.loads(_report("--since", since.isoformat(), "--format", "json"))
    assert (report["since"], report["until"]) == (since.isoformat(), today.isoformat())
    assert [(row["day"], row["requests"]) for row in report["rows"]] == [(since.isoformat(), 3), (today.isoformat(), 2)]
    totals = orjson.loads(_report("--since", "7d", "--by", "", "--format", "json"))["rows"]
    assert [row["requests"] for row in totals] == [10]


def test_report_of_one_user_or_one_project(usage: dict[str, Any]) -> None:
    mine = orjson.loads(_report("--user", "ada@anl.gov", "--by", "model", "--format", "json"))["rows"]
    assert {row["model"]: row["requests"] for row in mine} == {"llama": 5, "mistral": 1}, "not the deleted user's"
    charged = orjson.loads(_report("--project", "climate", "--by", "user", "--format", "json"))["rows"]
    assert {row["user"]: row["requests"] for row in charged} == {"ada@anl.gov": 5, "(deleted user #9999)": 4}


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (("--user", "nobody@anl.gov"), "No user is named 'nobody@anl.gov'"),
        (("--project", "fusion"), "No project is named 'fusion'"),
        (("--since", "yesterday"), "--since must be Nd or a date"),
        (("--since", "0d"), "at least 1"),
        (("--until", "2026-02-30"), "--until must be a date"),
        (("--since", "2026-11-10", "--until", "2026-11-01"), "is after --until"),
        (("--by", "project,colour"), "not a dimension: colour"),
    ],
)
def test_bad_options_are_refused_saying_why(usage: dict[str, Any], arguments: tuple[str, ...], message: str) -> None:
    with pytest.raises(CommandError, match=message):
        _report(*arguments)


# --- prune_usage


def _rows(days_ago: list[int]) -> None:
    user = User.objects.create(identity_id=f"id-{uuid.uuid4().hex[:6]}", username=f"{uuid.uuid4().hex[:6]}@anl.gov")
    now = timezone.now()
    RequestLog.objects.bulk_create(
        RequestLog(
            request_id=uuid.uuid4().hex,
            user=user,
            route="chat/completions",
            status_code=200,
            latency_ms=1.0,
            created_at=now - timedelta(days=days, hours=1),
        )
        for days in days_ago
    )


def _prune(*arguments: str) -> str:
    out = io.StringIO()
    call_command("prune_usage", *arguments, stdout=out, stderr=io.StringIO())
    return out.getvalue()


def test_prune_deletes_rows_past_retention_in_batches_and_keeps_the_rollup(
    monkeypatch: pytest.MonkeyPatch, usage: dict[str, Any]
) -> None:
    monkeypatch.setattr(settings.GATEWAY, "USAGE_RETENTION_DAYS", 30)
    _rows([0, 1, 29, *([31] * 7), 400])
    rollup = list(UsageDaily.objects.order_by("pk").values())
    with CaptureQueriesContext(connection) as queries:
        out = _prune("--batch-size", "3")
    assert "Deleted 8 usage rows older than 30 days" in out
    assert sorted(
        (timezone.now() - created).days for created in RequestLog.objects.values_list("created_at", flat=True)
    ) == [0, 1, 29]
    deletes = [query["sql"] for query in queries.captured_queries if query["sql"].startswith("DELETE")]
    assert len(deletes) == 3, "8 rows in batches of 3: three DELETE statements, not one"
    assert list(UsageDaily.objects.order_by("pk").values()) == rollup


def test_prune_dry_run_counts_and_deletes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(settings.GATEWAY, "USAGE_RETENTION_DAYS", 10)
    _rows([1, 11, 12])
    assert "Would delete 2 usage rows older than 10 days" in _prune("--dry-run")
    assert RequestLog.objects.count() == 3


def test_prune_with_retention_zero_keeps_everything(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(settings.GATEWAY, "USAGE_RETENTION_DAYS", 0)
    _rows([1, 5000])
    assert "kept forever" in _prune()
    assert RequestLog.objects.count() == 2
