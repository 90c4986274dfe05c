"""What the served OpenAPI says beyond the views' signatures: bodies, examples and error responses.

The inference views read the raw body (the model server decides what else is valid), so their request and
answer schemas are documentation only, given here as references to `openapi_components()`; the lean ASGI
app (`api/fast.py`) serves the same paths and answers the same way.
"""

from __future__ import annotations

from typing import Any

from resource_server.api.security import BEARER_SECURITY
from resource_server.errors import (
    ERROR_CATALOGUE,
    AuthenticationFailed,
    GatewayError,
    RateLimited,
    ServiceUnavailable,
    codes_documented_under,
)
from resource_server.routes import RouteDescriptor
from resource_server.schemas import ErrorEnvelope, schema_ref

# What every route may answer once a bearer credential is needed: authentication fails (401) or the
# identity provider denies (403, e.g. a required Globus group), or it cannot be checked (503).
AUTHENTICATED = ("401", "403", "500", "503")
# The statuses in which a model server's refusal reaches the caller unchanged.
MODEL_SERVER_REFUSALS = ("400", "404", "413", "422", "4XX")
INFERENCE_ERRORS = ("400", "401", "403", "404", "413", "422", "4XX", "429", "500", "502", "503", "504")

_STRING = {"type": "string"}
REQUEST_ID_HEADER = {
    "X-Request-ID": {
        "description": "Your X-Request-ID echoed back if you sent a sane one (8-64 of A-Z a-z 0-9 . _ -), "
        "otherwise the gateway's own id.",
        "required": True,
        "schema": _STRING,
    },
    "X-Gateway-Request-ID": {
        "description": "The gateway's own id for this request; it keys the usage record. Quote it in reports.",
        "required": True,
        "schema": _STRING,
    },
}
_RETRY_AFTER = {
    "Retry-After": {"description": "Seconds to wait before retrying.", "required": False, "schema": _STRING}
}
_ERROR_HEADERS: tuple[tuple[type[GatewayError], dict[str, Any]], ...] = (
    (
        AuthenticationFailed,
        {
            "WWW-Authenticate": {
                "description": "The bearer scheme, as RFC 6750 says.",
                "required": True,
                "schema": _STRING,
            }
        },
    ),
    (RateLimited, _RETRY_AFTER),
    (ServiceUnavailable, _RETRY_AFTER),
)
# In OpenAPI 3.1 the schema of an event stream describes each event (3.2 calls it `itemSchema`).
_SSE_EVENT = {
    "type": "object",
    "description": "One server-sent event. The stream ends with `data: [DONE]`.",
    "properties": {
        "data": {
            **_STRING,
            "description": "A chunk's JSON (`chat.completion.chunk` or `text_completion`), an error envelope "
            "if the stream fails after it began, or `[DONE]`.",
        },
    },
    "required": ["data"],
}
_UNKNOWN_FIELDS = (
    "\n\nThe gateway checks the fields below and routes by `model` to a cluster endpoint you may use; fields it "
    "does not know (vLLM's sampling options and the like) reach the model server unchanged, and the model "
    "server's own refusals come back with their status and message in the error envelope."
)
_ON_CLUSTER = (
    "\n\nThis is FIRST's path: it uses only the named cluster and framework (e.g. `polaris` and `vllm`; the "
    "framework `api` stands for any framework on that cluster); an unknown cluster is a 404 `cluster_not_found`."
)


def _status_key(status: str) -> int | str:
    # Ninja keys the responses it generates by int; a "200" string beside them would be a second entry.
    return int(status) if status.isdigit() else status


def error_responses(*statuses: str) -> dict[int | str, Any]:
    """OpenAPI responses for these catalogue statuses, each in the error envelope with its headers."""
    responses: dict[int | str, Any] = {}
    for status in statuses:
        error_class, meaning = ERROR_CATALOGUE[status]
        headers = dict(REQUEST_ID_HEADER)
        for raising, extra in _ERROR_HEADERS:
            if issubclass(error_class, raising):
                headers.update(extra)
        codes = ", ".join(f"`{code}`" for code in codes_documented_under(status))
        responses[_status_key(status)] = {
            "description": f"{meaning} The codes with this status: {codes}.",
            "headers": headers,
            "content": {"application/json": {"schema": schema_ref(ErrorEnvelope)}},
        }
    return responses


def json_response(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {
        "description": description,
        "headers": REQUEST_ID_HEADER,
        "content": {"application/json": {"schema": schema}},
    }


def documented(description: str, *errors: str, ok: dict[str, Any] | None = None, status: int = 200) -> dict[str, Any]:
    """An operation's `openapi_extra`: its description, its success answer (if not ninja's own) and errors."""
    responses = error_responses(*errors)
    if ok is not None:
        responses[status] = ok
    return {"description": description, "responses": responses}


def inference_doc(descriptor: RouteDescriptor, *, on_cluster: bool) -> dict[str, Any]:
    """The `openapi_extra` of an inference operation: security, request body with example, answers, errors."""
    content: dict[str, Any] = {"application/json": {"schema": schema_ref(descriptor.response_schema)}}
    if descriptor.stream_example is not None:
        content["text/event-stream"] = {"schema": _SSE_EVENT, "example": descriptor.stream_example}
    ok = (
        "The model's answer: JSON, or with `stream: true` server-sent events ending with `data: [DONE]` "
        '(an error after the first event arrives as `data: {"error": ...}` before `[DONE]`).'
        if descriptor.streams
        else "The model's answer."
    )
    doc = documented(
        descriptor.description + _UNKNOWN_FIELDS + (_ON_CLUSTER if on_cluster else ""),
        *INFERENCE_ERRORS,
        ok={"description": ok, "headers": REQUEST_ID_HEADER, "content": content},
    )
    if descriptor.refusal_schema is not None:
        # The model server's refusals pass unchanged, in the route's own envelope; the gateway's own in OpenAI's.
        either = {"anyOf": [schema_ref(ErrorEnvelope), schema_ref(descriptor.refusal_schema)]}
        for status in MODEL_SERVER_REFUSALS:
            doc["responses"][_status_key(status)]["content"]["application/json"]["schema"] = either
    doc["security"] = BEARER_SECURITY
    # A form's example holds its text fields; the file is yours to attach.
    media_type = "multipart/form-data" if descriptor.form else "application/json"
    doc["requestBody"] = {
        "required": True,
        "content": {media_type: {"schema": schema_ref(descriptor.request_schema), "example": descriptor.example}},
    }
    return doc
