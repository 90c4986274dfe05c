"""The fake Globus Auth + Groups server, driven by the real globus-sdk clients over loopback HTTP."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import globus_sdk
import httpx
import pytest
from globus_sdk.transport import RequestsTransport, RetryConfig

from fakes.globus import (
    CLIENTS_DOMAIN,
    COMPUTE_RESOURCE_SERVER,
    COMPUTE_SCOPE,
    GROUPS_RESOURCE_SERVER,
    GROUPS_SCOPE,
    FakeGlobusConfig,
    create_app,
    token_id,
)
from tests.servers import free_port, running

GATEWAY_ID, GATEWAY_SECRET = "11111111-1111-4111-8111-111111111111", "gateway-secret"
OTHER_ID, OTHER_SECRET = "22222222-2222-4222-8222-222222222222", "other-secret"
SERVICE_ID = "33333333-3333-4333-8333-333333333333"
USER_INCLUDE = "session_info,identity_set_detail"


@pytest.fixture(scope="module")
def fake_url() -> Iterator[str]:
    port = free_port()
    args = [
        sys.executable,
        "-m",
        "fakes.globus",
        "--port",
        str(port),
        "--client",
        f"{GATEWAY_ID}:{GATEWAY_SECRET}",
        "--client",
        f"{OTHER_ID}:{OTHER_SECRET}",
    ]
    url = f"http://127.0.0.1:{port}"
    with running(args, f"{url}/fake/stats"):
        yield url


@pytest.fixture(autouse=True)
def globus_env(fake_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Point globus-sdk at the fake (read when a client is built) and start each test from a clean fake."""
    monkeypatch.setenv("GLOBUS_SDK_SERVICE_URL_AUTH", f"{fake_url}/")
    monkeypatch.setenv("GLOBUS_SDK_SERVICE_URL_GROUPS", f"{fake_url}/")
    httpx.post(f"{fake_url}/fake/reset").raise_for_status()


def no_retries() -> RetryConfig:
    return RetryConfig(max_retries=0)


def gateway_client(**kwargs: Any) -> globus_sdk.ConfidentialAppAuthClient:
    return globus_sdk.ConfidentialAppAuthClient(GATEWAY_ID, GATEWAY_SECRET, retry_config=no_retries(), **kwargs)


def register(fake_url: str, **fields: Any) -> str:
    response = httpx.post(f"{fake_url}/fake/tokens", json=fields)
    assert response.status_code == 201, response.text
    token: str = response.json()["token"]
    return token


def stats(fake_url: str) -> dict[str, Any]:
    data: dict[str, Any] = httpx.get(f"{fake_url}/fake/stats").json()
    return data


def introspect_with_policies(client: globus_sdk.ConfidentialAppAuthClient, token: str, policies: str) -> Any:
    # globus-sdk 4.10's oauth2_token_introspect has no authentication_policies parameter; Globus reads
    # it from the form body, so it is posted the way the SDK method posts its own fields.
    body = {"token": token, "include": USER_INCLUDE, "authentication_policies": policies}
    return client.post("/v2/oauth2/token/introspect", data=body, encoding="form")


# --- introspection ----------------------------------------------------------------------------


def test_active_token_introspects_to_its_identity_without_extras_unless_asked(fake_url: str) -> None:
    token = register(fake_url, identity={"username": "ada@anl.gov", "name": "Ada Lovelace"}, expires_in=600)

    data = gateway_client().oauth2_token_introspect(token).data

    assert data["active"] is True
    assert (data["username"], data["name"], data["email"]) == ("ada@anl.gov", "Ada Lovelace", "ada@anl.gov")
    assert data["aud"] == [GATEWAY_ID]
    assert data["scope"] == f"https://auth.globus.org/scopes/{GATEWAY_ID}/action_all"
    assert data["iss"] == "https://auth.globus.org"
    assert data["iat"] == data["nbf"] and data["exp"] - data["iat"] == 600
    assert abs(data["exp"] - (time.time() + 600)) < 5
    assert not data.keys() & {"session_info", "identity_set", "identity_set_detail", "policy_evaluations"}


def test_include_adds_session_info_and_identity_set_detail(fake_url: str) -> None:
    token = register(
        fake_url,
        identity={"id": "aaaaaaaa-0000-4000-8000-000000000001", "username": "ada@anl.gov"},
        linked_identities=[{"id": "aaaaaaaa-0000-4000-8000-000000000002", "username": "ada@gmail.com"}],
        authentications=[
            {"identity_id": "aaaaaaaa-0000-4000-8000-000000000002", "auth_time": 1700000000, "amr": ["mfa"]}
        ],
        session_id="55555555-0000-4000-8000-000000000000",
    )

    data = gateway_client().oauth2_token_introspect(token, include=f"{USER_INCLUDE},identity_set").data

    assert data["sub"] == "aaaaaaaa-0000-4000-8000-000000000001"
    assert data["identity_set"] == ["aaaaaaaa-0000-4000-8000-000000000001", "aaaaaaaa-0000-4000-8000-000000000002"]
    details = {detail["username"]: detail for detail in data["identity_set_detail"]}
    assert details.keys() == {"ada@anl.gov", "ada@gmail.com"}
    gmail = details["ada@gmail.com"]
    assert gmail["id"] == gmail["sub"] == "aaaaaaaa-0000-4000-8000-000000000002"
    assert gmail["identity_provider"] != details["ada@anl.gov"]["identity_provider"]
    assert gmail["identity_provider_display_name"] == "gmail.com"
    session = data["session_info"]
    assert session["session_id"] == "55555555-0000-4000-8000-000000000000"
    # Only the identity the user actually signed in with has an authentication, without an acr.
    assert session["authentications"] == {
        "aaaaaaaa-0000-4000-8000-000000000002": {
            "auth_time": 1700000000,
            "idp": gmail["identity_provider"],
            "amr": ["mfa"],
        }
    }


def test_policy_evaluations_answer_each_policy_passed(fake_url: str) -> None:
    token = register(fake_url, policies={"high-assurance": False})

    data = introspect_with_policies(gateway_client(), token, "high-assurance, domain-only").data

    assert data["policy_evaluations"] == {"high-assurance": {"evaluation": False}, "domain-only": {"evaluation": True}}
    assert "session_info" in data


@pytest.mark.parametrize("case", ["expired", "revoked", "unknown"])
def test_expired_revoked_and_unknown_tokens_are_inactive(fake_url: str, case: str) -> None:
    token = register(fake_url, expires_in=-1 if case == "expired" else 600)
    if case == "revoked":
        assert httpx.delete(f"{fake_url}/fake/tokens/{token}").status_code == 204
    if case == "unknown":
        token = "never-registered"

    data = introspect_with_policies(gateway_client(), token, "high-assurance").data

    assert data == {"active": False}


def test_token_is_inactive_to_a_client_outside_its_audience(fake_url: str) -> None:
    token = register(fake_url)
    other = globus_sdk.ConfidentialAppAuthClient(OTHER_ID, OTHER_SECRET, retry_config=no_retries())

    assert other.oauth2_token_introspect(token).data == {"active": False}
    assert gateway_client().oauth2_token_introspect(token)["active"] is True


def test_unknown_client_credentials_are_rejected_with_401(fake_url: str) -> None:
    token = register(fake_url)
    impostor = globus_sdk.ConfidentialAppAuthClient(GATEWAY_ID, "wrong-secret", retry_config=no_retries())

    with pytest.raises(globus_sdk.AuthAPIError) as caught:
        impostor.oauth2_token_introspect(token)

    assert caught.value.http_status == 401
    assert caught.value.code == "UNAUTHORIZED"
    assert stats(fake_url)["introspections"] == {}


def test_service_token_has_the_client_as_subject_and_no_session(fake_url: str) -> None:
    token = register(fake_url, kind="service", client_id=SERVICE_ID, name="batch runner")

    data = gateway_client().oauth2_token_introspect(token, include=USER_INCLUDE).data

    assert data["sub"] == data["client_id"] == SERVICE_ID
    assert data["username"] == f"{SERVICE_ID}@{CLIENTS_DOMAIN}"
    assert data["name"] == "batch runner"
    assert data["session_info"] == {"session_id": None, "authentications": {}}
    assert [identity["id"] for identity in data["identity_set_detail"]] == [SERVICE_ID]


def test_client_credentials_give_a_client_its_own_tokens_per_resource_server(fake_url: str) -> None:
    client = globus_sdk.ConfidentialAppAuthClient(GATEWAY_ID, GATEWAY_SECRET)

    tokens = client.oauth2_client_credentials_tokens(requested_scopes=[COMPUTE_SCOPE, GROUPS_SCOPE])

    assert set(tokens.by_resource_server) == {COMPUTE_RESOURCE_SERVER, GROUPS_RESOURCE_SERVER}
    compute = tokens.by_resource_server[COMPUTE_RESOURCE_SERVER]
    assert compute["scope"] == COMPUTE_SCOPE
    with pytest.raises(globus_sdk.AuthAPIError) as refused:
        globus_sdk.ConfidentialAppAuthClient(GATEWAY_ID, "wrong").oauth2_client_credentials_tokens(
            requested_scopes=[COMPUTE_SCOPE]
        )
    assert refused.value.http_status == 401


def test_a_mistyped_registration_is_refused(fake_url: str) -> None:
    response = httpx.post(f"{fake_url}/fake/tokens", json={"identity": {"username": "ada@anl.gov"}, "grups": []})

    assert response.status_code == 400
    assert "grups" in response.json()["detail"]


# --- dependent tokens and groups --------------------------------------------------------------


def test_dependent_groups_token_lists_the_users_active_groups(fake_url: str) -> None:
    token = register(
        fake_url,
        identity={"username": "ada@anl.gov"},
        groups=[
            {"id": "99999999-0000-4000-8000-000000000001", "name": "allowed", "role": "admin"},
            {"id": "99999999-0000-4000-8000-000000000002", "name": "pending", "status": "invited"},
        ],
    )

    dependent = gateway_client().oauth2_get_dependent_tokens(token, scope=GROUPS_SCOPE)
    groups_token = dependent.by_resource_server[GROUPS_RESOURCE_SERVER]
    groups = globus_sdk.GroupsClient(
        authorizer=globus_sdk.AccessTokenAuthorizer(groups_token["access_token"]), retry_config=no_retries()
    )

    assert isinstance(dependent.data, list)
    assert groups_token["scope"] == GROUPS_SCOPE and groups_token["refresh_token"] is None
    active = groups.get_my_groups().data
    assert [group["name"] for group in active] == ["allowed"]
    assert active[0]["my_memberships"][0]["username"] == "ada@anl.gov"
    assert active[0]["my_memberships"][0]["role"] == "admin"
    invited = groups.get_my_groups(statuses="invited").data
    assert [group["id"] for group in invited] == ["99999999-0000-4000-8000-000000000002"]
    assert stats(fake_url)["grants"] == {"urn:globus:auth:grant_type:dependent_token": 1}


def test_dependent_grant_with_refresh_tokens_adds_a_refresh_token(fake_url: str) -> None:
    token = register(fake_url)

    dependent = gateway_client().oauth2_get_dependent_tokens(token, refresh_tokens=True)

    assert dependent.by_resource_server[GROUPS_RESOURCE_SERVER]["refresh_token"]


def test_token_without_the_groups_dependency_yields_no_dependent_tokens(fake_url: str) -> None:
    token = register(fake_url, dependent_scopes=[])

    dependent = gateway_client().oauth2_get_dependent_tokens(token)

    assert dependent.data == [] and dependent.by_resource_server == {}


def test_dependent_grant_for_a_revoked_token_is_an_invalid_grant(fake_url: str) -> None:
    token = register(fake_url)
    httpx.delete(f"{fake_url}/fake/tokens/{token}").raise_for_status()

    with pytest.raises(globus_sdk.AuthAPIError) as caught:
        gateway_client().oauth2_get_dependent_tokens(token)

    # OAuth errors carry no "code" for globus-sdk to parse: the reason is only in the raw body.
    assert caught.value.http_status == 400
    assert caught.value.raw_json == {"error": "invalid_grant"}


def test_groups_refuses_a_token_without_the_groups_scope(fake_url: str) -> None:
    user_token = register(fake_url, groups=[{"name": "allowed"}])
    groups = globus_sdk.GroupsClient(authorizer=globus_sdk.AccessTokenAuthorizer(user_token), retry_config=no_retries())

    with pytest.raises(globus_sdk.GroupsAPIError) as caught:
        groups.get_my_groups()

    assert caught.value.http_status == 401


def test_native_app_revocation_deactivates_the_token(fake_url: str) -> None:
    token = register(fake_url)
    native = globus_sdk.NativeAppAuthClient("44444444-4444-4444-8444-444444444444", retry_config=no_retries())

    assert native.oauth2_revoke_token(token).data == {"active": False}
    assert gateway_client().oauth2_token_introspect(token).data == {"active": False}


# --- outages, latency and counting ------------------------------------------------------------


def test_down_mode_makes_the_sdk_raise_503_until_the_service_is_back(fake_url: str) -> None:
    token = register(fake_url)
    outage = httpx.post(f"{fake_url}/fake/faults", json={"status": 503, "retry_after": 1})
    assert outage.status_code == 200

    with pytest.raises(globus_sdk.GlobusAPIError) as caught:
        gateway_client().oauth2_token_introspect(token)
    assert caught.value.http_status == 503
    assert caught.value.headers["Retry-After"] == "1"

    assert httpx.delete(f"{fake_url}/fake/faults").status_code == 204
    assert gateway_client().oauth2_token_introspect(token)["active"] is True


def test_sdk_default_retries_each_reach_the_fake(fake_url: str) -> None:
    # globus-sdk retries 429/5xx by default (5 times, seconds apart); the fake counts every attempt.
    token = register(fake_url)
    httpx.post(f"{fake_url}/fake/faults", json={"status": 503}).raise_for_status()
    client = globus_sdk.ConfidentialAppAuthClient(
        GATEWAY_ID, GATEWAY_SECRET, retry_config=RetryConfig(max_retries=2, backoff=lambda ctx: 0.0)
    )

    with pytest.raises(globus_sdk.GlobusAPIError):
        client.oauth2_token_introspect(token)

    assert stats(fake_url)["requests"] == {"POST /v2/oauth2/token/introspect": 3}


def test_groups_outage_leaves_auth_up(fake_url: str) -> None:
    token = register(fake_url)
    httpx.post(f"{fake_url}/fake/faults", json={"status": 502, "service": "groups"}).raise_for_status()
    client = gateway_client()
    groups_token = client.oauth2_get_dependent_tokens(token).by_resource_server[GROUPS_RESOURCE_SERVER]
    groups = globus_sdk.GroupsClient(
        authorizer=globus_sdk.AccessTokenAuthorizer(groups_token["access_token"]), retry_config=no_retries()
    )

    with pytest.raises(globus_sdk.GroupsAPIError) as caught:
        groups.get_my_groups()

    assert caught.value.http_status == 502


def test_hanging_service_times_the_sdk_out(fake_url: str) -> None:
    token = register(fake_url)
    httpx.post(f"{fake_url}/fake/faults", json={"delay": 5}).raise_for_status()
    client = gateway_client(transport=RequestsTransport(http_timeout=0.3))

    started = time.monotonic()
    with pytest.raises(globus_sdk.GlobusTimeoutError):
        client.oauth2_token_introspect(token)

    assert time.monotonic() - started < 2


def test_concurrent_introspections_overlap_and_are_counted_per_token(fake_url: str) -> None:
    # A delay with no status is latency: calls overlap, as they must for single-flight tests to mean anything.
    token, other = register(fake_url), register(fake_url)
    httpx.post(f"{fake_url}/fake/faults", json={"delay": 0.3, "service": "auth"}).raise_for_status()

    def introspect(candidate: str) -> bool:
        return bool(gateway_client().oauth2_token_introspect(candidate)["active"])

    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(introspect, [token] * 7 + [other]))

    counters = stats(fake_url)
    assert all(answers)
    assert counters["introspections"] == {token_id(token): 7, token_id(other): 1}
    assert counters["requests"] == {"POST /v2/oauth2/token/introspect": 8}
    assert counters["max_in_flight"] >= 2
    assert counters["in_flight"] == 0


# --- the app factory, in process --------------------------------------------------------------


async def test_configured_latency_and_lifetime_apply_to_globus_routes_only() -> None:
    app = create_app(FakeGlobusConfig(clients={GATEWAY_ID: GATEWAY_SECRET}, latency=0.2, token_lifetime=120))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://fake") as client:
        started = time.monotonic()
        token = (await client.post("/fake/tokens", json={})).json()["token"]
        registered = time.monotonic()
        dependent = await client.post(
            "/v2/oauth2/token",
            data={"grant_type": "urn:globus:auth:grant_type:dependent_token", "token": token},
            auth=(GATEWAY_ID, GATEWAY_SECRET),
        )
        answered = time.monotonic()

    assert registered - started < 0.15
    assert answered - registered >= 0.2
    assert [item["expires_in"] for item in dependent.json()] == [120]


@pytest.mark.parametrize("bad", [{"latency": -1}, {"clients": {}}, {"token_lifetime": 0}])
def test_bad_config_fails_at_creation(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        FakeGlobusConfig(**bad)
