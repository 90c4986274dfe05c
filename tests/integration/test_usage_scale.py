"""Usage reports stay fast with millions of request rows (PostgreSQL): they read the daily rollup, never the rows.

Seeds USAGE_SCALE_ROWS request rows (default 300,000, about 20 s: they already fill most of the year's daily
rollup rows, which is what the reports read; the issue's 10,000,000 with USAGE_SCALE_ROWS=10000000, about 25
minutes) with generate_series, in time order over a year: 300 users, each charged to one of 20 projects with one
API key and using two of 12 endpoints (8 models, 3 clusters); and the daily rollup the usage writer would have
kept for them (an INSERT ... SELECT ... GROUP BY of the same rows). Then times, and prints, the admin's usage page
for each period, its CSV exports, the user's `GET /v1/usage` and `manage.py usage_report`. It measures; it
asserts what the answers say, never how long they took.
"""

from __future__ import annotations

import io
import os
import time
import uuid
from collections.abc import Callable
from typing import Any

import orjson
import pytest
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext

from resource_server.models import Cluster, Endpoint, Project, RequestLog, UsageDaily, User
from resource_server.services.api_keys import api_key_create

pytestmark = [
    pytest.mark.skipif(connection.vendor != "postgresql", reason="needs DATABASE_URL pointing at PostgreSQL"),
    pytest.mark.django_db(transaction=True),
]

ROWS = int(os.environ.get("USAGE_SCALE_ROWS", "300000"))
USERS, PROJECTS, MODELS, ENDPOINTS = 300, 20, 8, 12
YEAR_SECONDS = 365 * 86400

SEED_ROWS = """
INSERT INTO resource_server_requestlog (
    request_id, client_request_id, user_id, api_key_id, api_key_prefix, project_id, endpoint_id, model, route,
    streamed, status_code, error_code, prompt_tokens, completion_tokens, total_tokens, audio_seconds,
    gateway_route, latency_ms, time_to_first_token_ms, request_body, response_body, created_at
)
SELECT
    'scale-' || lpad(g::text, 12, '0'), '', users[1 + u], NULL, 'igw_' || lpad(u::text, 12, '0'),
    projects[1 + u %% %(projects)s],
    endpoints[1 + e], models[1 + e %% %(models)s], 'chat/completions', g %% 3 = 0,
    CASE WHEN g %% 97 = 0 THEN 500 WHEN g %% 31 = 0 THEN 429 ELSE 200 END, '',
    50 + g %% 500, g %% 300, 50 + g %% 500 + g %% 300, NULL, '', (g %% 2000)::float, NULL, NULL, NULL,
    now() - (%(rows)s - g) * (%(year)s::float / %(rows)s) * interval '1 second'
FROM (
    SELECT g, (g * 37) %% %(users)s AS u, ((g * 37) %% %(users)s * 3 + (g / %(users)s) %% 2) %% %(endpoints)s AS e
    FROM generate_series(1, %(rows)s) AS g
) AS spread,
(SELECT %(user_ids)s::bigint[] AS users, %(project_ids)s::bigint[] AS projects,
        %(endpoint_ids)s::bigint[] AS endpoints, %(models_list)s::text[] AS models) AS ids
"""

# What the usage writer adds row by row, summed here in one statement.
SEED_ROLLUP = """
INSERT INTO resource_server_usagedaily (
    day, user_id, project_id, api_key_prefix, model, endpoint_id, requests, errors, prompt_tokens,
    completion_tokens, total_tokens, latency_ms_sum
)
SELECT (created_at AT TIME ZONE 'UTC')::date, user_id, COALESCE(project_id, 0), api_key_prefix, model,
    COALESCE(endpoint_id, 0), count(*), count(*) FILTER (WHERE status_code >= 400), COALESCE(sum(prompt_tokens), 0),
    COALESCE(sum(completion_tokens), 0), COALESCE(sum(total_tokens), 0), sum(latency_ms)
FROM resource_server_requestlog
GROUP BY 1, 2, 3, 4, 5, 6
"""


def _seed() -> dict[str, Any]:
    users = User.objects.bulk_create(
        User(identity_id=f"id-scale-{n}", username=f"scale{n}@anl.gov") for n in range(USERS)
    )
    projects = Project.objects.bulk_create(
        Project(name=f"project-{n}", globus_group=uuid.uuid4()) for n in range(PROJECTS)
    )
    clusters = [Cluster.objects.create(name=name) for name in ("polaris", "aurora", "sophia")]
    endpoints = [
        Endpoint.objects.create(
            cluster=clusters[n % 3], model=f"model-{n % MODELS}", backend_config={"base_url": f"http://n{n}:8000/v1"}
        )
        for n in range(ENDPOINTS)
    ]
    parameters = {
        "rows": ROWS,
        "users": USERS,
        "projects": PROJECTS,
        "models": MODELS,
        "endpoints": ENDPOINTS,
        "year": YEAR_SECONDS,
        "user_ids": [user.pk for user in users],
        "project_ids": [project.pk for project in projects],
        "endpoint_ids": [endpoint.pk for endpoint in endpoints],
        "models_list": [endpoint.model for endpoint in endpoints][:MODELS],
    }
    started = time.perf_counter()
    with connection.cursor() as cursor:
        cursor.execute("SET synchronous_commit = off")
        cursor.execute(SEED_ROWS, parameters)
        rows_seconds = time.perf_counter() - started
        cursor.execute(SEED_ROLLUP)
        cursor.execute("ANALYZE resource_server_requestlog")
        cursor.execute("ANALYZE resource_server_usagedaily")
    seconds = time.perf_counter() - started
    return {"users": users, "seed": (rows_seconds, seconds - rows_seconds)}


def _timed(what: str, call: Callable[[], Any], report: list[str]) -> Any:
    with CaptureQueriesContext(connection) as queries:
        started = time.perf_counter()
        result = call()
        elapsed = time.perf_counter() - started
    query_seconds = sum(float(query["time"]) for query in queries.captured_queries)
    report.append(
        f"{what:<46} {elapsed * 1000:8.1f} ms  ({len(queries.captured_queries)} queries, {query_seconds * 1000:.1f} ms)"
    )
    return result


def test_usage_pages_and_reports_read_the_rollup_at_scale(capsys: pytest.CaptureFixture[str]) -> None:
    report: list[str] = []
    try:
        _measure(report)
    finally:
        with capsys.disabled():
            print("\n" + "\n".join(report))


def _measure(report: list[str]) -> None:
    seeded = _seed()
    assert RequestLog.objects.count() == ROWS
    report.append(
        f"{ROWS:,} request rows seeded in {seeded['seed'][0]:.0f} s; rolled up into "
        f"{UsageDaily.objects.count():,} daily rows in {seeded['seed'][1]:.0f} s"
    )

    admin = Client()
    admin.force_login(get_user_model().objects.create_superuser("root", "root@example.org", "pw-long-enough-123"))
    admin.get("/admin/resource_server/usagedaily/?days=7")  # the first page loads templates: not what is measured
    for days in (7, 30, 90, 365):
        page = _timed(
            f"admin usage page, {days} days",
            lambda days=days: admin.get(f"/admin/resource_server/usagedaily/?days={days}"),
            report,
        )
        assert page.status_code == 200
    project = Project.objects.get(name="project-3")
    filtered = _timed(
        "admin usage page, 365 days, one project and model",
        lambda: admin.get(f"/admin/resource_server/usagedaily/?days=365&project={project.pk}&model=model-1"),
        report,
    )
    assert filtered.status_code == 200
    export = _timed(
        "admin CSV, 365 days by day,project,user,model",
        lambda: b"".join(admin.get("/admin/resource_server/usagedaily/?days=365&format=csv").streaming_content),
        report,
    )
    assert export.count(b"\n") > 1
    per_user = _timed(
        "admin CSV, 365 days by user",
        lambda: b"".join(admin.get("/admin/resource_server/usagedaily/?days=365&format=csv&by=user").streaming_content),
        report,
    )
    assert per_user.count(b"\n") == 1 + USERS

    user = seeded["users"][7]
    _, key = api_key_create(owner=user, name="scale")
    caller = Client(headers={"Authorization": f"Bearer {key}"})
    caller.get("/resource_server/v1/usage?days=1")  # the key's first use: not what is measured
    answer = _timed("GET /v1/usage, 366 days", lambda: caller.get("/resource_server/v1/usage?days=366"), report)
    assert answer.status_code == 200
    body = orjson.loads(answer.content)
    requests = RequestLog.objects.filter(
        user=user, created_at__date__gte=body["since"], created_at__date__lte=body["until"]
    ).count()
    assert body["totals"]["requests"] == requests, "the rollup's totals are the rows' totals"
    _timed("GET /v1/usage, 30 days", lambda: caller.get("/resource_server/v1/usage"), report)

    out = io.StringIO()
    _timed(
        "usage_report --since 365d --by project,model",
        lambda: call_command("usage_report", "--since", "365d", "--by", "project,model", stdout=out),
        report,
    )
    assert out.getvalue().count("\n") == 1 + PROJECTS * 2  # each project's users use two models
