"""The admin: endpoints with bad backend config are refused with the field named; keys are shown once."""

from __future__ import annotations

import pytest
from django.contrib.auth import get_user_model
from django.test import Client

from resource_server.models import ApiKey, Cluster, Endpoint, RequestLog, User

pytestmark = pytest.mark.django_db


@pytest.fixture
def admin_client(client: Client) -> Client:
    admin = get_user_model().objects.create_superuser("root", "root@example.org", "pw-long-enough-123")
    client.force_login(admin)
    return client


def endpoint_form(cluster: Cluster, config: str) -> dict[str, str]:
    return {
        "cluster": str(cluster.pk),
        "framework": "vllm",
        "model": "meta-llama/Llama-3.1-8B-Instruct",
        "backend": "direct",
        "backend_config": config,
        "allowed_groups": "[]",
        "allowed_domains": "[]",
        "enabled": "on",
    }


def test_bad_backend_config_is_refused_naming_the_field(admin_client: Client) -> None:
    cluster = Cluster.objects.create(name="polaris")
    response = admin_client.post(
        "/admin/resource_server/endpoint/add/", endpoint_form(cluster, '{"base_url": "not a url", "read_timeout": -1}')
    )
    assert response.status_code == 200
    errors = str(response.context["adminform"].form.errors["backend_config"])
    assert "base_url" in errors and "read_timeout" in errors
    assert not Endpoint.objects.exists()


def test_unknown_config_field_is_refused(admin_client: Client) -> None:
    cluster = Cluster.objects.create(name="polaris")
    response = admin_client.post(
        "/admin/resource_server/endpoint/add/", endpoint_form(cluster, '{"base_url": "http://n:8000/v1", "typo": 1}')
    )
    assert "typo" in str(response.context["adminform"].form.errors["backend_config"])


def test_valid_endpoint_is_saved(admin_client: Client) -> None:
    cluster = Cluster.objects.create(name="polaris")
    response = admin_client.post(
        "/admin/resource_server/endpoint/add/", endpoint_form(cluster, '{"base_url": "http://node12:8000/v1"}')
    )
    assert response.status_code == 302
    assert Endpoint.objects.get().model == "meta-llama/Llama-3.1-8B-Instruct"


def test_access_rules_must_be_lists_of_strings(admin_client: Client) -> None:
    response = admin_client.post(
        "/admin/resource_server/cluster/add/",
        {"name": "aurora", "allowed_groups": '"not-a-list"', "allowed_domains": "[]", "maintenance_message": ""},
    )
    assert "allowed_groups" in response.context["adminform"].form.errors


def test_key_created_in_admin_is_shown_once_and_stored_hashed(admin_client: Client) -> None:
    owner = User.objects.create(identity_id="id-1", username="ada@anl.gov")
    response = admin_client.post(
        "/admin/resource_server/apikey/add/", {"owner": str(owner.pk), "name": "workflow"}, follow=True
    )
    [message] = [str(m) for m in response.context["messages"] if "shown again" in str(m)]
    secret = message.rsplit(" ", 1)[-1]
    key = ApiKey.objects.get()
    assert secret.startswith(key.prefix + "_")
    assert secret not in key.secret_hash


@pytest.mark.parametrize("page", ["cluster", "endpoint", "user", "apikey", "requestlog"])
def test_changelists_render_with_filters(admin_client: Client, page: str) -> None:
    assert admin_client.get(f"/admin/resource_server/{page}/").status_code == 200


def test_request_log_is_read_only(admin_client: Client) -> None:
    assert admin_client.get("/admin/resource_server/requestlog/add/").status_code == 403
    assert RequestLog.objects.count() == 0
