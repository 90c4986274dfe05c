"""Per-request context for the API: a request id, and OpenAI-shaped bodies for framework errors."""

from __future__ import annotations

import re
import uuid
from collections.abc import Awaitable, Callable
from typing import NamedTuple

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.http import HttpRequest, HttpResponse, HttpResponseBase

from resource_server.errors import GatewayError, NotFound

API_PREFIX = "/resource_server/"
CLIENT_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{8,64}$")

Handler = Callable[[HttpRequest], Awaitable[HttpResponseBase]]


class RequestIds(NamedTuple):
    """The gateway's own id for a request (the usage row's key) and the client's X-Request-ID if it is sane.

    The client's id is never the key: a client reusing one id must still leave one row per request.
    """

    gateway: str
    client: str

    @classmethod
    def of(cls, offered: str) -> RequestIds:
        return cls(uuid.uuid4().hex, offered if CLIENT_REQUEST_ID.match(offered) else "")

    def headers(self) -> tuple[tuple[str, str], tuple[str, str]]:
        """X-Request-ID echoes the client's id (ours if it sent none); X-Gateway-Request-ID is always ours."""
        return ("X-Request-ID", self.client or self.gateway), ("X-Gateway-Request-ID", self.gateway)


class RequestContextMiddleware:
    """Gives each request the gateway's own id, keeps the caller's X-Request-ID beside it, and echoes both.

    Errors produced by Django or ninja rather than our handlers (unknown route, wrong method)
    are re-shaped into OpenAI's error envelope on API paths, so clients always get JSON.
    """

    async_capable = True
    sync_capable = False

    def __init__(self, get_response: Handler) -> None:
        self.get_response = get_response
        if iscoroutinefunction(self.get_response):
            markcoroutinefunction(self)

    async def __call__(self, request: HttpRequest) -> HttpResponseBase:
        ids = RequestIds.of(request.headers.get("X-Request-ID", ""))
        request.request_id = ids.gateway  # type: ignore[attr-defined]
        request.client_request_id = ids.client  # type: ignore[attr-defined]
        response = await self.get_response(request)
        if (
            response.status_code >= 400
            and request.path.startswith(API_PREFIX)
            and not response.get("Content-Type", "").startswith("application/json")
        ):
            response = _as_envelope(response)
        for name, value in ids.headers():
            response[name] = value
        return response


def _as_envelope(response: HttpResponseBase) -> HttpResponseBase:
    if response.status_code == 404:
        error: GatewayError = NotFound("Unknown route. The API lives under /resource_server/v1/.", code="unknown_route")
    elif response.status_code == 405:
        error = GatewayError(
            f"Method not allowed; use {response.get('Allow', 'another method')}.",
            status=405,
            error_type="invalid_request_error",
            code="method_not_allowed",
        )
    else:
        error = GatewayError(
            "The request failed.",
            status=response.status_code,
            error_type="invalid_request_error",
            code="request_failed",
        )
    shaped = HttpResponse(error.body(), status=error.status, content_type="application/json")
    if "Allow" in response:
        shaped["Allow"] = response["Allow"]
    return shaped
