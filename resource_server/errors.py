"""Errors the gateway returns, each rendered in OpenAI's envelope by one handler (see api/)."""

from __future__ import annotations

from typing import Any, ClassVar

import orjson


class GatewayError(Exception):
    """Base of every error a caller may see: it carries status, OpenAI error type, code and param."""

    status: int = 500
    error_type: str = "server_error"
    default_code: ClassVar[str] = "internal_error"
    # Set by a backend when the request provably never reached a model server (connection refused, endpoint
    # offline): then the dispatch stage may hand it to the next candidate endpoint without running it twice.
    never_reached: bool = False

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        status: int | None = None,
        error_type: str | None = None,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code or self.default_code
        self.param = param
        self.headers = headers or {}
        self.extra = extra or {}
        if status is not None:
            self.status = status
        if error_type is not None:
            self.error_type = error_type

    def envelope(self) -> dict[str, Any]:
        error = {"message": self.message, "type": self.error_type, "param": self.param, "code": self.code}
        return {"error": error, **self.extra}

    def body(self) -> bytes:
        return orjson.dumps(self.envelope())


class InvalidRequest(GatewayError):
    status = 400
    error_type = "invalid_request_error"
    default_code = "invalid_request"


class AuthenticationFailed(GatewayError):
    status = 401
    error_type = "authentication_error"
    default_code = "invalid_api_key"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        bearer_error: str = "invalid_token",
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(
            message,
            code=code,
            headers={"WWW-Authenticate": f'Bearer realm="inference-gateway", error="{bearer_error}"'},
            extra=extra,
        )


class PermissionDenied(GatewayError):
    status = 403
    error_type = "permission_error"
    default_code = "permission_denied"


class NotFound(GatewayError):
    status = 404
    error_type = "invalid_request_error"
    default_code = "not_found"


class RateLimited(GatewayError):
    status = 429
    error_type = "rate_limit_error"
    default_code = "rate_limit_exceeded"

    def __init__(self, message: str, *, retry_after: int, code: str | None = None) -> None:
        super().__init__(message, code=code, headers={"Retry-After": str(retry_after)})


class ServiceUnavailable(GatewayError):
    status = 503
    error_type = "service_unavailable"
    default_code = "service_unavailable"

    def __init__(self, message: str, *, retry_after: int, code: str | None = None) -> None:
        super().__init__(message, code=code, headers={"Retry-After": str(retry_after)})


class UpstreamError(GatewayError):
    """The model server failed or refused; `status` is what the caller gets (see dispatch.base)."""

    status = 502
    error_type = "upstream_error"
    default_code = "upstream_error"


# Every status the gateway answers with the envelope above: the class that carries it, and what it tells the
# caller. The OpenAPI's documented error responses and their headers are derived from it (api/openapi.py).
ERROR_CATALOGUE: dict[str, tuple[type[GatewayError], str]] = {
    "400": (
        InvalidRequest,
        "The request is malformed or a field is invalid (`param` names it), or the model server refused it "
        "(e.g. `context_length_exceeded`).",
    ),
    "401": (AuthenticationFailed, "Missing, unknown, expired or revoked credentials: get a new token or key."),
    "403": (PermissionDenied, "The credentials are valid but do not grant this (e.g. `model_access_denied`)."),
    "404": (NotFound, "No such model, cluster or key (e.g. `model_not_found`, `cluster_not_found`)."),
    "413": (InvalidRequest, "The request body is larger than the gateway accepts (`request_too_large`)."),
    "422": (UpstreamError, "The model server refused a field's value; its message is passed on."),
    "4XX": (UpstreamError, "Another client error of the model server, passed on with its status and message."),
    "429": (RateLimited, "Too many requests: wait for `Retry-After` seconds when it is given."),
    "500": (GatewayError, "The gateway failed; quote the `X-Request-ID` when reporting it."),
    "502": (UpstreamError, "The model server or the cluster failed (e.g. `upstream_error`, `compute_task_failed`)."),
    "503": (
        ServiceUnavailable,
        "Temporarily unavailable (gateway at capacity, model server or cluster down or starting, "
        "authentication backend unreachable): retry after `Retry-After` seconds.",
    ),
    "504": (UpstreamError, "The model took too long (`upstream_timeout`, `compute_timeout`): retry or ask for less."),
}
