"""The authenticate stage: the first authenticator that claims a bearer token decides who the caller is.

Authenticators check credentials (`auth/`); the Globus one is handed `UserPrincipals`, the service that
keeps the gateway's users in step with the identities Globus vouches for. The composition root
(`resource_server/bootstrap.py`) builds the chain.
"""

from __future__ import annotations

from collections.abc import Sequence

from resource_server.auth.api_keys import ApiKeyAuthenticator
from resource_server.auth.base import Authenticator, Principal
from resource_server.auth.globus import GlobusAuthenticator, GroupMemberships
from resource_server.errors import AuthenticationFailed, ErrorCode
from resource_server.services.users import UserPrincipals


class Authenticators:
    """The authenticator chain, tried in order."""

    def __init__(self, chain: Sequence[Authenticator]) -> None:
        self.chain = tuple(chain)

    @classmethod
    def standard(cls, *, groups: GroupMemberships, users: UserPrincipals) -> Authenticators:
        # API keys are recognised by their prefix; every other bearer string is taken for a Globus token.
        return cls([ApiKeyAuthenticator(groups), GlobusAuthenticator(users, groups)])

    async def principal_from_authorization(self, authorization: str) -> Principal:
        """The caller named by an Authorization header value (the pipeline's authenticate stage)."""
        return await self.principal_from_token(bearer_token_of(authorization))

    async def principal_from_token(self, token: str) -> Principal:
        """The caller behind a bearer token, or raise AuthenticationFailed / PermissionDenied / ServiceUnavailable."""
        for authenticator in self.chain:
            if authenticator.claims(token):
                return await authenticator.authenticate(token)
        raise AuthenticationFailed("The bearer token is not a valid credential.", code=ErrorCode.INVALID_TOKEN)


def bearer_token_of(authorization: str) -> str:
    """The bearer credential in an Authorization header value (never log it)."""
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise AuthenticationFailed(
            "Missing credentials: send 'Authorization: Bearer <token>' with a Globus access token "
            "or a gateway API key.",
            code=ErrorCode.MISSING_CREDENTIALS,
            bearer_error="invalid_request",
        )
    return token
