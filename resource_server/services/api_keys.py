"""Creating, listing and revoking gateway API keys."""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta

from asgiref.sync import sync_to_async
from django.db import transaction
from django.utils import timezone

from resource_server.auth.api_keys import api_key_generate
from resource_server.auth.base import AuthKind, Principal
from resource_server.auth.globus import groups_refresh_token
from resource_server.auth.sealing import seal
from resource_server.errors import ErrorCode, InvalidRequest, NotFound, PermissionDenied
from resource_server.models import LOCAL_PROVIDER, ApiKey, User

MAX_ACTIVE_KEYS_PER_USER = 50


def user_get_or_create_local(*, username: str) -> tuple[User, bool]:
    """A user known only to this gateway (no Globus identity), for demos and service workflows."""
    return User.objects.get_or_create(
        username=username,
        defaults={"identity_id": f"local:{uuid.uuid4()}", "identity_provider": LOCAL_PROVIDER, "name": username},
    )


@transaction.atomic
def api_key_create(
    *, owner: User, name: str, expires_in_days: int | None = None, groups_refresh_token: str = ""
) -> tuple[ApiKey, str]:
    """Create a key for `owner`; returns the row and the full key, which is never shown again."""
    if expires_in_days is not None and expires_in_days < 1:
        raise ValueError("expires_in_days must be at least 1")
    key, prefix, digest = api_key_generate()
    expires_at = timezone.now() + timedelta(days=expires_in_days) if expires_in_days else None
    row = ApiKey.objects.create(
        owner=owner,
        name=name,
        prefix=prefix,
        secret_hash=digest,
        expires_at=expires_at,
        groups_refresh_token=seal(groups_refresh_token) if groups_refresh_token else "",
    )
    return row, key


def api_key_revoke(*, key: ApiKey) -> None:
    if key.revoked_at is None:
        key.revoked_at = timezone.now()
        key.save(update_fields=["revoked_at"])


def _active_keys(owner_id: int) -> int:
    now = timezone.now()
    return ApiKey.objects.filter(owner_id=owner_id, revoked_at__isnull=True).exclude(expires_at__lte=now).count()


def _create_for(principal: Principal, name: str, expires_in_days: int | None, refresh: str) -> tuple[ApiKey, str]:
    if _active_keys(principal.user_id) >= MAX_ACTIVE_KEYS_PER_USER:
        raise InvalidRequest(
            f"You already have {MAX_ACTIVE_KEYS_PER_USER} active API keys; revoke one first.",
            code=ErrorCode.TOO_MANY_KEYS,
        )
    owner = User.objects.get(pk=principal.user_id)
    return api_key_create(owner=owner, name=name, expires_in_days=expires_in_days, groups_refresh_token=refresh)


async def api_key_issue(
    *, principal: Principal, token: str, name: str, expires_in_days: int | None
) -> tuple[ApiKey, str]:
    """A key for a caller who proved who they are with Globus; it keeps a way to re-check their groups."""
    if principal.auth_kind is AuthKind.API_KEY:
        raise PermissionDenied(
            "API keys cannot create API keys. Authenticate with a Globus access token.",
            code=ErrorCode.API_KEY_NOT_ALLOWED,
        )
    refresh = await asyncio.to_thread(groups_refresh_token, token) if principal.auth_kind is AuthKind.GLOBUS else None
    return await sync_to_async(_create_for)(principal, name, expires_in_days, refresh or "")


def api_key_revoke_own(*, principal: Principal, key_id: str) -> ApiKey:
    """Revoke one of the caller's keys, named by its visible prefix."""
    key = ApiKey.objects.filter(owner_id=principal.user_id, prefix=key_id).first()
    if key is None:
        raise NotFound(f"You have no API key {key_id!r}.", code=ErrorCode.API_KEY_NOT_FOUND, param="key_id")
    api_key_revoke(key=key)
    return key
