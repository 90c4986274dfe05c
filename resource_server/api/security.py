"""Bearer authentication for ninja operations, backed by the authenticator chain."""

from __future__ import annotations

from django.http import HttpRequest
from ninja.security.http import HttpAuthBase

from resource_server.api.edge import credential_header
from resource_server.auth.base import Principal
from resource_server.bootstrap import runtime
from resource_server.services.authentication import bearer_token_of


class BearerAuth(HttpAuthBase):
    openapi_scheme = "bearer"

    def __init__(self) -> None:
        super().__init__()
        self.is_async = True

    async def __call__(self, request: HttpRequest) -> Principal:
        return await runtime().authenticators.principal_from_token(bearer_token(request))


def request_authorization(request: HttpRequest) -> str:
    """The request's credential as an Authorization header value, `x-api-key` included (never log it): every
    route reads its credential here, so that a key that works for inference works everywhere."""
    return credential_header(request.headers.get("Authorization", ""), request.headers.get("X-Api-Key", ""))


def bearer_token(request: HttpRequest) -> str:
    """The bearer credential of a request (never log it)."""
    return bearer_token_of(request_authorization(request))


bearer_auth = BearerAuth()
# The OpenAPI security of operations whose credentials the request pipeline checks (the inference routes):
# the same bearer scheme, under the name ninja gives it.
BEARER_SECURITY: list[dict[str, list[str]]] = [{type(bearer_auth).__name__: []}]
