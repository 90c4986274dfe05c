"""Gateway API keys: `igw_<prefix>_<secret>`; only sha256 of the whole key is stored."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import secrets
import time
from dataclasses import dataclass
from datetime import datetime

from django.conf import settings
from django.db import DatabaseError
from django.utils import timezone

from resource_server.auth.base import AuthKind, Principal
from resource_server.auth.globus import group_memberships, require_gateway_groups
from resource_server.auth.sealing import unseal
from resource_server.cache import LocalTTLCache
from resource_server.errors import AuthenticationFailed, ServiceUnavailable
from resource_server.models import ApiKey
from resource_server.services.users import LOCAL_PROVIDER

logger = logging.getLogger(__name__)

KEY_MARKER = "igw_"
PREFIX_LENGTH = len(KEY_MARKER) + 12


def api_key_generate() -> tuple[str, str, str]:
    """A new key as (full key, visible prefix, sha256 hex of the full key)."""
    prefix = KEY_MARKER + secrets.token_hex(6)
    key = f"{prefix}_{secrets.token_urlsafe(32)}"
    return key, prefix, api_key_hash(key)


def api_key_hash(key: str) -> str:
    # The secret is 256 random bits, so a fast hash is enough; a password KDF would only add latency.
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class _CheckedKey:
    principal: Principal
    expires_at: datetime | None
    checked_at: float


class ApiKeyAuthenticator:
    """Checks gateway API keys, remembering good ones per worker.

    A key is re-read from the database every API_KEY_CACHE_SECONDS (so a revoked key stops working
    within that time on every worker) and its owner's Globus groups are re-checked at least every
    GLOBUS_GROUPS_CACHE_SECONDS.
    """

    def __init__(self) -> None:
        self._cache: LocalTTLCache[_CheckedKey] = LocalTTLCache()
        self._checking: dict[str, asyncio.Future[_CheckedKey]] = {}

    def claims(self, token: str) -> bool:
        return token.startswith(KEY_MARKER)

    async def authenticate(self, token: str) -> Principal:
        digest = api_key_hash(token)
        checked = self._cache.get(digest)
        if checked is None:
            checked = await self._check_once(token, digest)
        if checked.expires_at is not None and checked.expires_at <= timezone.now():
            self._cache.pop(digest)
            raise AuthenticationFailed("This API key has expired. Create a new one.", code="expired_api_key")
        return checked.principal

    async def _check_once(self, token: str, digest: str) -> _CheckedKey:
        """One database read per key at a time: requests that find it uncached together share the read.

        Without this, every request in flight when a busy key's cache entry expires queues its own read
        behind the single sync_to_async thread, and all of them wait for all of those reads.
        """
        pending = self._checking.get(digest)
        if pending is None or pending.get_loop() is not asyncio.get_running_loop():
            pending = asyncio.ensure_future(self._check(token, digest))
            self._checking[digest] = pending
            pending.add_done_callback(lambda done: self._forget_check(digest, done))
        # Shielded: a caller that goes away must not cancel the read the others wait for.
        return await asyncio.shield(pending)

    def _forget_check(self, digest: str, done: asyncio.Future[_CheckedKey]) -> None:
        if self._checking.get(digest) is done:
            del self._checking[digest]
        if not done.cancelled():
            done.exception()  # retrieved: if every caller left, the error is not reported as unhandled

    async def _check(self, token: str, digest: str) -> _CheckedKey:
        prefix, separator = token[:PREFIX_LENGTH], token[PREFIX_LENGTH : PREFIX_LENGTH + 1]
        invalid = AuthenticationFailed("Invalid API key.", code="invalid_api_key")
        if separator != "_" or len(token) < PREFIX_LENGTH + 20:
            raise invalid
        try:
            key = await ApiKey.objects.select_related("owner").filter(prefix=prefix).afirst()
        except DatabaseError:
            raise ServiceUnavailable(
                "The gateway cannot check API keys right now. Please retry shortly.",
                retry_after=5,
                code="auth_unavailable",
            ) from None
        if key is None or not hmac.compare_digest(key.secret_hash, digest):
            raise invalid
        if key.revoked_at is not None:
            raise AuthenticationFailed("This API key has been revoked.", code="revoked_api_key")
        if not key.owner.is_active:
            raise AuthenticationFailed("The account that owns this API key is disabled.", code="account_disabled")
        principal = Principal(
            user_id=key.owner.pk,
            identity_id=key.owner.identity_id,
            username=key.owner.username,
            auth_kind=AuthKind.API_KEY,
            groups=await self._owner_groups(key),
            api_key_id=key.pk,
        )
        config = settings.GATEWAY
        checked = _CheckedKey(principal, key.expires_at, time.monotonic())
        self._cache.set(digest, checked, min(config.API_KEY_CACHE_SECONDS, config.GLOBUS_GROUPS_CACHE_SECONDS))
        return checked

    @staticmethod
    async def _owner_groups(key: ApiKey) -> frozenset[str]:
        """The owner's current Globus groups; accounts an admin created locally have none and are exempt."""
        if key.owner.identity_provider == LOCAL_PROVIDER:
            return frozenset()
        refresh_token = unseal(key.groups_refresh_token) if key.groups_refresh_token else None
        if refresh_token is None:
            groups: frozenset[str] = frozenset()
        else:
            groups = await group_memberships.for_refresh_token(key.owner.identity_id, refresh_token)
        require_gateway_groups(groups)
        return groups
