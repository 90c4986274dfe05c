"""Globus Auth access tokens, checked the way a careful resource server should.

A token is introspected once (single-flight per worker), checked for activity, expiry, audience,
scope and the configured authentication policies, and mapped to the session identity from an allowed
identity provider. Group memberships come from Globus Groups through a dependent token. Results are
cached under sha256(token) in the worker and, with Redis, across workers; failures to reach Globus are
503s and are never cached. Every Globus call runs in a thread, off the event loop.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import globus_sdk
import orjson
from django.conf import settings

from resource_server.auth.base import AuthKind, Identity, Principal, PrincipalSource
from resource_server.cache import LocalTTLCache, shared_cache
from resource_server.errors import AuthenticationFailed, ErrorCode, PermissionDenied, ServiceUnavailable

logger = logging.getLogger(__name__)

GROUPS_RESOURCE_SERVER = "groups.api.globus.org"
GROUPS_SCOPE = "urn:globus:auth:scope:groups.api.globus.org:view_my_groups_and_memberships"
LOGIN_HINT = "python tools/inference_auth_token.py authenticate --force"


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class TokenIdentity:
    """The identity a validated token acts for."""

    identity_id: str
    username: str
    name: str
    identity_provider: str  # its display name if the token says it, else its id
    identity_provider_id: str
    service: bool
    expires_at: float


def _split(value: object) -> set[str]:
    if isinstance(value, str):
        return {part for part in value.replace(",", " ").split() if part}
    if isinstance(value, Iterable):
        return {str(part) for part in value}
    return set()


def _domain(username: str) -> str:
    return username.rpartition("@")[2].lower()


def token_identity(
    data: Mapping[str, Any],
    *,
    client_id: str,
    scope: str,
    policies: Iterable[str] = (),
    allowed_domains: Iterable[str] = (),
    service_clients: Iterable[str] = (),
    now: float | None = None,
) -> TokenIdentity:
    """Check an introspection response and choose the identity it acts for; raise on any failed check."""
    now = time.time() if now is None else now
    if data.get("active") is not True:
        raise AuthenticationFailed(
            "The Globus token is not active: it expired or was revoked.", code=ErrorCode.INACTIVE_TOKEN
        )
    expires_at = float(data.get("exp") or 0)
    if expires_at <= now:
        raise AuthenticationFailed("The Globus token has expired. Get a new one.", code=ErrorCode.EXPIRED_TOKEN)
    if client_id not in _split(data.get("aud")):
        raise AuthenticationFailed(
            "The Globus token was not issued for this gateway (wrong audience).", code=ErrorCode.INVALID_AUDIENCE
        )
    if scope not in _split(data.get("scope")):
        raise AuthenticationFailed(
            f"The Globus token does not carry this gateway's scope ({scope}).", code=ErrorCode.INSUFFICIENT_SCOPE
        )
    subject = str(data.get("sub") or "")
    token_client = str(data.get("client_id") or "")
    if token_client in set(service_clients) and subject == token_client:
        # A confidential client acting as itself: there is no user session to check.
        return TokenIdentity(
            identity_id=subject,
            username=str(data.get("username") or subject),
            name=str(data.get("name") or "service client"),
            identity_provider="clients.auth.globus.org",
            identity_provider_id="",  # introspection does not say it for a client acting as itself
            service=True,
            expires_at=expires_at,
        )
    _check_policies(data, list(policies))
    identity = _session_identity(data, {domain.lower() for domain in allowed_domains})
    return TokenIdentity(
        identity_id=str(identity.get("sub") or identity.get("id")),
        username=str(identity.get("username")),
        name=str(identity.get("name") or ""),
        identity_provider=str(
            identity.get("identity_provider_display_name") or identity.get("identity_provider") or ""
        ),
        identity_provider_id=str(identity.get("identity_provider") or ""),
        service=False,
        expires_at=expires_at,
    )


def _check_policies(data: Mapping[str, Any], policies: list[str]) -> None:
    if not policies:
        return
    evaluations = data.get("policy_evaluations") or {}
    failed = [policy for policy in policies if not (evaluations.get(policy) or {}).get("evaluation")]
    if failed:
        message = "This gateway requires a login that satisfies its authentication policies."
        # A Globus Auth Requirements Error, so that globus-sdk clients know how to re-authenticate.
        raise AuthenticationFailed(
            f"{message} Log in again: {LOGIN_HINT}",
            code=ErrorCode.AUTHORIZATION_REQUIRED,
            extra={
                "code": ErrorCode.AUTHORIZATION_REQUIRED,
                "authorization_parameters": {
                    "session_message": message,
                    "session_required_policies": failed,
                },
            },
        )


def _session_identity(data: Mapping[str, Any], allowed_domains: set[str]) -> Mapping[str, Any]:
    details: dict[str, Mapping[str, Any]] = {
        str(item.get("sub") or item.get("id")): item for item in data.get("identity_set_detail") or ()
    }
    primary = str(data.get("sub") or "")
    if not allowed_domains:
        chosen: Mapping[str, Any] = details.get(primary) or {
            "sub": primary,
            "username": data.get("username"),
            "name": data.get("name"),
        }
        return chosen
    session = (data.get("session_info") or {}).get("authentications") or {}
    # The token's own identity first, then the others the researcher logged in with in this session.
    candidates = sorted(session, key=lambda identity_id: identity_id != primary)
    for identity_id in candidates:
        identity = details.get(identity_id)
        if identity and _domain(str(identity.get("username", ""))) in allowed_domains:
            return identity
    logged_in = sorted(str(details[i].get("username")) for i in candidates if i in details) or ["none"]
    raise PermissionDenied(
        f"None of the identities you are logged in with ({', '.join(logged_in)}) is from an allowed "
        f"identity provider ({', '.join(sorted(allowed_domains))}). Log in with an identity from one of "
        f"them: {LOGIN_HINT}",
        code=ErrorCode.IDENTITY_NOT_ALLOWED,
    )


class _GlobusClients:
    """globus-sdk clients, one set per thread (requests sessions are not made for sharing)."""

    def __init__(self) -> None:
        self._local = threading.local()

    def auth(self) -> globus_sdk.ConfidentialAppAuthClient:
        client: globus_sdk.ConfidentialAppAuthClient | None = getattr(self._local, "auth", None)
        if client is None:
            config = settings.GATEWAY
            client = globus_sdk.ConfidentialAppAuthClient(
                client_id=config.GLOBUS_CLIENT_ID,
                client_secret=config.GLOBUS_CLIENT_SECRET.get_secret_value(),
                transport=globus_sdk.transport.RequestsTransport(http_timeout=config.GLOBUS_TIMEOUT_SECONDS),
                # One quick retry at most: a caller waiting on Globus is better served by a fast 503.
                retry_config=globus_sdk.transport.RetryConfig(max_retries=1, max_sleep=1),
            )
            self._local.auth = client
        return client

    @staticmethod
    def groups(access_token: str) -> globus_sdk.GroupsClient:
        return globus_sdk.GroupsClient(
            authorizer=globus_sdk.AccessTokenAuthorizer(access_token),
            transport=globus_sdk.transport.RequestsTransport(http_timeout=settings.GATEWAY.GLOBUS_TIMEOUT_SECONDS),
            retry_config=globus_sdk.transport.RetryConfig(max_retries=1, max_sleep=1),
        )


_clients = _GlobusClients()


def _unavailable(exc: Exception, what: str) -> ServiceUnavailable:
    status = getattr(exc, "http_status", None)
    logger.warning("Globus %s failed: %s (HTTP %s)", what, type(exc).__name__, status)
    return ServiceUnavailable(
        "Globus Auth cannot be reached to check your credentials right now. Please retry shortly.",
        retry_after=5,
        code=ErrorCode.GLOBUS_UNAVAILABLE,
    )


def _introspect(token: str) -> dict[str, Any]:
    form = {"token": token, "include": "session_info,identity_set_detail"}
    policies = settings.GATEWAY.GLOBUS_POLICIES
    if policies:
        form["authentication_policies"] = ",".join(policies)
    try:
        # globus-sdk's oauth2_token_introspect() cannot pass policies, so post the documented form directly.
        response = _clients.auth().post("/v2/oauth2/token/introspect", data=form, encoding="form")
    except (globus_sdk.GlobusAPIError, globus_sdk.NetworkError) as exc:
        raise _unavailable(exc, "token introspection") from None
    data: dict[str, Any] = dict(response.data or {})
    return data


def _active_group_ids(groups: Iterable[Mapping[str, Any]]) -> frozenset[str]:
    return frozenset(
        str(group["id"])
        for group in groups
        if any(membership.get("status") == "active" for membership in group.get("my_memberships") or ())
    )


def _groups_with(access_token: str) -> frozenset[str]:
    try:
        return _active_group_ids(_clients.groups(access_token).get_my_groups(statuses="active"))
    except (globus_sdk.GlobusAPIError, globus_sdk.NetworkError) as exc:
        raise _unavailable(exc, "groups lookup") from None


def _dependent_groups_token(token: str, *, offline: bool) -> dict[str, Any] | None:
    try:
        tokens = _clients.auth().oauth2_get_dependent_tokens(token, refresh_tokens=offline, scope=GROUPS_SCOPE)
    except globus_sdk.GlobusAPIError as exc:
        if exc.http_status in (400, 401, 403):
            raise AuthenticationFailed(
                "Globus refused to act on your behalf for Globus Groups; log in again and accept the consent.",
                code=ErrorCode.GROUPS_CONSENT_REQUIRED,
            ) from None
        raise _unavailable(exc, "dependent token grant") from None
    except globus_sdk.NetworkError as exc:
        raise _unavailable(exc, "dependent token grant") from None
    by_server: dict[str, dict[str, Any]] = dict(tokens.by_resource_server)
    return by_server.get(GROUPS_RESOURCE_SERVER)


def _groups_for_token(token: str) -> frozenset[str]:
    groups_token = _dependent_groups_token(token, offline=False)
    if groups_token is None:
        logger.warning("the gateway's scope has no Globus Groups dependency; callers have no groups")
        return frozenset()
    return _groups_with(str(groups_token["access_token"]))


def groups_refresh_token(token: str) -> str | None:
    """A long-lived Groups refresh token for the caller, so an API key can re-check their groups later."""
    groups_token = _dependent_groups_token(token, offline=True)
    refresh = groups_token.get("refresh_token") if groups_token else None
    return str(refresh) if refresh else None


def _groups_for_refresh_token(refresh_token: str) -> frozenset[str]:
    try:
        response = _clients.auth().oauth2_refresh_token(refresh_token)
    except globus_sdk.GlobusAPIError as exc:
        if exc.http_status in (400, 401, 403):
            logger.warning("a stored Groups refresh token was refused; its API key's owner has no groups now")
            return frozenset()
        raise _unavailable(exc, "refresh grant") from None
    except globus_sdk.NetworkError as exc:
        raise _unavailable(exc, "refresh grant") from None
    return _groups_with(str(response.by_resource_server[GROUPS_RESOURCE_SERVER]["access_token"]))


class GroupMemberships:
    """Group ids per identity, cached for GLOBUS_GROUPS_CACHE_SECONDS in the worker and in Redis."""

    def __init__(self) -> None:
        self._local: LocalTTLCache[frozenset[str]] = LocalTTLCache()

    async def cached(self, identity_id: str) -> frozenset[str] | None:
        groups = self._local.get(identity_id)
        if groups is not None:
            return groups
        shared = shared_cache()
        raw = await shared.get(f"globus:groups:{identity_id}") if shared else None
        if raw is None:
            return None
        groups = frozenset(orjson.loads(raw))
        self._local.set(identity_id, groups, settings.GATEWAY.GLOBUS_GROUPS_CACHE_SECONDS)
        return groups

    async def remember(self, identity_id: str, groups: frozenset[str]) -> None:
        ttl = settings.GATEWAY.GLOBUS_GROUPS_CACHE_SECONDS
        self._local.set(identity_id, groups, ttl)
        shared = shared_cache()
        if shared:
            await shared.set(f"globus:groups:{identity_id}", orjson.dumps(sorted(groups)), ttl)

    async def for_token(self, identity_id: str, token: str) -> frozenset[str]:
        groups = await self.cached(identity_id)
        if groups is None:
            groups = await asyncio.to_thread(_groups_for_token, token)
            await self.remember(identity_id, groups)
        return groups

    async def for_refresh_token(self, identity_id: str, refresh_token: str) -> frozenset[str]:
        groups = await self.cached(identity_id)
        if groups is None:
            groups = await asyncio.to_thread(_groups_for_refresh_token, refresh_token)
            await self.remember(identity_id, groups)
        return groups


def require_gateway_groups(groups: frozenset[str]) -> None:
    """GLOBUS_REQUIRED_GROUPS: membership in any one of them admits a caller to the gateway."""
    required = settings.GATEWAY.GLOBUS_REQUIRED_GROUPS
    if required and not groups & set(required):
        raise PermissionDenied(
            "You are not a member of any Globus group that grants access to this gateway. "
            "Ask its administrators to add you to one.",
            code=ErrorCode.GROUP_MEMBERSHIP_REQUIRED,
        )


def _principal_json(principal: Principal, expires_at: float) -> bytes:
    return orjson.dumps(
        {
            "user_id": principal.user_id,
            "identity_id": principal.identity_id,
            "username": principal.username,
            "auth_kind": principal.auth_kind.value,
            "groups": sorted(principal.groups),
            "name": principal.name,
            "identity_provider": principal.identity_provider,
            "identity_provider_id": principal.identity_provider_id,
            "expires_at": expires_at,
        }
    )


def _principal_from_json(raw: bytes) -> tuple[Principal, float]:
    data = orjson.loads(raw)
    principal = Principal(
        user_id=data["user_id"],
        identity_id=data["identity_id"],
        username=data["username"],
        auth_kind=AuthKind(data["auth_kind"]),
        groups=frozenset(data["groups"]),
        # Absent from entries an older version cached (until they expire).
        name=data.get("name", ""),
        identity_provider=data.get("identity_provider", ""),
        identity_provider_id=data.get("identity_provider_id", ""),
    )
    return principal, float(data["expires_at"])


class GlobusAuthenticator:
    """Accepts Globus access tokens for the gateway's scope (everything that is not a gateway API key).

    It checks the token and finds who it acts for (an `Identity`); `users` turns that into the gateway's
    Principal (keeping the user in step with Globus), and the Principal is what is cached for the token.
    """

    def __init__(self, users: PrincipalSource, groups: GroupMemberships) -> None:
        self._users = users
        self._groups = groups
        self._local: LocalTTLCache[tuple[Principal, float]] = LocalTTLCache()
        self._in_flight: dict[str, asyncio.Task[tuple[Principal, float]]] = {}

    def claims(self, token: str) -> bool:
        return True

    async def authenticate(self, token: str) -> Principal:
        if not settings.GATEWAY.globus_enabled:
            raise AuthenticationFailed(
                "This gateway accepts only its own API keys; the bearer token is not one.",
                code=ErrorCode.INVALID_API_KEY,
            )
        digest = token_digest(token)
        cached = self._local.get(digest) or await self._shared_get(digest)
        if cached is None:
            task = self._in_flight.get(digest)
            if task is None:
                # Concurrent requests with the same new token share one introspection.
                task = asyncio.ensure_future(self._validate(token, digest))
                self._in_flight[digest] = task
                task.add_done_callback(lambda _: self._in_flight.pop(digest, None))
            # shield: a caller that goes away must not cancel the check others are waiting for.
            cached = await asyncio.shield(task)
        principal, expires_at = cached
        if expires_at <= time.time():
            self._local.pop(digest)
            raise AuthenticationFailed("The Globus token has expired. Get a new one.", code=ErrorCode.EXPIRED_TOKEN)
        return principal

    async def _shared_get(self, digest: str) -> tuple[Principal, float] | None:
        shared = shared_cache()
        raw = await shared.get(f"globus:token:{digest}") if shared else None
        if raw is None:
            return None
        cached = _principal_from_json(raw)
        self._local.set(digest, cached, self._ttl(cached[1]))
        return cached

    @staticmethod
    def _ttl(expires_at: float) -> float:
        return min(settings.GATEWAY.GLOBUS_TOKEN_CACHE_SECONDS, expires_at - time.time())

    async def _validate(self, token: str, digest: str) -> tuple[Principal, float]:
        config = settings.GATEWAY
        data = await asyncio.to_thread(_introspect, token)
        identity = token_identity(
            data,
            client_id=config.GLOBUS_CLIENT_ID,
            scope=config.globus_scope,
            policies=config.GLOBUS_POLICIES,
            allowed_domains=config.GLOBUS_ALLOWED_DOMAINS,
            service_clients=config.GLOBUS_SERVICE_CLIENTS,
        )
        if identity.service:
            groups: frozenset[str] = frozenset()
        else:
            groups = await self._groups.for_token(identity.identity_id, token)
            require_gateway_groups(groups)
        principal = await self._users.principal(
            Identity(
                identity_id=identity.identity_id,
                username=identity.username,
                name=identity.name,
                identity_provider=identity.identity_provider,
                identity_provider_id=identity.identity_provider_id,
                auth_kind=AuthKind.SERVICE if identity.service else AuthKind.GLOBUS,
                groups=groups,
            )
        )
        ttl = self._ttl(identity.expires_at)
        self._local.set(digest, (principal, identity.expires_at), ttl)
        shared = shared_cache()
        if shared:
            await shared.set(f"globus:token:{digest}", _principal_json(principal, identity.expires_at), ttl)
        return principal, identity.expires_at
