"""The Authenticator seam and the Principal it produces."""

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

    @property
    def domain(self) -> str:
        """Identity-provider domain taken from the username (jdoe@anl.gov -> anl.gov)."""
        return self.username.rpartition("@")[2].lower() if "@" in self.username else ""


class Authenticator(Protocol):
    def claims(self, token: str) -> bool:
        """Whether this authenticator is the one to judge `token` (for example by its prefix)."""
        ...

    async def authenticate(self, token: str) -> Principal:
        """The caller behind `token`, or raise AuthenticationFailed / PermissionDenied."""
        ...
