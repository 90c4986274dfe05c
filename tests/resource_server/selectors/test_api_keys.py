"""The caller's API keys, read."""

from __future__ import annotations

from datetime import timedelta

import pytest

from resource_server.auth.base import AuthKind, Principal
from resource_server.models import ApiKey, User
from resource_server.selectors.api_keys import api_key_list


@pytest.mark.django_db
def test_a_caller_lists_only_their_own_keys_newest_first() -> None:
    ada, bob = (User.objects.create(identity_id=name, username=f"{name}@anl.gov") for name in ("ada", "bob"))
    older = ApiKey.objects.create(owner=ada, name="older", prefix="igw_000000000001", secret_hash="1" * 64)
    newer = ApiKey.objects.create(owner=ada, name="newer", prefix="igw_000000000002", secret_hash="2" * 64)
    ApiKey.objects.create(owner=bob, name="bob's", prefix="igw_000000000003", secret_hash="3" * 64)
    ApiKey.objects.filter(pk=older.pk).update(created_at=newer.created_at - timedelta(minutes=1))
    principal = Principal(user_id=ada.pk, identity_id="ada", username="ada@anl.gov", auth_kind=AuthKind.API_KEY)

    assert api_key_list(principal=principal) == [newer, older]
