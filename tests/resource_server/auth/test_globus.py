"""Globus token checks, against globus-sdk's own registered responses (no network)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs

import pytest
import responses
from django.conf import settings
from globus_sdk.gare import is_gare
from globus_sdk.testing import RegisteredResponse, get_last_request, load_response
from pydantic import SecretStr

from resource_server.auth.base import AuthKind
from resource_server.auth.globus import GlobusAuthenticator, GroupMemberships, token_identity
from resource_server.errors import AuthenticationFailed, PermissionDenied, ServiceUnavailable
from resource_server.models import User
from resource_server.services.users import UserPrincipals

CLIENT_ID = str(uuid.uuid4())
SCOPE = f"https://auth.globus.org/scopes/{CLIENT_ID}/action_all"
POLICY = str(uuid.uuid4())
ANL_IDP = str(uuid.uuid4())
ADA = {
    "sub": str(uuid.uuid4()),
    "username": "ada@anl.gov",
    "name": "Ada",
    "identity_provider": ANL_IDP,
    "identity_provider_display_name": "ANL",
}
ADA_GMAIL = {"sub": str(uuid.uuid4()), "username": "ada@gmail.com", "name": "Ada", "identity_provider": "google"}


def introspection(**changes: Any) -> dict[str, Any]:
    """An introspection response for Ada, logged in with her Google identity and her ANL identity."""
    data: dict[str, Any] = {
        "active": True,
        "scope": SCOPE,
        "client_id": str(uuid.uuid4()),
        "sub": ADA_GMAIL["sub"],
        "username": ADA_GMAIL["username"],
        "name": "Ada",
        "aud": [CLIENT_ID, "auth.globus.org"],
        "exp": time.time() + 3600,
        "identity_set_detail": [ADA_GMAIL, ADA],
        "session_info": {
            "session_id": str(uuid.uuid4()),
            "authentications": {ADA_GMAIL["sub"]: {"idp": "google"}, ADA["sub"]: {"idp": "anl"}},
        },
        "policy_evaluations": {POLICY: {"evaluation": True}},
    }
    data.update(changes)
    return data


def check(data: dict[str, Any], **options: Any) -> Any:
    return token_identity(
        data, client_id=CLIENT_ID, scope=SCOPE, **{"allowed_domains": ["anl.gov", "uchicago.edu"], **options}
    )


def test_the_session_identity_from_an_allowed_domain_is_chosen() -> None:
    identity = check(introspection())
    assert (identity.identity_id, identity.username, identity.identity_provider) == (ADA["sub"], "ada@anl.gov", "ANL")
    assert not identity.service


@pytest.mark.parametrize(
    ("changes", "code"),
    [
        ({"active": False}, "inactive_token"),
        ({"exp": time.time() - 1}, "expired_token"),
        ({"aud": ["someone-else"]}, "invalid_audience"),
        ({"scope": "openid profile"}, "insufficient_scope"),
    ],
)
def test_failed_token_checks_are_401_naming_the_check(changes: dict[str, Any], code: str) -> None:
    with pytest.raises(AuthenticationFailed) as failed:
        check(introspection(**changes))
    assert failed.value.code == code
    assert failed.value.status == 401
    assert failed.value.headers["WWW-Authenticate"].startswith(
        'Bearer realm="inference-gateway", error="invalid_token"'
    )


def test_no_allowed_identity_is_403_listing_who_is_logged_in() -> None:
    data = introspection(session_info={"authentications": {ADA_GMAIL["sub"]: {}}})
    with pytest.raises(PermissionDenied) as denied:
        check(data)
    assert "ada@gmail.com" in denied.value.message
    assert "anl.gov" in denied.value.message
    assert "authenticate --force" in denied.value.message


def test_failed_policy_is_a_globus_auth_requirements_error() -> None:
    data = introspection(policy_evaluations={POLICY: {"evaluation": False}})
    with pytest.raises(AuthenticationFailed) as failed:
        check(data, policies=[POLICY])
    body = failed.value.envelope()
    assert is_gare(body)
    assert body["authorization_parameters"]["session_required_policies"] == [POLICY]
    assert set(body["error"]) == {"message", "type", "param", "code"}


def test_missing_policy_evaluation_fails_closed() -> None:
    with pytest.raises(AuthenticationFailed):
        check(introspection(policy_evaluations={}), policies=[POLICY])


def test_listed_service_client_needs_no_session_or_domain() -> None:
    client = str(uuid.uuid4())
    data = introspection(
        client_id=client,
        sub=client,
        username=f"{client}@clients.auth.globus.org",
        session_info={},
        identity_set_detail=[],
    )
    identity = check(data, service_clients=[client], policies=[POLICY])
    assert identity.service and identity.identity_id == client


def test_unlisted_client_token_is_treated_as_a_user_without_session() -> None:
    client = str(uuid.uuid4())
    data = introspection(client_id=client, sub=client, session_info={}, identity_set_detail=[])
    with pytest.raises(PermissionDenied):
        check(data)


@pytest.fixture
def globus(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(settings.GATEWAY, "GLOBUS_CLIENT_ID", CLIENT_ID)
    monkeypatch.setattr(settings.GATEWAY, "GLOBUS_CLIENT_SECRET", SecretStr("unit-test-secret"))
    monkeypatch.setattr(settings.GATEWAY, "GLOBUS_ALLOWED_DOMAINS", ["anl.gov"])
    monkeypatch.setattr(settings.GATEWAY, "GLOBUS_POLICIES", [POLICY])
    monkeypatch.setattr(settings.GATEWAY, "GLOBUS_REQUIRED_GROUPS", [])
    responses.start()
    yield
    responses.stop()
    responses.reset()


def register_introspection(data: dict[str, Any], status: int = 200) -> None:
    RegisteredResponse(
        service="auth", path="/v2/oauth2/token/introspect", method="POST", json=data, status=status
    ).add()


@pytest.mark.django_db(transaction=True)
async def test_valid_token_becomes_a_principal_with_groups(globus: None) -> None:
    register_introspection(introspection())
    load_response("auth.oauth2_get_dependent_tokens", case="groups")
    groups = load_response("groups.get_my_groups")
    principal = await GlobusAuthenticator(UserPrincipals(), GroupMemberships()).authenticate("token-1")
    assert principal.auth_kind is AuthKind.GLOBUS
    assert principal.username == "ada@anl.gov"
    expected = {group["id"] for group in groups.json if any(m["status"] == "active" for m in group["my_memberships"])}
    assert principal.groups == expected
    user = await User.objects.aget(pk=principal.user_id)
    assert (user.identity_id, user.identity_provider) == (ADA["sub"], "ANL")
    # What whoami shows under FIRST's names.
    assert (principal.name, principal.identity_provider, principal.identity_provider_id) == ("Ada", "ANL", ANL_IDP)
    introspect_call = next(call.request for call in responses.calls if call.request.url.endswith("/introspect"))
    form = parse_qs(introspect_call.body)  # type: ignore[arg-type]
    assert form["include"] == ["session_info,identity_set_detail"]
    assert form["authentication_policies"] == [POLICY]
    assert introspect_call.headers["Authorization"].startswith("Basic ")
    assert get_last_request() is not None


@pytest.mark.django_db(transaction=True)
async def test_concurrent_requests_with_one_new_token_introspect_once(globus: None) -> None:
    register_introspection(introspection())
    load_response("auth.oauth2_get_dependent_tokens", case="groups")
    load_response("groups.get_my_groups")
    authenticator = GlobusAuthenticator(UserPrincipals(), GroupMemberships())
    principals = await asyncio.gather(*(authenticator.authenticate("same-token") for _ in range(20)))
    assert len({p.user_id for p in principals}) == 1
    assert sum(call.request.url.endswith("/introspect") for call in responses.calls) == 1


@pytest.mark.parametrize("status", [500, 502, 503])
async def test_globus_errors_are_503_and_not_cached(globus: None, status: int) -> None:
    register_introspection({"errors": [{"status": str(status)}]}, status=status)
    authenticator = GlobusAuthenticator(UserPrincipals(), GroupMemberships())
    with pytest.raises(ServiceUnavailable) as unavailable:
        await authenticator.authenticate("token-2")
    assert unavailable.value.headers["Retry-After"] == "5"
    first_calls = len(responses.calls)
    with pytest.raises(ServiceUnavailable):
        await authenticator.authenticate("token-2")
    assert len(responses.calls) > first_calls, "a failure to reach Globus must not be remembered"


async def test_inactive_token_is_refused_without_a_database_write(globus: None) -> None:
    register_introspection({"active": False})
    with pytest.raises(AuthenticationFailed) as failed:
        await GlobusAuthenticator(UserPrincipals(), GroupMemberships()).authenticate("revoked")
    assert failed.value.code == "inactive_token"
