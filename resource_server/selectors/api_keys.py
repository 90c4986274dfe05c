"""Reads of gateway API keys (creating and revoking them: `services/api_keys.py`)."""

from __future__ import annotations

from resource_server.auth.base import Principal
from resource_server.models import ApiKey


def api_key_list(*, principal: Principal) -> list[ApiKey]:
    """The caller's own keys, newest first (revoked and expired ones included)."""
    return list(ApiKey.objects.filter(owner_id=principal.user_id).order_by("-created_at"))
