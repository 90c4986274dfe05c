"""The ninja API object, its error handlers, and its routers."""

from __future__ import annotations

import logging
from typing import Any

from django.core.exceptions import RequestDataTooBig
from django.http import HttpRequest, HttpResponse
from ninja import NinjaAPI
from ninja.errors import AuthenticationError, HttpError
from ninja.errors import ValidationError as NinjaValidationError
from ninja.openapi.schema import OpenAPISchema

from resource_server.api import account, health, inference, relay
from resource_server.errors import AuthenticationFailed, GatewayError, InvalidRequest
from resource_server.schemas import openapi_components

logger = logging.getLogger("resource_server.api")


class GatewayAPI(NinjaAPI):
    """Ninja's API whose OpenAPI also holds the schemas the operations' `openapi_extra` refer to."""

    def get_openapi_schema(
        self, *, path_prefix: str | None = None, path_params: dict[str, Any] | None = None
    ) -> OpenAPISchema:
        schema = super().get_openapi_schema(path_prefix=path_prefix, path_params=path_params)
        components: dict[str, Any] = schema["components"]["schemas"]
        for name, definition in openapi_components().items():
            # Two different models of one name would make one of the references point at the wrong schema.
            if components.setdefault(name, definition) != definition:
                raise ValueError(f"two OpenAPI schemas are named {name}")
        return schema


api = GatewayAPI(
    title="Inference gateway",
    version="1",
    description="OpenAI-compatible access to models served on HPC clusters. "
    "Authenticate with `Authorization: Bearer <Globus access token or gateway API key>`.",
    urls_namespace="resource_server",
)
api.add_router("", health.router)
api.add_router("", inference.router)
api.add_router("", account.router)
api.add_router("", relay.router)


def _render(request: HttpRequest, error: GatewayError) -> HttpResponse:
    response = HttpResponse(error.body(), status=error.status, content_type="application/json")
    for name, value in error.headers.items():
        response[name] = value
    return response


@api.exception_handler(GatewayError)
def on_gateway_error(request: HttpRequest, exc: GatewayError) -> HttpResponse:
    return _render(request, exc)


@api.exception_handler(AuthenticationError)
def on_missing_auth(request: HttpRequest, exc: AuthenticationError) -> HttpResponse:
    return _render(request, AuthenticationFailed("Authentication failed.", code="invalid_credentials"))


@api.exception_handler(NinjaValidationError)
def on_invalid_params(request: HttpRequest, exc: NinjaValidationError) -> HttpResponse:
    first = exc.errors[0] if exc.errors else {}
    param = ".".join(str(part) for part in first.get("loc", ())[1:]) or None
    return _render(request, InvalidRequest(f"Invalid parameter: {first.get('msg', 'invalid value')}.", param=param))


@api.exception_handler(RequestDataTooBig)
def on_too_big(request: HttpRequest, exc: RequestDataTooBig) -> HttpResponse:
    return _render(request, InvalidRequest("The request body is too large.", status=413, code="request_too_large"))


@api.exception_handler(HttpError)
def on_http_error(request: HttpRequest, exc: HttpError) -> HttpResponse:
    return _render(
        request,
        GatewayError(str(exc), status=exc.status_code, error_type="invalid_request_error", code="request_failed"),
    )


@api.exception_handler(Exception)
def on_unexpected(request: HttpRequest, exc: Exception) -> HttpResponse:
    request_id = getattr(request, "request_id", "-")
    logger.exception("unhandled error in request %s", request_id)
    return _render(
        request,
        GatewayError(f"The gateway hit an internal error. Quote request id {request_id} when reporting it."),
    )
