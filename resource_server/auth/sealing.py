"""Encryption at rest for the few secrets the gateway must keep (Globus Groups refresh tokens)."""

from __future__ import annotations

import base64
import hashlib
from typing import TYPE_CHECKING

from django.conf import settings

if TYPE_CHECKING:
    from cryptography.fernet import Fernet

# cryptography is imported where used: only keys linked to a Globus login have sealed values, and a
# worker that never meets one saves its memory.


def _fernet() -> Fernet:
    from cryptography.fernet import Fernet

    # A dedicated key derived from SECRET_KEY; rotating SECRET_KEY makes sealed values unreadable.
    digest = hashlib.sha256(b"inference-gateway/sealing/" + settings.SECRET_KEY.encode()).digest()
    return Fernet(base64.urlsafe_b64encode(digest))


def seal(value: str) -> str:
    return _fernet().encrypt(value.encode()).decode()


def unseal(value: str) -> str | None:
    """The sealed value, or None if it was sealed under another SECRET_KEY or tampered with."""
    from cryptography.fernet import InvalidToken

    try:
        return _fernet().decrypt(value.encode()).decode()
    except InvalidToken:
        return None
