"""The request log in the admin: accounting records nobody edits or deletes, listed with readable columns."""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

import pytest
from django.test import Client
from django.utils import timezone

from resource_server.admin import _milliseconds
from resource_server.models import ApiKey, Cluster, Endpoint, Project, RequestLog, User
from resource_server.services.api_keys import api_key_create

pytestmark = pytest.mark.django_db

CHANGELIST = "/admin/resource_server/requestlog/"


@pytest.fixture
def ada() -> User:
    return User.objects.create(identity_id="id-ada", username="ada@anl.gov")


def log(user: User, **fields: Any) -> RequestLog:
    values: dict[str, Any] = {
        "request_id": uuid.uuid4().hex,
        "user": user,
        "model": "demo-model",
        "route": "chat/completions",
        "status_code": 200,
        "latency_ms": 85.123456789,
    }
    return RequestLog.objects.create(**{**values, **fields})


def listed(client: Client, query: str = "") -> list[RequestLog]:
    response = client.get(CHANGELIST + query)
    assert response.status_code == 200, response.content
    return list(response.context["cl"].result_list)


def test_rows_cannot_be_added_changed_or_deleted(admin_client: Client, ada: User) -> None:
    row = log(ada)
    assert admin_client.get(CHANGELIST + "add/").status_code == 403
    assert admin_client.get(f"{CHANGELIST}{row.pk}/delete/").status_code == 403
    assert admin_client.post(f"{CHANGELIST}{row.pk}/delete/", {"post": "yes"}).status_code == 403
    # The bulk delete action is not offered, and posting it anyway deletes nothing.
    page = admin_client.get(CHANGELIST).content.decode()
    assert "delete_selected" not in page
    response = admin_client.post(
        CHANGELIST, {"action": "delete_selected", "_selected_action": [str(row.pk)], "post": "yes"}
    )
    assert response.status_code in (200, 302)
    # A change posted to the row's page changes nothing: the page is read-only.
    detail = admin_client.get(f"{CHANGELIST}{row.pk}/change/")
    assert detail.status_code == 200 and 'name="status_code"' not in detail.content.decode()
    assert admin_client.post(f"{CHANGELIST}{row.pk}/change/", {"status_code": "500"}).status_code == 403
    row.refresh_from_db()
    assert row.status_code == 200
    assert RequestLog.objects.count() == 1


def test_deleting_an_api_key_keeps_its_prefix_on_past_rows(admin_client: Client, ada: User) -> None:
    key, _ = api_key_create(owner=ada, name="workflow")
    row = log(ada, api_key=key, api_key_prefix=key.prefix)
    response = admin_client.post(f"/admin/resource_server/apikey/{key.pk}/delete/", {"post": "yes"})
    assert response.status_code == 302
    assert not ApiKey.objects.exists()
    row.refresh_from_db()
    assert (row.api_key_id, row.api_key_prefix) == (None, key.prefix)
    assert listed(admin_client, f"?q={key.prefix}") == [row]


def test_columns_are_compact_and_readable(admin_client: Client, ada: User) -> None:
    cluster = Cluster.objects.create(name="polaris")
    endpoint = Endpoint.objects.create(cluster=cluster, model="demo-model", backend="direct", backend_config={})
    project = Project.objects.create(name="climate", globus_group=uuid.uuid4())
    log(
        ada,
        endpoint=endpoint,
        project=project,
        api_key_prefix="igw_abcdef123456",
        prompt_tokens=1234,
        completion_tokens=56,
        latency_ms=1234.56789,
        time_to_first_token_ms=85.4321,
        streamed=True,
    )
    page = admin_client.get(CHANGELIST).content.decode()
    for shown in ("ada<wbr>@anl.gov", "igw_abcdef123456", "climate", "polaris", f"#{endpoint.pk} vllm", "1,234 / 56"):
        assert shown in page
    assert "1.2\u00a0s" in page and "85\u00a0ms" in page
    assert "1234.56789" not in page and "85.4321" not in page


@pytest.mark.parametrize(
    ("milliseconds", "shown"),
    [
        (None, "-"),
        (3.14159, "3.1 ms"),
        (85.4321, "85 ms"),
        (1234.5, "1.2 s"),
        (45_678.9, "46 s"),
        (600_000, "10.0 min"),
    ],
)
def test_durations_are_rounded(milliseconds: float | None, shown: str) -> None:
    assert _milliseconds(milliseconds) == shown.replace(" ", "\u00a0")


def test_model_filter_offers_registered_models_only(admin_client: Client, ada: User) -> None:
    cluster = Cluster.objects.create(name="polaris")
    Endpoint.objects.create(cluster=cluster, model="demo-model", backend="direct", backend_config={})
    log(ada, model="demo-model")
    misspelled = log(ada, model="dmeo-model", status_code=404, error_code="model_not_found")
    response = admin_client.get(CHANGELIST)
    [model_filter] = [spec for spec in response.context["cl"].filter_specs if spec.title == "model"]
    assert [choice for choice, _ in model_filter.lookup_choices] == ["demo-model"]
    # The search box still finds a model nobody registered.
    assert listed(admin_client, "?q=dmeo-model") == [misspelled]


def test_each_filter_narrows_the_list(admin_client: Client, ada: User) -> None:
    grace = User.objects.create(identity_id="id-grace", username="grace@anl.gov")
    polaris, aurora = Cluster.objects.create(name="polaris"), Cluster.objects.create(name="aurora")
    on_polaris = Endpoint.objects.create(cluster=polaris, model="demo-model", backend="direct", backend_config={})
    on_aurora = Endpoint.objects.create(cluster=aurora, model="demo-model", backend="direct", backend_config={})
    project = Project.objects.create(name="climate", globus_group=uuid.uuid4())
    ok = log(ada, endpoint=on_polaris, project=project, streamed=True)
    refused = log(ada, endpoint=on_aurora, status_code=429, error_code="rate_limit_exceeded", route="embeddings")
    failed = log(
        grace,
        model="other-model",
        status_code=502,
        client_request_id="client-7",
        created_at=timezone.now() - timedelta(days=40),
    )
    assert listed(admin_client, "?status=2") == [ok]
    assert listed(admin_client, "?status=4") == [refused]
    assert listed(admin_client, "?status=5") == [failed]
    assert listed(admin_client, "?route=embeddings") == [refused]
    assert listed(admin_client, f"?cluster={aurora.pk}") == [refused]
    assert listed(admin_client, f"?endpoint={on_polaris.pk}") == [ok]
    assert listed(admin_client, f"?project__id__exact={project.pk}") == [ok]
    assert listed(admin_client, "?streamed__exact=1") == [ok]
    assert listed(admin_client, "?model=demo-model") == [refused, ok]
    assert set(listed(admin_client, "?q=grace")) == {failed}
    assert listed(admin_client, "?q=client-7") == [failed]
    assert listed(admin_client, f"?q={ok.request_id}") == [ok]
    # A value no filter offers is refused (the admin's "?e=1"), not an error page or an unfiltered list.
    response = admin_client.get(CHANGELIST + "?status=9")
    assert response.status_code == 302 and response["Location"].endswith("?e=1")
