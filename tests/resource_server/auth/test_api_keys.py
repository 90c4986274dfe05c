"""Gateway API keys as the authenticator sees them: refusals remembered briefly, floods of unknown keys bounded."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import pytest
from asgiref.sync import sync_to_async
from django.conf import settings

from resource_server.auth.api_keys import ApiKeyAuthenticator, api_key_generate
from resource_server.auth.base import Principal
from resource_server.auth.globus import GroupMemberships
from resource_server.errors import AuthenticationFailed, GatewayError
from resource_server.models import ApiKey
from tests.conftest import Seeded

pytestmark = pytest.mark.django_db(transaction=True)


async def _create_key_row(seeded: Seeded, prefix: str, digest: str) -> None:
    await sync_to_async(ApiKey.objects.create)(owner=seeded.user, name="late", prefix=prefix, secret_hash=digest)


async def test_a_refused_key_is_answered_from_memory_until_the_negative_ttl_passes(
    seeded: Seeded, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(settings.GATEWAY, "API_KEY_NEGATIVE_CACHE_SECONDS", 3.0)
    authenticator = ApiKeyAuthenticator(GroupMemberships())
    key, prefix, digest = api_key_generate()
    with pytest.raises(AuthenticationFailed) as refused:
        await authenticator.authenticate(key)
    assert refused.value.code == "invalid_api_key"
    # The row appears behind the worker's back: the worker still answers from memory, without a lookup.
    await _create_key_row(seeded, prefix, digest)
    with pytest.raises(AuthenticationFailed) as again:
        await authenticator.authenticate(key)
    assert again.value.code == "invalid_api_key"
    assert again.value is not refused.value  # raised afresh, not one exception object growing a traceback
    # Once the refusal is older than the TTL the key is read again, and now it is good.
    deadline = time.monotonic() + 15
    while True:
        try:
            principal = await authenticator.authenticate(key)
            break
        except AuthenticationFailed:
            assert time.monotonic() < deadline, "the refusal outlived API_KEY_NEGATIVE_CACHE_SECONDS"
            await asyncio.sleep(0.2)
    assert principal.user_id == seeded.user.pk


async def test_a_revoked_key_is_remembered_as_revoked(seeded: Seeded, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(settings.GATEWAY, "API_KEY_CACHE_SECONDS", 0.0)
    authenticator = ApiKeyAuthenticator(GroupMemberships())
    await authenticator.authenticate(seeded.key)
    await sync_to_async(ApiKey.objects.filter(pk=seeded.api_key.pk).update)(revoked_at=seeded.api_key.created_at)
    codes = []
    for _ in range(3):
        with pytest.raises(AuthenticationFailed) as refused:
            await authenticator.authenticate(seeded.key)
        codes.append(refused.value.code)
    assert codes == ["revoked_api_key"] * 3


async def test_a_flood_of_unknown_keys_is_bounded_while_known_keys_are_checked_as_usual(
    seeded: Seeded, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Known keys are read again on every use here, so they too need the database during the flood.
    monkeypatch.setattr(settings.GATEWAY, "API_KEY_CACHE_SECONDS", 0.0)
    authenticator = ApiKeyAuthenticator(GroupMemberships())
    known = await authenticator.authenticate(seeded.key)
    flood = [api_key_generate()[0] for _ in range(600)]
    results: list[Principal | BaseException] = await asyncio.gather(
        *(authenticator.authenticate(key) for key in flood[:300]),
        authenticator.authenticate(seeded.key),
        *(authenticator.authenticate(key) for key in flood[300:]),
        return_exceptions=True,
    )
    assert results.pop(300) == known
    assert all(isinstance(result, GatewayError) for result in results)
    codes = Counter(result.code for result in results if isinstance(result, GatewayError))
    assert set(codes) == {"invalid_api_key", "auth_busy"}
    # Only so many unknown keys are looked up at once; the rest are told at once to come back.
    assert codes["invalid_api_key"] <= 300
    busy = next(result for result in results if isinstance(result, GatewayError) and result.code == "auth_busy")
    assert (busy.status, busy.headers["Retry-After"]) == (503, "1")
    # The flood is over: an unknown key is looked up again, a known one is still good.
    with pytest.raises(AuthenticationFailed):
        await authenticator.authenticate(api_key_generate()[0])
    assert await authenticator.authenticate(seeded.key) == known
