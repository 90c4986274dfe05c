"""The HTTP edge both doors answer through."""

from __future__ import annotations

import orjson

from resource_server.api.edge import RequestIds, error_response, framework_error, internal_error, rendered
from resource_server.errors import AuthenticationFailed, ErrorCode


def test_a_client_request_id_is_kept_only_if_sane_and_never_replaces_ours() -> None:
    ids = RequestIds.of("client-trace-0001")
    assert ids.client == "client-trace-0001" and len(ids.gateway) == 32
    assert dict(ids.headers()) == {"X-Request-ID": "client-trace-0001", "X-Gateway-Request-ID": ids.gateway}
    odd = RequestIds.of("a b")
    assert odd.client == "" and dict(odd.headers())["X-Request-ID"] == odd.gateway
    assert RequestIds.of("").gateway != RequestIds.of("").gateway


def test_an_error_renders_alike_for_both_doors() -> None:
    error = AuthenticationFailed("no", code=ErrorCode.INVALID_TOKEN)
    status, headers, body = rendered(error)
    assert status == 401
    assert headers[0] == ("Content-Type", "application/json")
    assert ("WWW-Authenticate", 'Bearer realm="inference-gateway", error="invalid_token"') in headers
    response = error_response(error)
    assert (response.status_code, response.content) == (status, body)
    assert [(name, response[name]) for name, _ in headers] == headers


def test_an_unexpected_error_is_answered_with_the_request_id_and_no_internals() -> None:
    try:
        raise RuntimeError("secret internals")
    except RuntimeError:
        error = internal_error("abc123")
    envelope = orjson.loads(error.body())["error"]
    assert error.status == 500 and envelope["code"] == "internal_error"
    assert "abc123" in envelope["message"] and "secret" not in envelope["message"]


def test_framework_errors_get_the_envelope() -> None:
    assert framework_error(404, None).code == "unknown_route"
    assert framework_error(405, "POST").message == "Method not allowed; use POST."
    assert (framework_error(400, None).status, framework_error(400, None).code) == (400, "request_failed")
