"""Errors the gateway returns, each rendered in OpenAI's envelope by one handler (see api/)."""

from __future__ import annotations

from typing import Any, ClassVar

import orjson


class GatewayError(Exception):
    """Base of every error a caller may see: it carries status, OpenAI error type, code and param."""

    status: int = 500
    error_type: str = "server_error"
    default_code: ClassVar[str] = "internal_error"

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
