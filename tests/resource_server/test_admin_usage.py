"""The admin's usage page: totals per day, user, project and model from the daily rollup, as SVG charts and tables,
filtered by period, project and model, exported as CSV; staff only, and no rollup row can be added, edited or
deleted there."""

from __future__ import annotations

import csv
import io
import re
import uuid
from datetime import date, timedelta
from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from django.test import Client
from django.utils import timezone

from resource_server.models import Cluster, Endpoint, Project, UsageDaily, User

pytestmark = pytest.mark.django_db

PAGE = "/admin/resource_server/usagedaily/"


@pytest.fixture
def usage() -> dict[str, Any]:
    """Three users, two projects, two models on two endpoints of one cluster, over the last 40 days."""
    today = timezone.now().date()
    cluster = Cluster.objects.create(name="polaris")
    llama = Endpoint.objects.create(cluster=cluster, model="llama", backend_config={"base_url": "http://n:8000/v1"})
    mistral = Endpoint.objects.create(cluster=cluster, model="mistral", backend_config={"base_url": "http://n:8001/v1"})
    users = [User.objects.create(identity_id=f"id-{n}", username=f"user{n}@anl.gov") for n in range(3)]
    climate = Project.objects.create(name="climate", globus_group=uuid.uuid4())
    fusion = Project.objects.create(name="fusion", globus_group=uuid.uuid4())
    rows = [
        # (days ago, user, project, endpoint, requests, errors, tokens)
        (0, users[0], climate, llama, 10, 1, 1000),
        (0, users[1], climate, mistral, 5, 0, 500),
        (3, users[1], fusion, llama, 4, 2, 4000),
        (3, users[2], None, mistral, 1, 1, 0),
        (20, users[2], fusion, llama, 7, 0, 7000),
        (39, users[0], climate, llama, 100, 0, 100_000),  # outside the 30-day default
    ]
    for days_ago, user, project, endpoint, requests, errors, tokens in rows:
        UsageDaily.objects.create(
            day=today - timedelta(days=days_ago),
            user_id=user.pk,
            project_id=project.pk if project else 0,
            model=endpoint.model,
            endpoint_id=endpoint.pk,
            requests=requests,
            errors=errors,
            prompt_tokens=tokens // 2,
            completion_tokens=tokens - tokens // 2,
            total_tokens=tokens,
            latency_ms_sum=requests * 100.0,
        )
    return {"today": today, "users": users, "climate": climate, "fusion": fusion}


def _text(html: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html))


def _table(html: str, caption: str) -> list[list[str]]:
    """The body rows of the table with this caption, as cell texts."""
    table = html.split(f"<caption>{caption}", 1)[1].split("</table>", 1)[0]
    return [
        [_text(cell).strip() for cell in re.findall(r"<td>(.*?)</td>", row, re.S)]
        for row in re.findall(r"<tr>(.*?)</tr>", table.split("<tbody>", 1)[1], re.S)
    ]


def test_the_page_draws_charts_and_tables_of_the_last_30_days(admin_client: Client, usage: dict[str, Any]) -> None:
    response = admin_client.get(PAGE)
    assert response.status_code == 200
    html = response.content.decode()
    content = html.split('id="content-main"', 1)[1]
    assert content.count('<svg xmlns="http://www.w3.org/2000/svg" role="img"') == 3  # tokens, requests, users
    assert "<script" not in content
    summary = _text(html)
    assert "27 requests (4 errors)" in summary and "12,500 tokens" in summary
    assert _table(html, "Per project") == [
        ["(none)", "1", "1", "0", "0", "0", "100.0"],
        ["climate", "15", "1", "750", "750", "1,500", "100.0"],
        ["fusion", "11", "2", "5,500", "5,500", "11,000", "100.0"],
    ]
    top = [row[0] for row in _table(html, "Top 15 users by tokens")]
    assert top == ["user2@anl.gov", "user1@anl.gov", "user0@anl.gov"]
    assert [(row[0], row[5]) for row in _table(html, "Per model")] == [("llama", "12,000"), ("mistral", "500")]
    days = _table(html, "Per day")
    assert len(days) == 30, "every day of the period, zero where nothing was used"
    assert days[-1][0] == usage["today"].isoformat() and days[-1][1] == "15"
    # A bar per day in each day chart, each with its exact figure in a tooltip.
    assert f"<title>{usage['today']}: 1,500 tokens</title>" in html
    assert f"<title>{usage['today']}: 15 requests, 1 errors</title>" in html
    assert "<title>user2@anl.gov: 7,000 tokens, 8 requests</title>" in html


def test_period_project_and_model_filters_narrow_every_figure(admin_client: Client, usage: dict[str, Any]) -> None:
    year = admin_client.get(PAGE, {"days": "90"}).content.decode()
    assert "127 requests" in _text(year)
    fusion = admin_client.get(PAGE, {"project": usage["fusion"].pk}).content.decode()
    assert "11 requests (2 errors)" in _text(fusion)
    assert [row[0] for row in _table(fusion, "Top 15 users by tokens")] == ["user2@anl.gov", "user1@anl.gov"]
    llama = admin_client.get(PAGE, {"model": "llama", "project": usage["climate"].pk}).content.decode()
    assert "10 requests (1 errors)" in _text(llama)
    no_project = admin_client.get(PAGE, {"project": "0"}).content.decode()
    assert "1 requests (1 errors)" in _text(no_project)
    assert 'value="llama" selected' in llama and f'value="{usage["climate"].pk}" selected' in llama


def test_csv_export_holds_the_same_aggregates(admin_client: Client, usage: dict[str, Any]) -> None:
    response = admin_client.get(PAGE, {"days": "30", "format": "csv"})
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/csv")
    assert "attachment" in response["Content-Disposition"]
    rows = list(csv.DictReader(io.StringIO(b"".join(response.streaming_content).decode())))
    assert list(rows[0]) == [
        "day", "project", "user", "model", "requests", "errors", "prompt_tokens", "completion_tokens",
        "total_tokens", "mean_latency_ms",
    ]  # fmt: skip
    assert len(rows) == 5 and sum(int(row["total_tokens"]) for row in rows) == 12_500
    by_user = admin_client.get(PAGE, {"format": "csv", "by": "user,cluster"})
    lines = list(csv.reader(io.StringIO(b"".join(by_user.streaming_content).decode())))
    assert lines[0][:3] == ["user", "cluster", "requests"]
    assert {(line[0], line[1], line[6]) for line in lines[1:]} == {
        ("user0@anl.gov", "polaris", "1000"),
        ("user1@anl.gov", "polaris", "4500"),
        ("user2@anl.gov", "polaris", "7000"),
    }


@pytest.mark.parametrize("query", [{"days": "12"}, {"project": "x"}, {"format": "csv", "by": "user,colour"}])
def test_bad_parameters_are_a_400_saying_which(
    admin_client: Client, usage: dict[str, Any], query: dict[str, str]
) -> None:
    response = admin_client.get(PAGE, query)
    assert response.status_code == 400
    assert "errornote" in response.content.decode()


def test_the_page_is_for_staff_with_view_permission_only(client: Client, usage: dict[str, Any]) -> None:
    assert client.get(PAGE).status_code == 302  # to the sign-in page
    staff = get_user_model().objects.create_user("staff", "s@example.org", "pw-long-enough-123", is_staff=True)
    client.force_login(staff)
    assert client.get(PAGE).status_code == 403
    staff.user_permissions.add(Permission.objects.get(codename="view_usagedaily"))
    staff = get_user_model().objects.get(pk=staff.pk)  # permissions are cached on the instance
    client.force_login(staff)
    assert client.get(PAGE).status_code == 200


def test_rollup_rows_cannot_be_added_edited_or_deleted(admin_client: Client, usage: dict[str, Any]) -> None:
    row = UsageDaily.objects.first()
    assert row is not None
    for url in (f"{PAGE}add/", f"{PAGE}{row.pk}/change/", f"{PAGE}{row.pk}/delete/"):
        assert admin_client.get(url).status_code == 404, url
    assert admin_client.post(f"{PAGE}{row.pk}/delete/", {"post": "yes"}).status_code == 404
    assert UsageDaily.objects.filter(pk=row.pk).exists()
    index = admin_client.get("/admin/").content.decode()
    assert f'href="{PAGE}"' in index, "the admin index links to the page"


def test_an_empty_period_draws_empty_charts(admin_client: Client) -> None:
    response = admin_client.get(PAGE, {"days": "7"})
    assert response.status_code == 200
    assert "0 requests" in _text(response.content.decode())
    assert date.today().isoformat()[:4] in response.content.decode()
