"""The authenticate stage: an Authorization header value -> the caller, or 401."""

from __future__ import annotations

import pytest

from resource_server.auth.base import AuthKind
from resource_server.bootstrap import Runtime
from resource_server.errors import AuthenticationFailed
from tests.conftest import Seeded


@pytest.mark.parametrize("authorization", ["", "Bearer", "Bearer   ", "Basic dXNlcjpwYXNz", "igw_abc"])
async def test_a_header_without_a_bearer_credential_is_a_401_asking_for_one(
    authorization: str, runtime: Runtime
) -> None:
    with pytest.raises(AuthenticationFailed) as refused:
        await runtime.authenticators.principal_from_authorization(authorization)
    assert refused.value.code == "missing_credentials"
    assert 'error="invalid_request"' in refused.value.headers["WWW-Authenticate"]


@pytest.mark.django_db(transaction=True)
async def test_a_gateway_api_key_names_its_owner(seeded: Seeded, runtime: Runtime) -> None:
    principal = await runtime.authenticators.principal_from_authorization(
        seeded.auth["Authorization"].replace("Bearer", "bearer")
    )
    assert (principal.user_id, principal.api_key_id, principal.auth_kind) == (
        seeded.user.pk,
        seeded.api_key.pk,
        AuthKind.API_KEY,
    )
