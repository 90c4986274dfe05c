"""Gateway API keys: `igw_<prefix>_<secret>`; only sha256 of the whole key is stored."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import secrets
import time
import weakref
from dataclasses import dataclass, replace
from datetime import datetime

from django.conf import settings
from django.db import DatabaseError
from django.utils import timezone

from resource_server.auth.base import AuthKind, Principal
from resource_server.auth.globus import GroupMemberships, require_gateway_groups
from resource_server.auth.sealing import unseal
from resource_server.cache import LocalTTLCache
from resource_server.db import DATABASE_PATIENCE_SECONDS, db_run
from resource_server.errors import AuthenticationFailed, ErrorCode, GatewayError, PermissionDenied, ServiceUnavailable
from resource_server.models import LOCAL_PROVIDER, ApiKey

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


# A flood of distinct made-up keys has nothing to remember: each needs a lookup. Per worker, at most this
# many lookups of keys it does not know run at once, and at most _UNKNOWN_KEYS_PENDING are in hand
# (running or waiting); beyond that a new unknown key is answered 503 at once. Keys the worker already
# knows are re-checked outside this bound, so a flood never delays them.
_UNKNOWN_LOOKUPS_AT_ONCE = 2
_UNKNOWN_KEYS_PENDING = 256
# While the database (or Globus Groups) cannot be reached, a key served from before the outage is tried
# again this often, so the outage costs each key one failed read per interval, not one per request.
_RETRY_AFTER_UNAVAILABLE = 2.0
_STALE_LOG_INTERVAL = 10.0


@dataclass(frozen=True, slots=True)
class _CheckedKey:
    principal: Principal
    expires_at: datetime | None
    checked_at: float  # time.monotonic() of the read that vouched for the key
    fresh_until: float  # past this the key is read again before it is trusted
    failing: bool = False  # the last read could not be made: served from before, within the outage grace


@dataclass(frozen=True, slots=True)
class _Refusal:
    """A remembered refusal, raised afresh each time (re-raising one exception would grow its traceback)."""

    error: type[AuthenticationFailed] | type[PermissionDenied]
    message: str
    code: ErrorCode

    def error_now(self) -> GatewayError:
        return self.error(self.message, code=self.code)


def _invalid() -> AuthenticationFailed:
    return AuthenticationFailed("Invalid API key.", code=ErrorCode.INVALID_API_KEY)


def _key_row(prefix: str) -> ApiKey | None:
    return ApiKey.objects.select_related("owner").filter(prefix=prefix).first()


class ApiKeyAuthenticator:
    """Checks gateway API keys, remembering good ones and refusals per worker.

    A key is re-read from the database every API_KEY_CACHE_SECONDS (so a revoked key stops working
    within that time on every worker) and its owner's Globus groups are re-checked at least every
    GLOBUS_GROUPS_CACHE_SECONDS. If that re-read fails because the database (or Globus Groups) cannot be
    reached, a key last vouched for within AUTH_OUTAGE_GRACE_SECONDS keeps working meanwhile. A refused
    key is refused from memory for API_KEY_NEGATIVE_CACHE_SECONDS; good keys and refusals are kept apart,
    so a flood of made-up keys cannot push good keys out.
    """

    def __init__(self, groups: GroupMemberships) -> None:
        self._groups = groups
        self._known: LocalTTLCache[_CheckedKey] = LocalTTLCache()
        self._refused: LocalTTLCache[_Refusal] = LocalTTLCache()
        self._checking: dict[str, asyncio.Future[_CheckedKey]] = {}
        self._unknown_pending = 0
        self._unknown_gates: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] = (
            weakref.WeakKeyDictionary()
        )
        self._stale_logged_at = float("-inf")

    def claims(self, token: str) -> bool:
        return token.startswith(KEY_MARKER)

    async def authenticate(self, token: str) -> Principal:
        if token[PREFIX_LENGTH : PREFIX_LENGTH + 1] != "_" or len(token) < PREFIX_LENGTH + 20:
            raise _invalid()
        digest = api_key_hash(token)
        checked = self._known.get(digest)
        if checked is None or checked.fresh_until <= time.monotonic():
            refusal = self._refused.get(digest)
            if refusal is not None:
                raise refusal.error_now()
            checked = await self._check_once(token, digest, stale=checked)
        if checked.expires_at is not None and checked.expires_at <= timezone.now():
            raise self._refuse(digest, _expired())
        return checked.principal

    async def _check_once(self, token: str, digest: str, *, stale: _CheckedKey | None) -> _CheckedKey:
        """One database read per key at a time: requests that find it uncached together share the read.

        Without this, every request in flight when a busy key's cache entry expires queues its own read
        behind the single sync_to_async thread, and all of them wait for all of those reads.

        A key known from before (`stale`) waits for the read at most DATABASE_PATIENCE_SECONDS, and not
        at all once a read has failed: a database that stops answering, rather than refusing, must not
        hold requests that the outage grace would let through.
        """
        pending = self._checking.get(digest)
        if pending is None or pending.get_loop() is not asyncio.get_running_loop():
            if stale is not None:
                pending = asyncio.ensure_future(self._check(token, digest))
            else:
                if self._unknown_pending >= _UNKNOWN_KEYS_PENDING:
                    raise ServiceUnavailable(
                        "The gateway is checking too many unfamiliar API keys at once. Please retry shortly.",
                        retry_after=1,
                        code=ErrorCode.AUTH_BUSY,
                    )
                self._unknown_pending += 1
                pending = asyncio.ensure_future(self._check_unknown(token, digest))
            self._checking[digest] = pending
            pending.add_done_callback(lambda done: self._forget_check(digest, done))
        # Shielded: a caller that goes away, or stops waiting, must not cancel the read the others wait for.
        if stale is not None:
            if not stale.failing:
                with contextlib.suppress(TimeoutError):
                    return await asyncio.wait_for(asyncio.shield(pending), DATABASE_PATIENCE_SECONDS)
            if pending.done():
                return await pending  # it ended just now: its answer, whatever it is
            fallback = self._stale(digest)
            if fallback is not None:
                return fallback
        return await asyncio.shield(pending)

    def _forget_check(self, digest: str, done: asyncio.Future[_CheckedKey]) -> None:
        if self._checking.get(digest) is done:
            del self._checking[digest]
        if not done.cancelled():
            done.exception()  # retrieved: if every caller left, the error is not reported as unhandled

    async def _check_unknown(self, token: str, digest: str) -> _CheckedKey:
        """The check of a key this worker does not know, within the flood bound (see _UNKNOWN_*)."""
        try:
            loop = asyncio.get_running_loop()
            gate = self._unknown_gates.get(loop)
            if gate is None:
                gate = self._unknown_gates[loop] = asyncio.Semaphore(_UNKNOWN_LOOKUPS_AT_ONCE)
            async with gate:
                return await self._check(token, digest)
        finally:
            self._unknown_pending -= 1

    async def _check(self, token: str, digest: str) -> _CheckedKey:
        try:
            return await self._read(token, digest)
        except (AuthenticationFailed, PermissionDenied) as refused:
            raise self._refuse(digest, refused) from None
        except ServiceUnavailable:
            stale = self._stale(digest)
            if stale is None:
                raise
            return stale

    async def _read(self, token: str, digest: str) -> _CheckedKey:
        """The key as the database has it now; raise if it is not good."""
        try:
            key = await db_run(_key_row, token[:PREFIX_LENGTH])
        except DatabaseError:
            raise ServiceUnavailable(
                "The gateway cannot check API keys right now. Please retry shortly.",
                retry_after=5,
                code=ErrorCode.AUTH_UNAVAILABLE,
            ) from None
        if key is None or not hmac.compare_digest(key.secret_hash, digest):
            raise _invalid()
        if key.revoked_at is not None:
            raise AuthenticationFailed("This API key has been revoked.", code=ErrorCode.REVOKED_API_KEY)
        if key.expires_at is not None and key.expires_at <= timezone.now():
            raise _expired()
        if not key.owner.is_active:
            raise AuthenticationFailed(
                "The account that owns this API key is disabled.", code=ErrorCode.ACCOUNT_DISABLED
            )
        principal = Principal(
            user_id=key.owner.pk,
            identity_id=key.owner.identity_id,
            username=key.owner.username,
            auth_kind=AuthKind.API_KEY,
            groups=await self._owner_groups(key),
            api_key_id=key.pk,
            api_key_prefix=key.prefix,
            limits_exempt=key.owner.limits_exempt,
            name=key.owner.name,
            identity_provider=key.owner.identity_provider,
        )
        config = settings.GATEWAY
        fresh = min(config.API_KEY_CACHE_SECONDS, config.GLOBUS_GROUPS_CACHE_SECONDS)
        now = time.monotonic()
        checked = _CheckedKey(principal, key.expires_at, checked_at=now, fresh_until=now + fresh)
        # Kept past its freshness for the outage grace: only served again if a re-read cannot be made.
        self._known.set(digest, checked, max(fresh, config.AUTH_OUTAGE_GRACE_SECONDS))
        return checked

    def _refuse(self, digest: str, refused: AuthenticationFailed | PermissionDenied) -> GatewayError:
        """Remember the refusal briefly (a client retrying a bad key costs no query) and return it."""
        self._known.pop(digest)
        refusal = _Refusal(type(refused), refused.message, refused.code)
        self._refused.set(digest, refusal, settings.GATEWAY.API_KEY_NEGATIVE_CACHE_SECONDS)
        return refusal.error_now()

    def _stale(self, digest: str) -> _CheckedKey | None:
        """What was known of the key before the re-read failed, if it is within AUTH_OUTAGE_GRACE_SECONDS."""
        stale = self._known.get(digest)
        now = time.monotonic()
        grace = settings.GATEWAY.AUTH_OUTAGE_GRACE_SECONDS
        if stale is None or now - stale.checked_at >= grace:
            return None
        if now - self._stale_logged_at >= _STALE_LOG_INTERVAL:
            self._stale_logged_at = now
            logger.warning(
                "cannot re-check API keys (database or Globus Groups unreachable); serving keys checked within "
                "the last %.0f s (AUTH_OUTAGE_GRACE_SECONDS)",
                grace,
            )
        retry = replace(stale, fresh_until=now + _RETRY_AFTER_UNAVAILABLE, failing=True)
        self._known.set(digest, retry, stale.checked_at + grace - now)
        return retry

    async def _owner_groups(self, key: ApiKey) -> frozenset[str]:
        """The owner's current Globus groups; accounts an admin created locally have none and are exempt."""
        if key.owner.identity_provider == LOCAL_PROVIDER:
            return frozenset()
        refresh_token = unseal(key.groups_refresh_token) if key.groups_refresh_token else None
        if refresh_token is None:
            groups: frozenset[str] = frozenset()
        else:
            groups = await self._groups.for_refresh_token(key.owner.identity_id, refresh_token)
        require_gateway_groups(groups)
        return groups


def _expired() -> AuthenticationFailed:
    return AuthenticationFailed("This API key has expired. Create a new one.", code=ErrorCode.EXPIRED_API_KEY)
