"""Limits in the admin: a limit the gateway could not apply is refused with the field named."""

from __future__ import annotations

import uuid

import pytest
from django.test import Client

from resource_server.models import Cluster, Endpoint, Limit, Project, User

pytestmark = pytest.mark.django_db

ADD = "/admin/resource_server/limit/add/"


@pytest.fixture
def ada() -> User:
    return User.objects.create(identity_id="id-ada", username="ada@anl.gov")


@pytest.fixture
def project() -> Project:
    return Project.objects.create(name="climate", globus_group=uuid.uuid4())


@pytest.fixture
def endpoint() -> Endpoint:
    cluster = Cluster.objects.create(name="polaris")
    return Endpoint.objects.create(cluster=cluster, model="demo-model", backend="direct", backend_config={})


def limit_form(**fields: str) -> dict[str, str]:
    form = dict.fromkeys(
        (
            "user",
            "api_key",
            "project",
            "model",
            "endpoint",
            "concurrent",
            "requests_per_minute",
            "tokens_per_minute",
            "tokens_per_day",
            "tokens_per_month",
            "allocation_tokens",
            "allocation_starts_0",
            "allocation_starts_1",
            "allocation_ends_0",
            "allocation_ends_1",
            "note",
        ),
        "",
    )
    return {**form, **fields}


def period(starts: str, ends: str) -> dict[str, str]:
    """An allocation period's fields as the admin's split date and time inputs post them (midnight UTC)."""
    return {
        "allocation_starts_0": starts,
        "allocation_starts_1": "00:00:00",
        "allocation_ends_0": ends,
        "allocation_ends_1": "00:00:00",
    }


def refused(client: Client, form: dict[str, str]) -> dict[str, list[str]]:
    """The add form's errors, by field ("__all__": the limit as a whole); asserts nothing was saved."""
    response = client.post(ADD, form)
    assert response.status_code == 200, "the limit was saved"
    assert not Limit.objects.exists()
    errors: dict[str, list[str]] = response.context["adminform"].form.errors
    return {field: list(messages) for field, messages in errors.items()}


def test_valid_limit_is_saved(admin_client: Client, project: Project) -> None:
    form = limit_form(
        project=str(project.pk),
        requests_per_minute="600",
        allocation_tokens="1000000",
        **period("2026-01-01", "2026-07-01"),
    )
    response = admin_client.post(ADD, form)
    assert response.status_code == 302, response.context["adminform"].form.errors
    limit = Limit.objects.get()
    assert (limit.project, limit.requests_per_minute, limit.allocation_tokens) == (project, 600, 1_000_000)
    listing = admin_client.get("/admin/resource_server/limit/").content.decode()
    assert "project climate" in listing and "1,000,000 (2026-01-01 to 2026-07-01)" in listing


@pytest.mark.parametrize("value", ["-5", "many", "1.5"])
def test_a_number_that_is_not_a_count_is_refused_on_its_field(admin_client: Client, ada: User, value: str) -> None:
    errors = refused(admin_client, limit_form(user=str(ada.pk), tokens_per_day=value))
    assert list(errors) == ["tokens_per_day"]


def test_zero_is_refused_saying_to_leave_it_empty(admin_client: Client, ada: User) -> None:
    errors = refused(admin_client, limit_form(user=str(ada.pk), concurrent="0"))
    assert errors == {"concurrent": ["Enter 1 or more, or leave it empty for no limit of this kind."]}


def test_a_limit_without_any_limit_is_refused(admin_client: Client, ada: User) -> None:
    errors = refused(admin_client, limit_form(user=str(ada.pk)))
    assert "Set at least one limit" in errors["__all__"][0]


def test_two_scopes_are_refused_on_both_fields(admin_client: Client, ada: User, project: Project) -> None:
    errors = refused(admin_client, limit_form(user=str(ada.pk), project=str(project.pk), concurrent="2"))
    assert "Project is chosen too" in errors["user"][0]
    assert "User is chosen too" in errors["project"][0]


def test_no_scope_is_refused(admin_client: Client) -> None:
    errors = refused(admin_client, limit_form(concurrent="2"))
    assert "Choose one scope" in errors["__all__"][0]


def test_model_and_endpoint_both_are_refused(admin_client: Client, ada: User, endpoint: Endpoint) -> None:
    form = limit_form(user=str(ada.pk), model="demo-model", endpoint=str(endpoint.pk), concurrent="2")
    errors = refused(admin_client, form)
    assert errors == {"endpoint": ["Narrow the limit to a model or to an endpoint, not both."]}


def test_a_model_no_endpoint_serves_is_refused(admin_client: Client, ada: User, endpoint: Endpoint) -> None:
    errors = refused(admin_client, limit_form(user=str(ada.pk), model="dmeo-model", concurrent="2"))
    assert "No endpoint serves the model 'dmeo-model'" in errors["model"][0]


def test_an_allocation_without_its_period_is_refused(admin_client: Client, project: Project) -> None:
    errors = refused(admin_client, limit_form(project=str(project.pk), allocation_tokens="1000"))
    assert errors == {"allocation_ends": ["An allocation needs the start and end of its period."]}


def test_an_allocation_ending_before_it_starts_is_refused(admin_client: Client, project: Project) -> None:
    form = limit_form(
        project=str(project.pk),
        allocation_tokens="1000",
        **period("2026-07-01", "2026-01-01"),
    )
    assert refused(admin_client, form) == {"allocation_ends": ["The allocation must end after it starts."]}


def test_a_period_without_allocation_tokens_is_refused(admin_client: Client, project: Project) -> None:
    form = limit_form(project=str(project.pk), concurrent="2", allocation_ends_0="2026-01-01", allocation_ends_1="0:0")
    assert "allocation_tokens" in refused(admin_client, form)


def test_a_date_that_cannot_be_read_is_refused_on_its_field(admin_client: Client, project: Project) -> None:
    form = limit_form(
        project=str(project.pk),
        allocation_tokens="1000",
        **period("next monday", "2026-01-01"),
    )
    assert "allocation_starts" in refused(admin_client, form)


def test_a_second_limit_for_the_same_scope_and_narrowing_is_refused(admin_client: Client, ada: User) -> None:
    assert admin_client.post(ADD, limit_form(user=str(ada.pk), concurrent="2")).status_code == 302
    response = admin_client.post(ADD, limit_form(user=str(ada.pk), requests_per_minute="60"))
    assert response.status_code == 200
    assert "exists already" in str(response.context["adminform"].form.errors)
    assert Limit.objects.count() == 1


def test_project_page_lists_its_limits_in_words(admin_client: Client, project: Project) -> None:
    Limit.objects.create(project=project, tokens_per_month=5_000_000)
    page = admin_client.get(f"/admin/resource_server/project/{project.pk}/change/").content.decode()
    assert "project climate: 5,000,000 tokens per UTC month" in page
    listing = admin_client.get(f"/admin/resource_server/limit/?project__id__exact={project.pk}")
    assert [limit.project for limit in listing.context["cl"].result_list] == [project]


def test_users_show_and_filter_limits_exempt(admin_client: Client, ada: User) -> None:
    service = User.objects.create(identity_id="id-svc", username="pipeline@anl.gov", limits_exempt=True)
    response = admin_client.get("/admin/resource_server/user/?limits_exempt__exact=1")
    assert list(response.context["cl"].result_list) == [service]
    assert "limits_exempt" in response.context["cl"].list_display


def test_endpoints_show_context_length(admin_client: Client, endpoint: Endpoint) -> None:
    endpoint.context_length = 131_072
    endpoint.save()
    response = admin_client.get("/admin/resource_server/endpoint/")
    assert "context_length" in response.context["cl"].list_display
    assert "131072" in response.content.decode()
    assert (
        'name="context_length"'
        in admin_client.get(f"/admin/resource_server/endpoint/{endpoint.pk}/change/").content.decode()
    )


@pytest.mark.parametrize("page", ["project", "limit"])
def test_limit_pages_render(admin_client: Client, page: str) -> None:
    assert admin_client.get(f"/admin/resource_server/{page}/").status_code == 200
    assert admin_client.get(f"/admin/resource_server/{page}/add/").status_code == 200
