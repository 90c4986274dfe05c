"""Creating and revoking gateway API keys."""

from __future__ import annotations

import uuid
from datetime import timedelta

from django.db import transaction
from django.utils import timezone

from resource_server.auth.api_keys import api_key_generate
from resource_server.models import ApiKey, User


def user_get_or_create_local(*, username: str) -> tuple[User, bool]:
    """A user known only to this gateway (no Globus identity), for demos and service workflows."""
    return User.objects.get_or_create(
        username=username,
        defaults={"identity_id": f"local:{uuid.uuid4()}", "identity_provider": "local", "name": username},
    )


@transaction.atomic
def api_key_create(*, owner: User, name: str, expires_in_days: int | None = None) -> tuple[ApiKey, str]:
    """Create a key for `owner`; returns the row and the full key, which is never shown again."""
    if expires_in_days is not None and expires_in_days < 1:
        raise ValueError("expires_in_days must be at least 1")
    key, prefix, digest = api_key_generate()
    expires_at = timezone.now() + timedelta(days=expires_in_days) if expires_in_days else None
    row = ApiKey.objects.create(owner=owner, name=name, prefix=prefix, secret_hash=digest, expires_at=expires_at)
    return row, key


def api_key_revoke(*, key: ApiKey) -> None:
    if key.revoked_at is None:
        key.revoked_at = timezone.now()
        key.save(update_fields=["revoked_at"])
