"""Per-request context for the API: a request id, and OpenAI-shaped bodies for framework errors."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.http import HttpRequest, HttpResponseBase

from resource_server.api.edge import API_PREFIX, RequestIds, as_envelope

Handler = Callable[[HttpRequest], Awaitable[HttpResponseBase]]


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
            response = as_envelope(response)
        for name, value in ids.headers():
            response[name] = value
        return response
