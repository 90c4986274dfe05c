"""The ninja API object, its error handlers, and its routers."""

from __future__ import annotations

from typing import Any

from django.core.exceptions import RequestDataTooBig
from django.http import HttpRequest, HttpResponse
from ninja import NinjaAPI
from ninja.errors import AuthenticationError, HttpError
from ninja.errors import ValidationError as NinjaValidationError
from ninja.openapi.schema import OpenAPISchema

from resource_server.api import account, first, health, inference, relay, usage
from resource_server.api.edge import error_response, internal_error
from resource_server.errors import AuthenticationFailed, ErrorCode, GatewayError, InvalidRequest
from resource_server.pipeline.parse import body_too_large
from resource_server.schemas import openapi_components


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
api.add_router("", usage.router)
api.add_router("", first.router)
api.add_router("", relay.router)


@api.exception_handler(GatewayError)
def on_gateway_error(request: HttpRequest, exc: GatewayError) -> HttpResponse:
    return error_response(exc)


@api.exception_handler(AuthenticationError)
def on_missing_auth(request: HttpRequest, exc: AuthenticationError) -> HttpResponse:
    return error_response(AuthenticationFailed("Authentication failed.", code=ErrorCode.INVALID_CREDENTIALS))


@api.exception_handler(NinjaValidationError)
def on_invalid_params(request: HttpRequest, exc: NinjaValidationError) -> HttpResponse:
    first = exc.errors[0] if exc.errors else {}
    param = ".".join(str(part) for part in first.get("loc", ())[1:]) or None
    return error_response(InvalidRequest(f"Invalid parameter: {first.get('msg', 'invalid value')}.", param=param))


@api.exception_handler(RequestDataTooBig)
def on_too_big(request: HttpRequest, exc: RequestDataTooBig) -> HttpResponse:
    return error_response(body_too_large())


@api.exception_handler(HttpError)
def on_http_error(request: HttpRequest, exc: HttpError) -> HttpResponse:
    return error_response(
        GatewayError(
            str(exc), status=exc.status_code, error_type="invalid_request_error", code=ErrorCode.REQUEST_FAILED
        )
    )


@api.exception_handler(Exception)
def on_unexpected(request: HttpRequest, exc: Exception) -> HttpResponse:
    return error_response(internal_error(getattr(request, "request_id", "-")))
