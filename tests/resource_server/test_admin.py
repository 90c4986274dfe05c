"""The admin: endpoints with bad backend config are refused with the field named; keys are shown once."""

from __future__ import annotations

import io
import ipaddress
import re
import secrets
import time
import uuid
from datetime import timedelta
from typing import Any

import pytest
from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.messages import get_messages
from django.contrib.sessions.backends.db import SessionStore
from django.core.management import call_command
from django.test import Client

from resource_server.models import ApiKey, Cluster, Endpoint, RequestLog, User
from resource_server.services.api_keys import api_key_create

pytestmark = pytest.mark.django_db


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
        "preference": "0",
        "scheduler_job_name": "",
        # Its maintenance windows (an inline): none.
        "maintenance_windows-TOTAL_FORMS": "0",
        "maintenance_windows-INITIAL_FORMS": "0",
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
        {"name": "aurora", "allowed_groups": '"not-a-list"', "allowed_domains": "[]", "scheduler": "{}"},
    )
    assert "allowed_groups" in response.context["adminform"].form.errors


def secret_on_page(html: str) -> str:
    [secret] = re.findall(r'value="(igw_[^"]+)"', html)
    return secret


def whoami(client: Client, secret: str) -> str:
    response = client.get("/resource_server/whoami", HTTP_AUTHORIZATION=f"Bearer {secret}")
    assert response.status_code == 200, response.content
    username: str = response.json()["username"]
    return username


def test_key_created_in_admin_is_shown_once_and_stored_hashed(admin_client: Client) -> None:
    owner = User.objects.create(identity_id="id-1", username="ada@anl.gov")
    response = admin_client.post("/admin/resource_server/apikey/add/", {"owner": str(owner.pk), "name": "workflow"})
    assert response.status_code == 200
    secret = secret_on_page(response.content.decode())
    key = ApiKey.objects.get()
    assert secret.startswith(key.prefix + "_")
    assert secret not in key.secret_hash
    assert whoami(Client(), secret) == "ada@anl.gov"
    # Shown once: no later page of the admin has it.
    for page in ("/admin/resource_server/apikey/", f"/admin/resource_server/apikey/{key.pk}/change/"):
        assert secret not in admin_client.get(page).content.decode()


def test_new_key_travels_in_no_cookie_session_or_cache(admin_client: Client) -> None:
    owner = User.objects.create(identity_id="id-1", username="ada@anl.gov")
    response = admin_client.post("/admin/resource_server/apikey/add/", {"owner": str(owner.pk), "name": "workflow"})
    secret = secret_on_page(response.content.decode())
    assert "no-store" in response["Cache-Control"]
    assert "private" in response["Cache-Control"]
    for name, morsel in response.cookies.items():
        assert secret not in morsel.value, f"the key travels in the {name} cookie"
        assert secret.split("_", 2)[-1] not in morsel.value, f"the key travels in the {name} cookie"
    assert "messages" not in response.cookies
    session = SessionStore(admin_client.cookies[settings.SESSION_COOKIE_NAME].value)
    assert secret not in str(dict(session.items()))
    assert [str(message) for message in get_messages(response.wsgi_request)] == []


def test_key_owner_cannot_be_changed_once_created(admin_client: Client) -> None:
    ada = User.objects.create(identity_id="id-1", username="ada@anl.gov")
    mallory = User.objects.create(identity_id="id-2", username="mallory@example.org")
    key, secret = api_key_create(owner=ada, name="workflow")
    change_url = f"/admin/resource_server/apikey/{key.pk}/change/"
    form = admin_client.get(change_url).content.decode()
    assert 'name="owner"' not in form, "the owner is offered as an editable field"
    response = admin_client.post(change_url, {"owner": str(mallory.pk), "name": "renamed", "expires_at_0": ""})
    assert response.status_code == 302
    key.refresh_from_db()
    assert (key.owner, key.name) == (ada, "renamed")
    assert whoami(Client(), secret) == "ada@anl.gov"


def test_key_hash_and_prefix_are_never_form_fields(admin_client: Client) -> None:
    ada = User.objects.create(identity_id="id-1", username="ada@anl.gov")
    key, secret = api_key_create(owner=ada, name="workflow")
    before = (key.prefix, key.secret_hash)
    change_url = f"/admin/resource_server/apikey/{key.pk}/change/"
    admin_client.post(change_url, {"name": "w", "prefix": "igw_000000000000", "secret_hash": "0" * 64})
    key.refresh_from_db()
    assert (key.prefix, key.secret_hash) == before
    assert whoami(Client(), secret) == "ada@anl.gov"


@pytest.mark.parametrize(
    "page", ["cluster", "endpoint", "user", "apikey", "requestlog", "maintenancewindow", "endpointstart"]
)
def test_changelists_render_with_filters(admin_client: Client, page: str) -> None:
    assert admin_client.get(f"/admin/resource_server/{page}/").status_code == 200


def test_request_log_is_read_only(admin_client: Client) -> None:
    assert admin_client.get("/admin/resource_server/requestlog/add/").status_code == 403
    assert RequestLog.objects.count() == 0


# Admin sign-in throttle. The counts live in the shared cache (Redis when REDIS_URL is set), which outlives a
# test: each test signs in from its own addresses and with its own usernames.

PASSWORD = "pw-long-enough-123"
PAUSED = "Too many failed sign-ins"


def fresh_address() -> str:
    return str(ipaddress.IPv4Address("10.0.0.0") + secrets.randbelow(2**24))


@pytest.fixture
def staff(settings: Any) -> str:
    # Each sign-in hashes a password; the production hasher would make these tests take many seconds.
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    username = f"admin-{uuid.uuid4().hex[:8]}"
    get_user_model().objects.create_superuser(username, f"{username}@example.org", PASSWORD)
    return username


def sign_in(username: str, password: str, address: str, **headers: str) -> tuple[bool, str]:
    """One sign-in on a fresh browser: (signed in?, the form's errors)."""
    client = Client(REMOTE_ADDR=address, **headers)
    response = client.post("/admin/login/?next=/admin/", {"username": username, "password": password})
    if response.status_code == 302:
        assert response["Location"] == "/admin/"
        return True, ""
    assert response.status_code == 200
    return False, " ".join(str(error) for error in response.context["form"].non_field_errors())


def fail_times(count: int, username: str, address: str) -> None:
    for _ in range(count):
        signed_in, _ = sign_in(username, "wrong-password", address)
        assert not signed_in


def test_sign_in_is_paused_after_repeated_failures_with_a_clear_message(staff: str) -> None:
    address = fresh_address()
    for _ in range(settings.AXES_FAILURE_LIMIT - 1):
        signed_in, errors = sign_in(staff, "wrong-password", address)
        assert "correct username and password" in errors and PAUSED not in errors
    signed_in, errors = sign_in(staff, "wrong-password", address)
    assert PAUSED in errors and "15 minutes" in errors
    # While paused even the right password is refused, without being checked.
    signed_in, errors = sign_in(staff, PASSWORD, address)
    assert not signed_in and PAUSED in errors


def test_one_address_trying_many_usernames_is_paused(staff: str) -> None:
    address = fresh_address()
    for _ in range(settings.AXES_FAILURE_LIMIT):
        fail_times(1, f"guess-{uuid.uuid4().hex[:8]}", address)
    signed_in, errors = sign_in(staff, PASSWORD, address)
    assert not signed_in and PAUSED in errors
    assert sign_in(staff, PASSWORD, fresh_address()) == (True, ""), "another address is not paused"


def test_one_username_tried_from_many_addresses_is_paused(staff: str) -> None:
    for _ in range(settings.AXES_FAILURE_LIMIT):
        fail_times(1, staff, fresh_address())
    signed_in, errors = sign_in(staff, PASSWORD, fresh_address())
    assert not signed_in and PAUSED in errors


def test_pause_reads_the_same_whether_or_not_the_username_exists(staff: str) -> None:
    unknown = f"nobody-{uuid.uuid4().hex[:8]}"
    known_address, unknown_address = fresh_address(), fresh_address()
    for _ in range(settings.AXES_FAILURE_LIMIT + 2):
        assert sign_in(staff, "wrong-password", known_address) == sign_in(unknown, "wrong-password", unknown_address)


def test_client_supplied_forwarded_for_does_not_change_the_counted_address(staff: str) -> None:
    address = fresh_address()
    for _ in range(settings.AXES_FAILURE_LIMIT):
        spoofed = {"HTTP_X_FORWARDED_FOR": fresh_address(), "HTTP_X_REAL_IP": fresh_address()}
        assert not sign_in(f"guess-{uuid.uuid4().hex[:8]}", "wrong-password", address, **spoofed)[0]
    signed_in, errors = sign_in(staff, PASSWORD, address, HTTP_X_FORWARDED_FOR=fresh_address())
    assert not signed_in and PAUSED in errors


def test_successful_sign_in_resets_the_count(staff: str) -> None:
    address = fresh_address()
    fail_times(settings.AXES_FAILURE_LIMIT - 1, staff, address)
    assert sign_in(staff, PASSWORD, address) == (True, "")
    fail_times(settings.AXES_FAILURE_LIMIT - 1, staff, address)
    assert sign_in(staff, PASSWORD, address) == (True, "")


def test_pause_ends_after_the_lockout_time(staff: str, settings: Any) -> None:
    settings.AXES_COOLOFF_TIME = timedelta(seconds=1)
    address = fresh_address()
    fail_times(settings.AXES_FAILURE_LIMIT, staff, address)
    assert PAUSED in sign_in(staff, PASSWORD, address)[1]
    # Retries while paused do not extend the pause (else an attacker could keep an admin out for ever).
    deadline = time.monotonic() + 10
    while not (result := sign_in(staff, PASSWORD, address))[0] and time.monotonic() < deadline:
        time.sleep(0.3)
    assert result == (True, "")


def test_admin_lifts_a_pause_with_the_documented_commands(staff: str) -> None:
    address = fresh_address()
    fail_times(settings.AXES_FAILURE_LIMIT, staff, address)
    assert PAUSED in sign_in(staff, PASSWORD, fresh_address())[1], "the username is paused"
    call_command("axes_reset_username", staff, stdout=io.StringIO())
    assert PAUSED in sign_in(staff, PASSWORD, address)[1], "the address is still paused"
    call_command("axes_reset_ip", address, stdout=io.StringIO())
    assert sign_in(staff, PASSWORD, address) == (True, "")
