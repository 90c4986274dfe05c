import orjson
import pytest

from resource_server.dispatch.base import SseSplitter, upstream_error
from resource_server.errors import ServiceUnavailable

VLLM_CONTEXT_ERROR = orjson.dumps(
    {
        "error": {
            "message": "This model's maximum context length is 512 tokens. However, your request has 610 input tokens.",
            "type": "BadRequestError",
            "param": None,
            "code": 400,
        }
    }
)


def test_events_split_across_chunks_are_joined() -> None:
    splitter = SseSplitter()
    assert splitter.feed(b'data: {"a":') == []
    assert splitter.feed(b' 1}\n\ndata: {"b": 2}\n') == [b'data: {"a": 1}\n\n']
    assert splitter.feed(b"\ndata: [DONE]\n\n") == [b'data: {"b": 2}\n\n', b"data: [DONE]\n\n"]


def test_crlf_framing_is_understood() -> None:
    assert SseSplitter().feed(b"data: x\r\n\r\ndata: y\r\n\r\n") == [b"data: x\n\n", b"data: y\n\n"]


def test_context_length_error_keeps_status_and_message() -> None:
    error = upstream_error(400, VLLM_CONTEXT_ERROR, model_server="test")
    assert error.status == 400
    assert error.code == "context_length_exceeded"
    assert "maximum context length is 512" in error.message


@pytest.mark.parametrize("status", [401, 403])
def test_upstream_credential_failure_is_a_gateway_fault(status: int) -> None:
    error = upstream_error(status, b'{"error": "Unauthorized"}', model_server="test")
    assert error.status == 502
    assert error.code == "upstream_auth_failed"


def test_upstream_5xx_hides_internal_details() -> None:
    error = upstream_error(500, b'{"error": {"message": "Traceback: secret path /opt/x"}}', model_server="test")
    assert error.status == 502
    assert "Traceback" not in error.message


def test_upstream_503_asks_to_retry() -> None:
    error = upstream_error(503, b"", model_server="test")
    assert isinstance(error, ServiceUnavailable)
    assert error.headers["Retry-After"] == "5"


def test_a_vllm_4xx_body_reaches_the_client_unchanged() -> None:
    error = upstream_error(400, VLLM_CONTEXT_ERROR, model_server="test")
    assert error.body() == VLLM_CONTEXT_ERROR
    assert error.code == "context_length_exceeded", "the usage row's name for it"


def test_a_4xx_body_not_in_the_envelope_is_put_in_it() -> None:
    error = upstream_error(422, b'{"detail": "Field required"}', model_server="test")
    assert orjson.loads(error.body())["error"]["message"] == "Field required"


def test_a_404_for_a_path_the_server_has_no_route_for_is_route_not_served_not_model_not_found() -> None:
    # FastAPI's answer for an unregistered path (directly), and as the compute function reports it (in a stream).
    for content in (b'{"detail":"Not Found"}', orjson.dumps({"error": {"message": "Not Found"}})):
        error = upstream_error(404, content, model_server="m")
        assert (error.status, error.code) == (404, "route_not_served")
    missing = orjson.dumps({"error": {"message": "The model `x` does not exist.", "code": 404}})
    assert upstream_error(404, missing, model_server="m").code == "model_not_found"
