"""Bearer authentication for ninja operations, backed by the authenticator chain."""

from __future__ import annotations

from django.http import HttpRequest
from ninja.security.http import HttpAuthBase

from resource_server.auth.base import Principal
from resource_server.errors import AuthenticationFailed
from resource_server.services.authentication import principal_from_token


class BearerAuth(HttpAuthBase):
    openapi_scheme = "bearer"

    def __init__(self) -> None:
        super().__init__()
        self.is_async = True

    async def __call__(self, request: HttpRequest) -> Principal:
        return await principal_from_token(bearer_token(request))


def bearer_token(request: HttpRequest) -> str:
    """The bearer credential of a request (never log it)."""
    return bearer_token_of(request.headers.get("Authorization", ""))


def bearer_token_of(authorization: str) -> str:
    """The bearer credential in an Authorization header value (also used by the lean inference routes)."""
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise AuthenticationFailed(
            "Missing credentials: send 'Authorization: Bearer <token>' with a Globus access token "
            "or a gateway API key.",
            code="missing_credentials",
            bearer_error="invalid_request",
        )
    return token


bearer_auth = BearerAuth()
