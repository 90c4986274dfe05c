"""The Authenticator seam, the Principal it produces, and the Identity an identity provider vouches for."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol


class AuthKind(StrEnum):
    API_KEY = "api_key"
    GLOBUS = "globus"
    SERVICE = "service"


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling, as every later step (routing, limits, usage) sees it."""

    user_id: int
    identity_id: str
    username: str
    auth_kind: AuthKind
    groups: frozenset[str] = field(default_factory=frozenset)
    api_key_id: int | None = None
    api_key_prefix: str = ""  # the key's visible prefix (usage rows keep it after the key is deleted)
    limits_exempt: bool = False  # a service account: no limit or budget applies (User.limits_exempt)
    # Shown by whoami (FIRST's fields), never used to decide anything.
    name: str = ""
    identity_provider: str = ""  # its display name if it has one, else its id (as `User.identity_provider`)
    identity_provider_id: str = ""  # Globus's id of the identity provider; "" if unknown (API keys)

    @property
    def domain(self) -> str:
        """Identity-provider domain taken from the username (jdoe@anl.gov -> anl.gov)."""
        return self.username.rpartition("@")[2].lower() if "@" in self.username else ""


@dataclass(frozen=True, slots=True)
class Identity:
    """Who an identity provider says the caller is, before the gateway has found (or made) its user."""

    identity_id: str
    username: str
    name: str
    identity_provider: str
    auth_kind: AuthKind
    groups: frozenset[str] = field(default_factory=frozenset)
    identity_provider_id: str = ""


class PrincipalSource(Protocol):
    """Turns an identity into the gateway's Principal (the service keeping users in step, `services/users.py`)."""

    async def principal(self, identity: Identity) -> Principal:
        """The Principal for `identity`, its user created or refreshed; raise ServiceUnavailable if it cannot."""
        ...


class Authenticator(Protocol):
    def claims(self, token: str) -> bool:
        """Whether this authenticator is the one to judge `token` (for example by its prefix)."""
        ...

    async def authenticate(self, token: str) -> Principal:
        """The caller behind `token`, or raise AuthenticationFailed / PermissionDenied."""
        ...
