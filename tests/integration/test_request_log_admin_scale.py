"""The admin's request log at 300,000 rows on PostgreSQL: each list is answered from an index (checked on the
plans of the page's own queries), and how long each takes is printed, not asserted (a measurement, not a timed
test). ADMIN_SCALE_ROWS=10000000 measures a larger table (seeding then takes minutes)."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any
from urllib.parse import urlencode

import pytest
from django.contrib.auth import get_user_model
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from resource_server.models import Cluster, Endpoint, Project, RequestLog, User
from resource_server.services.api_keys import api_key_create

pytestmark = pytest.mark.django_db(transaction=True)

ROWS = int(os.environ.get("ADMIN_SCALE_ROWS", "300000"))
CHANGELIST = "/admin/resource_server/requestlog/"
TABLE = RequestLog._meta.db_table


@pytest.fixture
def seeded() -> Iterator[dict[str, Any]]:
    """ROWS usage rows over about 90 days: 5 users and keys, 3 projects, 4 endpoints on 2 clusters; mostly chat,
    mostly 200, a few 429s and 502s, and 404s for a misspelled model. Vacuumed and analysed, as autovacuum would."""
    if connection.vendor != "postgresql":
        pytest.skip("measures PostgreSQL's plans and timings: set DATABASE_URL to a PostgreSQL database")
    users = [User.objects.create(identity_id=f"id-{n}", username=f"user{n}@anl.gov") for n in range(5)]
    keys = [api_key_create(owner=user, name="load")[0] for user in users]
    projects = [
        Project.objects.create(name=f"project-{n}", globus_group=f"00000000-0000-4000-8000-00000000000{n}")
        for n in range(3)
    ]
    clusters = [Cluster.objects.create(name=name) for name in ("polaris", "aurora")]
    endpoints = [
        Endpoint.objects.create(cluster=clusters[n % 2], model=model, backend="direct", backend_config={})
        for n, model in enumerate(
            ("meta-llama/Llama-3.1-8B-Instruct", "meta-llama/Llama-3.1-70B-Instruct", "Qwen/Qwen3-32B", "BAAI/bge-m3")
        )
    ]
    array = "ARRAY[{}]".format
    with connection.cursor() as cursor:
        cursor.execute(
            f"""
            INSERT INTO {TABLE} (request_id, client_request_id, user_id, api_key_id, api_key_prefix, project_id,
                endpoint_id, model, route, streamed, status_code, error_code, prompt_tokens, completion_tokens,
                total_tokens, gateway_route, latency_ms, time_to_first_token_ms, created_at)
            SELECT md5(g::text), CASE WHEN g % 10 = 0 THEN 'client-' || g ELSE '' END,
                ({array(",".join(str(u.pk) for u in users))})[1 + g % 5],
                ({array(",".join(str(k.pk) for k in keys))})[1 + g % 5],
                ({array(",".join(repr(k.prefix) for k in keys))})[1 + g % 5],
                CASE WHEN g % 4 = 3 THEN NULL ELSE ({array(",".join(str(p.pk) for p in projects))})[1 + g % 4] END,
                CASE WHEN g % 97 = 0 THEN NULL ELSE ({array(",".join(str(e.pk) for e in endpoints))})[1 + g % 4] END,
                CASE WHEN g % 97 = 0 THEN 'lama-3-typo-' || (g % 7)
                    ELSE ({array(",".join(repr(e.model) for e in endpoints))})[1 + g % 4] END,
                CASE WHEN g % 100 < 90 THEN 'chat/completions' WHEN g % 100 < 95 THEN 'embeddings'
                    WHEN g % 100 < 99 THEN 'completions' ELSE 'audio/transcriptions' END,
                g % 2 = 0,
                CASE WHEN g % 97 = 0 THEN 404 WHEN g % 50 = 0 THEN 429 WHEN g % 500 = 1 THEN 502 ELSE 200 END,
                CASE WHEN g % 97 = 0 THEN 'model_not_found' WHEN g % 50 = 0 THEN 'rate_limit_exceeded'
                    WHEN g % 500 = 1 THEN 'upstream_error' ELSE '' END,
                g % 2000, g % 500, g % 2000 + g % 500, '',
                random() * 5000, CASE WHEN g % 2 = 0 THEN random() * 300 END,
                now() - g * (interval '90 days' / {ROWS})
            FROM generate_series(1, {ROWS}) AS g
            """  # noqa: S608 (the values are this test's own rows' ids and names)
        )
        cursor.execute(f"VACUUM ANALYZE {TABLE}")
    yield {"users": users, "keys": keys, "projects": projects, "clusters": clusters, "endpoints": endpoints}


def seq_scans_of_the_log(sql: str) -> list[str]:
    """The nodes of the query's plan that read the whole request log."""
    with connection.cursor() as cursor:
        cursor.execute("EXPLAIN (FORMAT JSON) " + sql)
        plan = cursor.fetchone()[0]
    plan = json.loads(plan) if isinstance(plan, str) else plan
    found: list[str] = []

    def walk(node: dict[str, Any]) -> None:
        if node["Node Type"] == "Seq Scan" and node.get("Relation Name") == TABLE:
            found.append(sql[:200])
        for child in node.get("Plans", []):
            walk(child)

    walk(plan[0]["Plan"])
    return found


def test_request_log_lists_use_indexes_at_scale(seeded: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    client = Client()
    client.force_login(get_user_model().objects.create_superuser("root", "root@example.org", "pw-long-enough-123"))
    users, keys, projects, clusters, endpoints = (
        seeded[name] for name in ("users", "keys", "projects", "clusters", "endpoints")
    )
    week_ago = timezone.now().replace(hour=0, minute=0, second=0, microsecond=0) - timedelta(days=7)
    pages = {
        "unfiltered": "",
        "page 100": "?p=100",
        "status 2xx": "?status=2",
        "status 4xx": "?status=4",
        "status 5xx": "?status=5",
        "route embeddings": "?route=embeddings",
        "route audio/transcriptions": "?route=audio/transcriptions",
        "model (registered)": f"?model={endpoints[2].model}",
        "cluster": f"?cluster={clusters[1].pk}",
        "endpoint": f"?endpoint={endpoints[3].pk}",
        "project": f"?project__id__exact={projects[1].pk}",
        "no project": "?project__isnull=True",
        "streamed": "?streamed__exact=1",
        # As the admin's own "Past 7 days" link writes it.
        "past 7 days": "?"
        + urlencode({"created_at__gte": str(week_ago), "created_at__lt": str(week_ago + timedelta(8))}),
        "5xx on a cluster": f"?status=5&cluster={clusters[1].pk}",
        "search username": f"?q={users[3].username}",
        "search key prefix": f"?q={keys[2].prefix}",
        "search request id": f"?q={RequestLog.objects.order_by('pk').values_list('request_id', flat=True)[:1][0]}",
        "search misspelled model": "?q=lama-3-typo-3",
    }
    lines, scans = [], []
    for name, query in pages.items():
        timings, sql = [], []
        for _ in range(3):
            with CaptureQueriesContext(connection) as queries:
                started = time.perf_counter()
                response = client.get(CHANGELIST + query)
                timings.append((time.perf_counter() - started) * 1000)
            sql.append(sum(float(captured["time"]) for captured in queries.captured_queries) * 1000)
            assert response.status_code == 200, (name, response.status_code)
            assert "cl" in response.context, (name, "the filter's value was refused")
        count = response.context["cl"].result_count
        lines.append(
            f"{name:28} first {timings[0]:6.1f} ms, then {min(timings[1:]):6.1f} ms, SQL {min(sql[1:]):5.1f} ms"
            f"  ({count:,} rows)"
        )
        for captured in queries.captured_queries:
            if TABLE in captured["sql"] and not captured["sql"].startswith("EXPLAIN"):
                scans += [f"{name}: {scan}" for scan in seq_scans_of_the_log(captured["sql"])]
    detail = RequestLog.objects.order_by("pk").values_list("pk", flat=True)[:1][0]
    started = time.perf_counter()
    assert client.get(f"{CHANGELIST}{detail}/change/").status_code == 200
    lines.append(f"{'one row':28} {(time.perf_counter() - started) * 1000:7.1f} ms")
    with capsys.disabled():
        print(f"\nThe admin's request log with {ROWS:,} rows (Django test client, superuser):")
        print("\n".join(lines))
    assert not scans, "these lists read the whole request log:\n" + "\n".join(scans)
