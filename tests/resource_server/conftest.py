"""What the resource_server tests share: an admin signed in."""

from __future__ import annotations

from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.test import Client


@pytest.fixture
def admin_client(client: Client, settings: Any) -> Client:
    """Django's test client, signed in as a superuser (MD5 hashing: the default hasher costs 0.25 s a test)."""
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    admin = get_user_model().objects.create_superuser("root", "root@example.org", "pw-long-enough-123")
    client.force_login(admin)
    return client
