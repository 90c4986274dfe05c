"""Gateway API keys: `igw_<prefix>_<secret>`; only sha256 of the whole key is stored."""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime

from django.conf import settings
from django.db import DatabaseError
from django.utils import timezone

from resource_server.auth.base import AuthKind, Principal
from resource_server.errors import AuthenticationFailed, ServiceUnavailable
from resource_server.models import ApiKey

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
class _CachedKey:
    principal: Principal
    expires_at: datetime | None
    fresh_until: float


class ApiKeyAuthenticator:
    """Checks gateway API keys, remembering good ones for API_KEY_CACHE_SECONDS per worker.

    A revoked key therefore stops working within that many seconds on every worker.
    """

    max_cached = 10_000

    def __init__(self) -> None:
        self._cache: OrderedDict[str, _CachedKey] = OrderedDict()

    def claims(self, token: str) -> bool:
        return token.startswith(KEY_MARKER)

    async def authenticate(self, token: str) -> Principal:
        digest = api_key_hash(token)
        cached = self._cache.get(digest)
        if cached is None or cached.fresh_until < time.monotonic():
            try:
                cached = await self._load(token, digest)
            except DatabaseError:
                if cached is None:
                    raise ServiceUnavailable(
                        "The gateway cannot check API keys right now. Please retry shortly.",
                        retry_after=5,
                        code="auth_unavailable",
                    ) from None
                logger.warning("database unavailable; accepting API key %s from cache", cached.principal.api_key_id)
        if cached.expires_at is not None and cached.expires_at <= timezone.now():
            self._cache.pop(digest, None)
            raise AuthenticationFailed("This API key has expired. Create a new one.", code="expired_api_key")
        return cached.principal

    async def _load(self, token: str, digest: str) -> _CachedKey:
        prefix, separator = token[:PREFIX_LENGTH], token[PREFIX_LENGTH : PREFIX_LENGTH + 1]
        invalid = AuthenticationFailed("Invalid API key.", code="invalid_api_key")
        if separator != "_" or len(token) < PREFIX_LENGTH + 20:
            raise invalid
        key = await ApiKey.objects.select_related("owner").filter(prefix=prefix).afirst()
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
            api_key_id=key.pk,
        )
        entry = _CachedKey(principal, key.expires_at, time.monotonic() + settings.GATEWAY.API_KEY_CACHE_SECONDS)
        self._cache[digest] = entry
        self._cache.move_to_end(digest)
        while len(self._cache) > self.max_cached:
            self._cache.popitem(last=False)
        return entry
