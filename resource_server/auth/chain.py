"""The authenticator chain: the first authenticator that claims a token decides about it."""

from __future__ import annotations

from resource_server.auth.api_keys import ApiKeyAuthenticator
from resource_server.auth.base import Authenticator, Principal
from resource_server.errors import AuthenticationFailed

AUTHENTICATORS: list[Authenticator] = [ApiKeyAuthenticator()]


async def principal_from_token(token: str) -> Principal:
    for authenticator in AUTHENTICATORS:
        if authenticator.claims(token):
            return await authenticator.authenticate(token)
    raise AuthenticationFailed("The bearer token is not a valid gateway API key.", code="invalid_api_key")
