"""End to end: Globus access tokens from the fake Globus Auth + Groups, checked by the real gateway process."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from globus_sdk.gare import to_gare

from fakes.globus import DEMO_CLIENT_ID, DEMO_CLIENT_SECRET, token_id
from resource_server.models import Cluster, Endpoint
from tests.conftest import seed
from tests.e2e.conftest import e2e_gateway, usage_row
from tests.servers import fake_globus_server

pytestmark = pytest.mark.django_db(transaction=True)

POLICY = str(uuid.uuid4())
GATEWAY_GROUP = str(uuid.uuid4())
SPECIAL_GROUP = str(uuid.uuid4())
SERVICE_CLIENT = str(uuid.uuid4())
TOKEN_CACHE_SECONDS = 2
CHAT = {"model": "demo-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@pytest.fixture(scope="module")
def globus_url() -> Iterator[str]:
    with fake_globus_server() as url:
        yield url


@pytest.fixture(scope="module")
def gateway(django_db_setup: None, model_server: str, globus_url: str, tmp_path_factory: Any) -> Iterator[str]:
    env = {
        "GLOBUS_SDK_SERVICE_URL_AUTH": globus_url,
        "GLOBUS_SDK_SERVICE_URL_GROUPS": globus_url,
        "GLOBUS_CLIENT_ID": DEMO_CLIENT_ID,
        "GLOBUS_CLIENT_SECRET": DEMO_CLIENT_SECRET,
        "GLOBUS_ALLOWED_DOMAINS": "anl.gov,uchicago.edu",
        "GLOBUS_POLICIES": POLICY,
        "GLOBUS_REQUIRED_GROUPS": GATEWAY_GROUP,
        "GLOBUS_SERVICE_CLIENTS": SERVICE_CLIENT,
        "GLOBUS_TOKEN_CACHE_SECONDS": str(TOKEN_CACHE_SECONDS),
        "GLOBUS_GROUPS_CACHE_SECONDS": str(TOKEN_CACHE_SECONDS),
    }
    with e2e_gateway(tmp_path_factory, **env) as url:
        yield url


@pytest.fixture(autouse=True)
def world(transactional_db: None, gateway: str, globus_url: str, model_server: str) -> None:
    """Fresh Globus state and registry: the demo model, and one more open only to SPECIAL_GROUP."""
    httpx.post(f"{globus_url}fake/reset").raise_for_status()
    seeded = seed(model_server, username="local-admin@example.org")
    special = Cluster.objects.create(name="special", allowed_groups=[SPECIAL_GROUP])
    Endpoint.objects.create(
        cluster=special, model="group-model", backend="direct", backend_config=seeded.endpoint.backend_config
    )


def register(globus_url: str, **changes: Any) -> str:
    """A token at the fake Globus Auth; by default Ada at anl.gov, passing the policy, in the gateway's group."""
    body: dict[str, Any] = {
        "identity": {"username": "ada@anl.gov", "name": "Ada Lovelace"},
        "groups": [{"id": GATEWAY_GROUP, "name": "gateway users"}],
        "policies": {POLICY: True},
        **changes,
    }
    response = httpx.post(f"{globus_url}fake/tokens", json=body)
    assert response.status_code == 201, response.text
    return str(response.json()["token"])


def call(
    gateway: str, token: str, path: str = "/resource_server/v1/chat/completions", body: Any = CHAT
) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"}
    if body is None:
        return httpx.get(f"{gateway}{path}", headers=headers, timeout=30)
    return httpx.post(f"{gateway}{path}", json=body, headers=headers, timeout=30)


def stats(globus_url: str) -> dict[str, Any]:
    data: dict[str, Any] = httpx.get(f"{globus_url}fake/stats").json()
    return data


def test_openai_client_with_a_globus_token_gets_completions(gateway: str, globus_url: str) -> None:
    token = register(globus_url)
    client = openai.OpenAI(base_url=f"{gateway}/resource_server/v1", api_key=token, max_retries=0)
    reply = client.chat.completions.create(model="demo-model", messages=[{"role": "user", "content": "hi"}])
    assert reply.choices[0].message.content
    chunks = list(client.completions.create(model="demo-model", prompt="a b", stream=True, max_tokens=3))
    assert chunks
    me = call(gateway, token, "/resource_server/whoami", None).json()
    assert (me["username"], me["auth_kind"], me["groups"]) == ("ada@anl.gov", "globus", [GATEWAY_GROUP])
    # FIRST's fields too, as the fake Globus Auth describes Ada's identity.
    assert {key: me[key] for key in ("id", "name", "username", "user_group_uuids", "idp_id", "idp_name")} == {
        "id": me["identity_id"],
        "name": "Ada Lovelace",
        "username": "ada@anl.gov",
        "user_group_uuids": [GATEWAY_GROUP],
        "idp_id": str(uuid.uuid5(uuid.NAMESPACE_DNS, "anl.gov")),  # the fake's identity provider of the domain
        "idp_name": "anl.gov",
    }
    assert me["auth_service"] == "globus"
    assert usage_row(user__username="ada@anl.gov")


@pytest.mark.parametrize(
    ("changes", "codes"),
    [
        ({"expires_in": -1}, {"inactive_token", "expired_token"}),
        # The fake, like Globus, answers active=false to a client outside the token's audience.
        ({"audience": [str(uuid.uuid4())]}, {"inactive_token", "invalid_audience"}),
        ({"scope": "openid profile email"}, {"insufficient_scope"}),
    ],
)
def test_bad_tokens_get_401_saying_which_check_failed(
    gateway: str, globus_url: str, changes: dict[str, Any], codes: set[str]
) -> None:
    token = register(globus_url, **changes)
    response = call(gateway, token)
    assert response.status_code == 401
    assert 'error="invalid_token"' in response.headers["WWW-Authenticate"]
    assert response.json()["error"]["code"] in codes
    assert token not in response.text


def test_revoked_token_is_refused_once_the_cache_expires(gateway: str, globus_url: str) -> None:
    token = register(globus_url)
    assert call(gateway, token).status_code == 200
    httpx.delete(f"{globus_url}fake/tokens/{token}").raise_for_status()
    time.sleep(TOKEN_CACHE_SECONDS + 0.5)
    response = call(gateway, token)
    assert (response.status_code, response.json()["error"]["code"]) == (401, "inactive_token")


def test_identity_from_a_domain_not_allowed_is_403_listing_identities(gateway: str, globus_url: str) -> None:
    token = register(globus_url, identity={"username": "ada@gmail.com", "name": "Ada"})
    response = call(gateway, token)
    assert response.status_code == 403
    assert "ada@gmail.com" in response.json()["error"]["message"]


def test_linked_allowed_identity_counts_only_if_used_in_this_session(gateway: str, globus_url: str) -> None:
    gmail, uchicago = str(uuid.uuid4()), str(uuid.uuid4())
    identities = {
        "identity": {"id": gmail, "username": "ada@gmail.com", "name": "Ada"},
        "linked_identities": [{"id": uchicago, "username": "ada@uchicago.edu", "name": "Ada"}],
    }
    linked_but_not_logged_in = register(globus_url, **identities)
    assert call(gateway, linked_but_not_logged_in).status_code == 403

    both_logged_in = register(
        globus_url, **identities, authentications=[{"identity_id": gmail}, {"identity_id": uchicago}]
    )
    assert call(gateway, both_logged_in).status_code == 200
    assert call(gateway, both_logged_in, "/resource_server/whoami", None).json()["username"] == "ada@uchicago.edu"


def test_failed_policy_answers_a_globus_auth_requirements_error(gateway: str, globus_url: str) -> None:
    token = register(globus_url, policies={POLICY: False})
    response = call(gateway, token)
    assert response.status_code == 401
    gare = to_gare(response.json())
    assert gare is not None
    assert gare.authorization_parameters.session_required_policies == [POLICY]


def test_caller_outside_the_required_groups_is_403(gateway: str, globus_url: str) -> None:
    token = register(globus_url, groups=[])
    response = call(gateway, token)
    assert (response.status_code, response.json()["error"]["code"]) == (403, "group_membership_required")


def test_group_restricted_endpoint_is_hidden_and_refused_outside_the_group(gateway: str, globus_url: str) -> None:
    outsider = register(globus_url)
    models = call(gateway, outsider, "/resource_server/v1/models", None).json()
    assert [model["id"] for model in models["data"]] == ["demo-model"]
    assert call(gateway, outsider, body={**CHAT, "model": "group-model"}).status_code == 403

    member = register(
        globus_url,
        identity={"username": "grace@anl.gov", "name": "Grace"},
        groups=[{"id": GATEWAY_GROUP, "name": "users"}, {"id": SPECIAL_GROUP, "name": "special"}],
    )
    models = call(gateway, member, "/resource_server/v1/models", None).json()
    assert sorted(model["id"] for model in models["data"]) == ["demo-model", "group-model"]
    assert call(gateway, member, body={**CHAT, "model": "group-model"}).status_code == 200


def test_listed_service_client_is_accepted_without_session(gateway: str, globus_url: str) -> None:
    body = {"kind": "service", "client_id": SERVICE_CLIENT, "name": "nightly runner"}
    token = httpx.post(f"{globus_url}fake/tokens", json=body).json()["token"]
    response = call(gateway, token)
    assert response.status_code == 200, response.text
    me = call(gateway, token, "/resource_server/whoami", None).json()
    assert (me["identity_id"], me["auth_kind"]) == (SERVICE_CLIENT, "service")


def test_globus_outage_is_503_and_recovers_without_caching_a_refusal(gateway: str, globus_url: str) -> None:
    token = register(globus_url)
    httpx.post(f"{globus_url}fake/faults", json={"status": 503, "service": "auth"}).raise_for_status()
    response = call(gateway, token)
    assert response.status_code == 503
    assert "Retry-After" in response.headers
    httpx.delete(f"{globus_url}fake/faults").raise_for_status()
    assert call(gateway, token).status_code == 200


def test_fifty_concurrent_requests_with_one_new_token_introspect_once(gateway: str, globus_url: str) -> None:
    token = register(globus_url)
    # Slow Globus down so that all fifty requests arrive while the first check is still running.
    httpx.post(f"{globus_url}fake/faults", json={"delay": 0.5, "service": "auth"}).raise_for_status()

    async def burst() -> list[int]:
        async with httpx.AsyncClient(timeout=30) as client:
            headers = {"Authorization": f"Bearer {token}"}
            url = f"{gateway}/resource_server/v1/chat/completions"
            responses = await asyncio.gather(*(client.post(url, json=CHAT, headers=headers) for _ in range(50)))
        return [response.status_code for response in responses]

    try:
        assert asyncio.run(burst()) == [200] * 50
    finally:
        httpx.delete(f"{globus_url}fake/faults").raise_for_status()
    assert stats(globus_url)["introspections"][token_id(token)] == 1


def test_api_keys_created_with_a_globus_token_act_as_their_owner(gateway: str, globus_url: str) -> None:
    token = register(
        globus_url,
        identity={"username": "grace@anl.gov", "name": "Grace"},
        groups=[{"id": GATEWAY_GROUP, "name": "users"}, {"id": SPECIAL_GROUP, "name": "special"}],
    )
    created = call(gateway, token, "/resource_server/v1/api-keys", {"name": "workflow", "expires_in_days": 30})
    assert created.status_code == 201, created.text
    key = created.json()["key"]
    assert key.startswith(created.json()["id"] + "_")

    me = call(gateway, key, "/resource_server/whoami", None).json()
    assert (me["username"], me["auth_kind"]) == ("grace@anl.gov", "api_key")
    assert set(me["groups"]) == {GATEWAY_GROUP, SPECIAL_GROUP}, "groups come from the stored Groups refresh token"
    assert call(gateway, key, body={**CHAT, "model": "group-model"}).status_code == 200

    refused = call(gateway, key, "/resource_server/v1/api-keys", {"name": "from a key"})
    assert (refused.status_code, refused.json()["error"]["code"]) == (403, "api_key_not_allowed")

    listed = call(gateway, token, "/resource_server/v1/api-keys", None).json()
    assert [item["id"] for item in listed["data"]] == [created.json()["id"]]
    assert "key" not in listed["data"][0]

    revoked = httpx.delete(
        f"{gateway}/resource_server/v1/api-keys/{created.json()['id']}", headers={"Authorization": f"Bearer {token}"}
    )
    assert revoked.status_code == 200 and revoked.json()["revoked_at"]
    assert call(gateway, key).status_code == 401


def test_nobody_revokes_someone_elses_key(gateway: str, globus_url: str) -> None:
    owner = register(globus_url)
    key_id = call(gateway, owner, "/resource_server/v1/api-keys", {"name": "mine"}).json()["id"]
    other = register(globus_url, identity={"username": "eve@anl.gov", "name": "Eve"})
    response = httpx.delete(
        f"{gateway}/resource_server/v1/api-keys/{key_id}", headers={"Authorization": f"Bearer {other}"}
    )
    assert response.status_code == 404
