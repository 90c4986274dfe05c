"""Errors the gateway returns, each rendered in OpenAI's envelope by one handler (see api/).

`ErrorCode` is the catalogue of every `code` a caller can see, with its HTTP status and what it means; the
user guide's error tables are generated from it (`python -m resource_server.errors --write`).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, ClassVar

import orjson


@dataclass(frozen=True, slots=True)
class Varies:
    """The status of a code that does not fix one: chosen where it is raised, always one of `allowed`."""

    label: str  # what the user guide says in the status column
    allowed: frozenset[int]
    documented_under: tuple[str, ...]  # the ERROR_CATALOGUE statuses (so OpenAPI responses) that list it


# The model server's refusals pass through with their status (its 401/403/407 mean the gateway's credentials
# were refused, which is the gateway's failure: upstream_auth_failed, a 502).
MODEL_SERVER_4XX = frozenset(range(400, 500)) - {401, 403, 407}
MODEL_SERVER_STATUS = Varies("the model server's 4xx (usually 400)", MODEL_SERVER_4XX, ("400", "4XX"))
INVALID_REQUEST_STATUS = Varies("400, or the model server's 4xx", MODEL_SERVER_4XX, ("400", "422", "4XX"))
# Django or ninja refused the request before a view ran (e.g. a CSRF or host check): their status is kept.
REFUSED_STATUS = Varies("the refusal's 4xx or 5xx", frozenset(range(400, 600)), ())


class ErrorCode(StrEnum):
    """Every `code` the gateway answers with: its status and a one-line meaning for the caller.

    A member is the code string itself (`ErrorCode.MODEL_NOT_FOUND == "model_not_found"`), so it goes into
    the envelope and the usage record unchanged.
    """

    status: int | Varies
    statuses: frozenset[int]  # every status it may be answered with
    meaning: str

    def __new__(cls, value: str, status: int | Varies, meaning: str) -> ErrorCode:
        member = str.__new__(cls, value)
        member._value_ = value
        member.status = status
        member.statuses = frozenset((status,)) if isinstance(status, int) else status.allowed
        member.meaning = meaning
        return member

    # 400
    INVALID_REQUEST = (
        "invalid_request",
        INVALID_REQUEST_STATUS,
        "The request is malformed, or (usage records) the model server refused it with its own error body.",
    )
    INVALID_JSON = "invalid_json", 400, "The request body is not valid JSON, or not a JSON object."
    INVALID_VALUE = "invalid_value", 400, "A field the gateway reads has a value vLLM refuses too; `param` names it."
    MISSING_REQUIRED_PARAMETER = (
        "missing_required_parameter",
        400,
        "A required field is missing; `param` names it.",
    )
    FORM_FIELD_AFTER_FILE = (
        "form_field_after_file",
        400,
        "An audio form sent `model` before the file but a field the gateway reads after it: send those first.",
    )
    CONTEXT_LENGTH_EXCEEDED = (
        "context_length_exceeded",
        MODEL_SERVER_STATUS,
        "(Usage records) the model server refused a prompt and `max_tokens` too long for the model's context.",
    )
    TOO_MANY_KEYS = "too_many_keys", 400, "You have as many active API keys as allowed: revoke one first."
    INVALID_MAX_WAIT = (
        "invalid_max_wait",
        400,
        "`X-Gateway-Max-Wait` is not a number of seconds from 0 to the gateway's limit (900 by default).",
    )
    # 401
    MISSING_CREDENTIALS = (
        "missing_credentials",
        401,
        "No `Authorization: Bearer ...` header: send a Globus access token or a gateway API key.",
    )
    INVALID_CREDENTIALS = "invalid_credentials", 401, "The credentials were refused: get a new token or key."
    INVALID_TOKEN = "invalid_token", 401, "The bearer token is neither a gateway API key nor a Globus token."
    INVALID_API_KEY = "invalid_api_key", 401, "No such API key (or this gateway accepts only its own API keys)."
    EXPIRED_API_KEY = "expired_api_key", 401, "The API key has expired: create a new one."
    REVOKED_API_KEY = "revoked_api_key", 401, "The API key was revoked: create a new one."
    ACCOUNT_DISABLED = "account_disabled", 401, "The account that owns the API key is disabled."
    INACTIVE_TOKEN = "inactive_token", 401, "The Globus token expired or was revoked: log in again."
    EXPIRED_TOKEN = "expired_token", 401, "The Globus token has expired: get a new one."
    INVALID_AUDIENCE = "invalid_audience", 401, "The Globus token was issued for another service, not this gateway."
    INSUFFICIENT_SCOPE = "insufficient_scope", 401, "The Globus token lacks this gateway's scope: log in with it."
    GROUPS_CONSENT_REQUIRED = (
        "groups_consent_required",
        401,
        "Globus needs your consent to check your group memberships: log in again and accept it.",
    )
    AUTHORIZATION_REQUIRED = (
        "AuthorizationRequired",
        401,
        "Your login does not meet the gateway's Globus policies: log in again as the body's hints say.",
    )
    # 403
    PROJECT_NOT_MEMBER = (
        "project_not_member",
        403,
        "The OpenAI-Project header (the client's `project=`) names a project you are not a member of.",
    )
    MODEL_ACCESS_DENIED = (
        "model_access_denied",
        403,
        "You may not use this model: ask the administrators which group grants it.",
    )
    API_KEY_NOT_ALLOWED = "api_key_not_allowed", 403, "API keys cannot manage API keys: use a Globus access token."
    IDENTITY_NOT_ALLOWED = (
        "identity_not_allowed",
        403,
        "None of your Globus identities is from an identity provider the gateway accepts.",
    )
    GROUP_MEMBERSHIP_REQUIRED = (
        "group_membership_required",
        403,
        "You are in no Globus group that grants access to the gateway: ask its administrators.",
    )
    RELAY_FORBIDDEN = "relay_forbidden", 403, "Relay route: unknown task or wrong token (the compute function stops)."
    # 404
    MODEL_NOT_FOUND = "model_not_found", 404, "No such model (here or on the model server): see `GET /v1/models`."
    CLUSTER_NOT_FOUND = "cluster_not_found", 404, "No such cluster on this gateway."
    API_KEY_NOT_FOUND = "api_key_not_found", 404, "You have no API key with this id."
    ROUTE_NOT_SERVED = (
        "route_not_served",
        404,
        "The model exists, but its server does not serve this route (e.g. embeddings on a generating model).",
    )
    UNKNOWN_ROUTE = "unknown_route", 404, "No such path: the API lives under `/resource_server/v1/`."
    # 405
    METHOD_NOT_ALLOWED = "method_not_allowed", 405, "The path does not take this method; `Allow` lists those it does."
    # 413
    REQUEST_TOO_LARGE = "request_too_large", 413, "The request body is larger than the gateway or model server accepts."
    # 429
    RATE_LIMIT_EXCEEDED = (
        "rate_limit_exceeded",
        429,
        "A rate or concurrency limit (the message names it), or the model server's own: retry after `Retry-After`.",
    )
    INSUFFICIENT_QUOTA = (
        "insufficient_quota",
        429,
        "A token budget or allocation is spent (the message names it and when it renews): ask the administrators.",
    )
    RELAY_FULL = "relay_full", 429, "Relay route: the gateway is behind on this stream (the compute function retries)."
    # 500
    INTERNAL_ERROR = "internal_error", 500, "The gateway failed: report it with the `X-Gateway-Request-ID`."
    RELAY_NOT_CONFIGURED = (
        "relay_not_configured",
        500,
        "Streaming from this cluster is not set up on the gateway; requests without `stream` still work.",
    )
    # 502
    UPSTREAM_ERROR = "upstream_error", 502, "The model server failed: retry; if it persists, tell the administrators."
    UPSTREAM_AUTH_FAILED = (
        "upstream_auth_failed",
        502,
        "The model server refused the gateway's credentials: tell the administrators.",
    )
    UPSTREAM_CONNECTION_FAILED = "upstream_connection_failed", 502, "The connection to the model server broke off."
    UPSTREAM_STREAM_TRUNCATED = "upstream_stream_truncated", 502, "The model server ended the stream early."
    COMPUTE_TASK_FAILED = "compute_task_failed", 502, "The cluster could not run the request: retry."
    COMPUTE_BAD_RESULT = "compute_bad_result", 502, "The cluster returned an answer the gateway cannot read."
    COMPUTE_RESULT_TOO_LARGE = (
        "compute_result_too_large",
        502,
        "The answer exceeded the cluster endpoint's result limit (10 MiB): ask for less, or stream it.",
    )
    COMPUTE_WORKER_LOST = "compute_worker_lost", 502, "The cluster node running the request was lost: retry."
    COMPUTE_TASK_LOST = (
        "compute_task_lost",
        502,
        "The cluster's endpoint lost the request's task (e.g. it restarted): retry.",
    )
    COMPUTE_FUNCTION_NOT_ALLOWED = (
        "compute_function_not_allowed",
        502,
        "The cluster's endpoint does not allow the gateway's function: tell the administrators.",
    )
    BACKEND_MISCONFIGURED = (
        "backend_misconfigured",
        502,
        "The model's server or cluster is misconfigured on the gateway: tell the administrators.",
    )
    RELAY_FAILED = "relay_failed", 502, "The cluster could not send the stream back to the gateway."
    RELAY_INCOMPLETE = "relay_incomplete", 502, "The stream from the cluster lost messages or ended early."
    # 503
    LIMITS_UNAVAILABLE = (
        "limits_unavailable",
        503,
        "The gateway cannot check your budget right now (its limits store is down): retry shortly.",
    )
    UPSTREAM_UNREACHABLE = (
        "upstream_unreachable",
        503,
        "The model server cannot be reached (it may be starting): retry after `Retry-After` seconds.",
    )
    UPSTREAM_RESTARTING = (
        "upstream_restarting",
        503,
        "The model server stopped and the cluster node is restarting it: retry after `Retry-After` seconds.",
    )
    UPSTREAM_UNAVAILABLE = "upstream_unavailable", 503, "The model server says it is unavailable: retry shortly."
    ENDPOINT_OFFLINE = (
        "endpoint_offline",
        503,
        "The cluster's Globus Compute endpoint is not connected: retry later, then tell the administrators.",
    )
    COMPUTE_UNAVAILABLE = "compute_unavailable", 503, "The gateway cannot reach Globus Compute: retry shortly."
    ENDPOINT_BAD_STATE = (
        "endpoint_bad_state",
        503,
        "The cluster's endpoint has failed and runs nothing until restarted: retry later, tell the administrators.",
    )
    ENDPOINT_STARTING = (
        "endpoint_starting",
        503,
        "The cluster is starting a node for the model: retry after `Retry-After` seconds.",
    )
    ENDPOINT_NO_WORKERS = (
        "endpoint_no_workers",
        503,
        "The cluster's endpoint has no workers and starts none on demand: retry later, tell the administrators.",
    )
    CLUSTER_MAINTENANCE = (
        "cluster_maintenance",
        503,
        "The model's cluster is in maintenance; the message says until when, `Retry-After` when it ends.",
    )
    # A cold model: no endpoint serving it answers now. The `error` object also carries `status`,
    # `eta_seconds` and `queue_position` (see the user guide, "Cold models").
    MODEL_STARTING = (
        "model_starting",
        503,
        "The model's job runs and the model is loading: retry after `Retry-After` s (its expected start).",
    )
    MODEL_QUEUED = (
        "model_queued",
        503,
        "The model's job waits in the cluster's queue (`queue_position`): retry after `Retry-After` s.",
    )
    MODEL_OFFLINE = (
        "model_offline",
        503,
        "No job runs the model and its server does not answer: retry later, or send `X-Gateway-Max-Wait`.",
    )
    AUTH_UNAVAILABLE = "auth_unavailable", 503, "The gateway cannot check credentials right now: retry shortly."
    AUTH_BUSY = "auth_busy", 503, "The gateway is checking too many unfamiliar API keys at once: retry shortly."
    GLOBUS_UNAVAILABLE = "globus_unavailable", 503, "Globus Auth cannot be reached to check the token: retry shortly."
    REGISTRY_UNAVAILABLE = "registry_unavailable", 503, "The gateway cannot read its model registry: retry shortly."
    RELAY_UNAVAILABLE = "relay_unavailable", 503, "The gateway's stream relay is unavailable: retry shortly."
    GATEWAY_OVERLOADED = "gateway_overloaded", 503, "The gateway is at capacity: retry after `Retry-After` seconds."
    # 504
    UPSTREAM_TIMEOUT = "upstream_timeout", 504, "The model server took too long: retry or ask for less."
    COMPUTE_TIMEOUT = (
        "compute_timeout",
        504,
        "The cluster did not answer in time (a node may have been starting): retry.",
    )
    STREAM_TOO_LONG = "stream_too_long", 504, "The stream lasted longer than the gateway allows: ask for less."
    # Any status
    REQUEST_FAILED = (
        "request_failed",
        REFUSED_STATUS,
        "The web framework refused the request before the API handled it; the message says why.",
    )


class GatewayError(Exception):
    """Base of every error a caller may see: it carries status, OpenAI error type, code and param.

    The status comes from the code when the catalogue fixes one; a code whose status varies takes the
    `status` given, or the class's. A status the code is never answered with is a bug: ValueError.
    """

    status: int = 500
    error_type: str = "server_error"
    default_code: ClassVar[ErrorCode] = ErrorCode.INTERNAL_ERROR
    # Set by a backend when the request provably never reached a model server (connection refused, endpoint
    # offline): then the dispatch stage may hand it to the next candidate endpoint without running it twice.
    never_reached: bool = False

    def __init__(
        self,
        message: str,
        *,
        code: ErrorCode | None = None,
        param: str | None = None,
        status: int | None = None,
        error_type: str | None = None,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code or self.default_code
        if status is None:
            status = self.code.status if isinstance(self.code.status, int) else self.status
        if status not in self.code.statuses:
            raise ValueError(f"the error code {self.code} is never answered with HTTP {status}")
        self.status = status
        self.param = param
        self.headers = headers or {}
        self.extra = extra or {}
        if error_type is not None:
            self.error_type = error_type

    def envelope(self) -> dict[str, Any]:
        error = {"message": self.message, "type": self.error_type, "param": self.param, "code": self.code}
        return {"error": error, **self.extra}

    def body(self) -> bytes:
        return orjson.dumps(self.envelope())


# The classes whose every use names its own code take `code` as a required argument; only those some caller
# relies on have a default code.


class InvalidRequest(GatewayError):
    status = 400
    error_type = "invalid_request_error"
    default_code = ErrorCode.INVALID_REQUEST


class AuthenticationFailed(GatewayError):
    status = 401
    error_type = "authentication_error"

    def __init__(
        self,
        message: str,
        *,
        code: ErrorCode,
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

    def __init__(self, message: str, *, code: ErrorCode, param: str | None = None) -> None:
        super().__init__(message, code=code, param=param)


class NotFound(GatewayError):
    status = 404
    error_type = "invalid_request_error"

    def __init__(self, message: str, *, code: ErrorCode, param: str | None = None) -> None:
        super().__init__(message, code=code, param=param)


class RateLimited(GatewayError):
    status = 429
    error_type = "rate_limit_error"

    def __init__(
        self,
        message: str,
        *,
        retry_after: int,
        code: ErrorCode,
        error_type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(
            message, code=code, headers={"Retry-After": str(retry_after), **(headers or {})}, error_type=error_type
        )


class ServiceUnavailable(GatewayError):
    status = 503
    error_type = "service_unavailable"

    def __init__(self, message: str, *, retry_after: int, code: ErrorCode) -> None:
        super().__init__(message, code=code, headers={"Retry-After": str(retry_after)})


class ModelCold(ServiceUnavailable):
    """No endpoint of the model serves it now: it is starting, queued, offline or in maintenance.

    Beside OpenAI's fields the `error` object says the state and the numbers (`status`, `eta_seconds`,
    `queue_position`; null when unknown), which clients that read only OpenAI's fields ignore.
    """

    def __init__(
        self,
        message: str,
        *,
        retry_after: int,
        code: ErrorCode,
        state: str,
        eta_seconds: int | None,
        queue_position: int | None,
    ) -> None:
        super().__init__(message, retry_after=retry_after, code=code)
        self.state = state
        self.eta_seconds = eta_seconds
        self.queue_position = queue_position

    def envelope(self) -> dict[str, Any]:
        envelope = super().envelope()
        envelope["error"] |= {
            "status": self.state,
            "eta_seconds": self.eta_seconds,
            "queue_position": self.queue_position,
        }
        return envelope


class UpstreamError(GatewayError):
    """The model server failed or refused; `status` is what the caller gets (see dispatch.base)."""

    status = 502
    error_type = "upstream_error"
    default_code = ErrorCode.UPSTREAM_ERROR


class UpstreamRefusal(UpstreamError):
    """A model server's 4xx, answered with the model server's own error body, unchanged (vLLM's `message`,
    `type`, `param` and `code`). `code` is the gateway's name for it in the usage row and the logs only."""

    error_type = "invalid_request_error"
    default_code = ErrorCode.INVALID_REQUEST

    def __init__(self, message: str, *, raw: bytes, status: int, code: ErrorCode | None = None) -> None:
        super().__init__(message, status=status, code=code)
        self.raw = raw

    def body(self) -> bytes:
        return self.raw


# Every status the gateway answers with the envelope above: the class that carries it, and what it tells the
# caller. The OpenAPI's documented error responses, their headers and the codes each lists are derived from it
# and from ErrorCode (api/openapi.py); so are the user guide's error tables.
ERROR_CATALOGUE: dict[str, tuple[type[GatewayError], str]] = {
    "400": (
        InvalidRequest,
        "The request is malformed or a field is invalid (`param` names it), or the model server refused it.",
    ),
    "401": (AuthenticationFailed, "Missing, unknown, expired or revoked credentials: get a new token or key."),
    "403": (PermissionDenied, "The credentials are valid but do not grant this."),
    "404": (NotFound, "No such model, cluster, key or path."),
    "405": (GatewayError, "The path does not take this method; the `Allow` header lists those it does."),
    "413": (
        InvalidRequest,
        "The request body is larger than the gateway accepts (`MAX_REQUEST_BYTES`, 8 MiB by default).",
    ),
    "422": (UpstreamError, "The model server refused a field's value; its message is passed on."),
    "4XX": (UpstreamError, "Another client error of the model server, passed on with its status and message."),
    "429": (RateLimited, "Too many requests: wait for `Retry-After` seconds when it is given."),
    "500": (GatewayError, "The gateway failed; quote the `X-Gateway-Request-ID` when reporting it."),
    "502": (UpstreamError, "The model server or the cluster failed: retry; if it persists, tell the administrators."),
    "503": (
        ServiceUnavailable,
        "Temporarily unavailable (gateway at capacity, model server or cluster down or starting, "
        "authentication backend unreachable): retry after `Retry-After` seconds.",
    ),
    "504": (UpstreamError, "The model took too long (or its node was still starting): retry or ask for less."),
}


def codes_documented_under(status: str) -> tuple[ErrorCode, ...]:
    """The codes an error response documented under this ERROR_CATALOGUE status (e.g. "404") may carry."""
    return tuple(
        code
        for code in ErrorCode
        if (str(code.status) == status if isinstance(code.status, int) else status in code.status.documented_under)
    )


# The exception the OpenAI Python client raises for each status (openai._client._make_status_error).
_CLIENT_EXCEPTIONS = {
    "400": "BadRequestError",
    "401": "AuthenticationError",
    "403": "PermissionDeniedError",
    "404": "NotFoundError",
    "422": "UnprocessableEntityError",
    "429": "RateLimitError",
}


def _client_exception(status: str) -> str:
    return _CLIENT_EXCEPTIONS.get(status, "InternalServerError" if status.startswith("5") else "APIStatusError")


def markdown_tables() -> str:
    """The user guide's error tables: one row per status, then one per code."""
    lines = ["| status | client exception | meaning |", "|---|---|---|"]
    lines += [
        f"| {status} | `{_client_exception(status)}` | {meaning} |" for status, (_, meaning) in ERROR_CATALOGUE.items()
    ]
    lines += ["", "| `code` | status | meaning |", "|---|---|---|"]
    for code in ErrorCode:
        status = code.status if isinstance(code.status, int) else code.status.label
        lines.append(f"| `{code}` | {status} | {code.meaning} |")
    return "\n".join(lines) + "\n"


USER_GUIDE = Path(__file__).resolve().parent.parent / "docs" / "user-guide.md"
TABLES_BEGIN = "<!-- error tables: generated by `python -m resource_server.errors --write`; do not edit -->\n"
TABLES_END = "<!-- end of the generated error tables -->\n"


def user_guide_with_tables(text: str) -> str:
    """The user guide's text with the tables between the markers replaced by `markdown_tables()`."""
    head, begin, rest = text.partition(TABLES_BEGIN)
    _, end, tail = rest.partition(TABLES_END)
    if not begin or not end:
        raise ValueError("the user guide lacks the error tables' markers")
    return f"{head}{TABLES_BEGIN}{markdown_tables()}{TABLES_END}{tail}"


def main(argv: list[str]) -> int:
    """Print the error tables, or with --write put them into docs/user-guide.md."""
    if argv == ["--write"]:
        USER_GUIDE.write_text(user_guide_with_tables(USER_GUIDE.read_text()))
        return 0
    if argv:
        print("usage: python -m resource_server.errors [--write]", file=sys.stderr)
        return 2
    sys.stdout.write(markdown_tables())
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
