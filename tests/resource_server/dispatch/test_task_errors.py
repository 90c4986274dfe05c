"""The compute function's failure codes (strings on the wire) become catalogue codes at the gateway's boundary."""

from __future__ import annotations

import ast
from pathlib import Path

import orjson
import pytest

from resource_server.dispatch.compute import TASK_ERROR_CODES, UNKNOWN_TASK_ERROR, task_error
from resource_server.errors import ErrorCode

COMPUTE_FUNCTION = Path(__file__).resolve().parents[3] / "compute_functions" / "inference.py"


def _wire_codes() -> dict[str, int | None]:
    """Every failure code the compute function can send, with its status where it is a constant."""
    tree = ast.parse(COMPUTE_FUNCTION.read_text())
    codes: dict[str, int | None] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "TaskError":
            status, code = node.args[0], node.args[1]
            assert isinstance(code, ast.Constant) and isinstance(code.value, str), ast.unparse(node)
            codes[code.value] = status.value if isinstance(status, ast.Constant) else None
        elif isinstance(node, ast.Dict):
            fields = {k.value: v for k, v in zip(node.keys, node.values, strict=True) if isinstance(k, ast.Constant)}
            code = fields.get("code")
            if isinstance(code, ast.Constant) and isinstance(code.value, str):
                status = fields.get("status")
                codes[code.value] = status.value if isinstance(status, ast.Constant) else None
    return codes


WIRE_CODES = _wire_codes()


def test_every_code_the_compute_function_sends_has_a_gateway_code() -> None:
    assert {"vllm_timeout", "vllm_rejected", "relay_failed"} <= set(WIRE_CODES)  # the reading above works
    unmapped = set(WIRE_CODES) - set(TASK_ERROR_CODES) - {"vllm_rejected"}
    assert not unmapped, f"map these in dispatch/compute.py TASK_ERROR_CODES: {unmapped}"
    assert set(TASK_ERROR_CODES) <= set(WIRE_CODES), "a mapped code the compute function no longer sends"


@pytest.mark.parametrize("wire_code", sorted(TASK_ERROR_CODES))
def test_a_task_failure_answers_with_its_mapped_code(wire_code: str) -> None:
    error = task_error(WIRE_CODES[wire_code] or 500, wire_code, "details", server="test endpoint")
    assert error.code is TASK_ERROR_CODES[wire_code]
    assert error.status in error.code.statuses
    assert error.message != "details"  # the function's details are logged, not shown


def test_an_unknown_task_code_is_a_setup_fault() -> None:
    error = task_error(500, "a_code_from_a_newer_function", "details", server="test endpoint")
    assert UNKNOWN_TASK_ERROR is ErrorCode.BACKEND_MISCONFIGURED
    assert (error.status, error.code) == (502, "backend_misconfigured")


def test_vllm_refusal_passes_on_its_status_and_message() -> None:
    error = task_error(422, "vllm_rejected", "top_k must be positive", server="test endpoint")
    assert (error.status, error.code, error.message) == (422, ErrorCode.INVALID_REQUEST, "top_k must be positive")


def test_vllm_refusal_with_its_body_passes_the_body_on_unchanged() -> None:
    body = {"error": {"message": "bad top_k", "type": "BadRequestError", "param": "top_k", "code": 400}}
    error = task_error(400, "vllm_rejected", "bad top_k", server="test endpoint", body=body)
    assert (error.status, error.code, orjson.loads(error.body())) == (400, ErrorCode.INVALID_REQUEST, body)


def test_a_model_server_being_restarted_is_503_with_the_attempt_and_may_fail_over() -> None:
    message = "The model server on the node stopped and is restarting (attempt 2 of 5)."

    error = task_error(503, "vllm_restarting", message, server="test endpoint")

    assert (error.status, error.code) == (503, ErrorCode.UPSTREAM_RESTARTING)
    assert error.message == f"{message} Please retry shortly."
    assert error.headers["Retry-After"] == "30"
    assert error.never_reached  # the function found vLLM down, so another endpoint may take the request
