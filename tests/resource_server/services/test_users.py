"""Identities become the gateway's users and Principals (the database-outage fallback: tests/integration)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from resource_server.auth.base import AuthKind, Identity
from resource_server.models import LOCAL_PROVIDER, User
from resource_server.services.users import UserPrincipals

pytestmark = pytest.mark.django_db(transaction=True)

ADA = Identity(
    identity_id="5f2d6a4e-1111-4c3b-9e1a-000000000001",
    username="ada@anl.gov",
    name="Ada",
    identity_provider="ANL",
    auth_kind=AuthKind.GLOBUS,
    groups=frozenset({"g1", "g2"}),
)


async def test_an_identity_becomes_the_principal_of_its_user_kept_in_step() -> None:
    users = UserPrincipals()
    first = await users.principal(ADA)
    renamed = await users.principal(replace(ADA, name="Ada Lovelace"))

    assert first.user_id == renamed.user_id
    assert (first.identity_id, first.username, first.auth_kind, first.groups) == (
        ADA.identity_id,
        "ada@anl.gov",
        AuthKind.GLOBUS,
        frozenset({"g1", "g2"}),
    )
    user = await User.objects.aget(pk=first.user_id)
    assert (user.identity_id, user.name, user.identity_provider) == (ADA.identity_id, "Ada Lovelace", "ANL")


async def test_a_local_account_with_the_same_username_is_adopted() -> None:
    local = await User.objects.acreate(identity_id="local:1", username="ada@anl.gov", identity_provider=LOCAL_PROVIDER)

    principal = await UserPrincipals().principal(ADA)

    assert principal.user_id == local.pk
    assert await User.objects.acount() == 1
