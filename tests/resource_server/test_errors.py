"""The catalogue of error codes: statuses, the user guide's tables, and no member the product never uses."""

from __future__ import annotations

import re
from pathlib import Path

import orjson
import pytest

from resource_server.errors import (
    ERROR_CATALOGUE,
    USER_GUIDE,
    AuthenticationFailed,
    ErrorCode,
    GatewayError,
    InvalidRequest,
    NotFound,
    ServiceUnavailable,
    UpstreamError,
    codes_documented_under,
    main,
    markdown_tables,
    user_guide_with_tables,
)

ROOT = Path(__file__).resolve().parents[2]
# The product's code: where a member must be used for the catalogue to list it (the fakes are not the product).
PRODUCT_FILES = [
    path
    for package in ("resource_server", "gateway")
    for path in (ROOT / package).rglob("*.py")
    if "fakes" not in path.relative_to(ROOT).parts
]


def _status_column(code: ErrorCode) -> str:
    return str(code.status) if isinstance(code.status, int) else code.status.label


def _code_rows(text: str) -> dict[str, tuple[str, str]]:
    """The user guide's code table: code -> (status, meaning), read from the page itself."""
    rows: dict[str, tuple[str, str]] = {}
    for line in text.splitlines():
        match = re.fullmatch(r"\| `([A-Za-z_]+)` \| (.+?) \| (.+) \|", line)
        if match and match[2] != "status":  # not the header
            assert match[1] not in rows, f"{match[1]} is listed twice"
            rows[match[1]] = (match[2], match[3])
    return rows


def test_user_guide_tables_are_the_generated_ones() -> None:
    text = USER_GUIDE.read_text()
    assert text == user_guide_with_tables(text), "run `python -m resource_server.errors --write`"


def test_user_guide_lists_every_code_with_its_status_and_meaning_and_no_other() -> None:
    rows = _code_rows(USER_GUIDE.read_text())
    assert rows == {code.value: (_status_column(code), code.meaning) for code in ErrorCode}


def test_every_code_is_used_by_the_product() -> None:
    source = "\n".join(path.read_text() for path in PRODUCT_FILES)
    unused = [code.name for code in ErrorCode if not re.search(rf"\bErrorCode\.{code.name}\b", source)]
    assert not unused, f"catalogued but never answered: {unused}"


def test_codes_are_unique_and_say_what_they_mean() -> None:
    assert len({code.value for code in ErrorCode}) == len(ErrorCode)
    for code in ErrorCode:
        assert code.meaning.endswith(".") and "\n" not in code.meaning, code
        assert code.statuses and all(400 <= status < 600 for status in code.statuses), code


def test_the_status_catalogue_and_the_codes_agree() -> None:
    for code in ErrorCode:
        if isinstance(code.status, int):
            assert str(code.status) in ERROR_CATALOGUE, f"{code}: {code.status} is not in ERROR_CATALOGUE"
        else:
            for status in code.status.documented_under:
                assert status in ERROR_CATALOGUE, f"{code}: {status}"
                assert status.endswith("XX") or int(status) in code.statuses, f"{code}: {status}"
    for status in ERROR_CATALOGUE:
        assert codes_documented_under(status), f"ERROR_CATALOGUE {status} lists no code"


def test_status_meanings_name_no_code_so_the_codes_have_one_home() -> None:
    for status, (_, meaning) in ERROR_CATALOGUE.items():
        named = [code.value for code in ErrorCode if f"`{code.value}`" in meaning]
        assert not named, f"{status} names {named}: list codes in ErrorCode, not in the status's meaning"


def test_a_code_with_a_fixed_status_supplies_it() -> None:
    assert UpstreamError("slow", code=ErrorCode.UPSTREAM_TIMEOUT).status == 504
    assert InvalidRequest("big", code=ErrorCode.REQUEST_TOO_LARGE).status == 413
    assert GatewayError("no", code=ErrorCode.METHOD_NOT_ALLOWED).status == 405
    assert GatewayError("cut", code=ErrorCode.UPSTREAM_STREAM_TRUNCATED).status == 502
    assert NotFound("gone", code=ErrorCode.MODEL_NOT_FOUND).status == 404


def test_a_code_whose_status_varies_takes_the_given_one_or_the_class_one() -> None:
    passed_on = UpstreamError("bad", status=422, code=ErrorCode.INVALID_REQUEST, error_type="invalid_request_error")
    assert (passed_on.status, passed_on.code) == (422, "invalid_request")
    default = InvalidRequest("bad")
    assert (default.status, default.code) == (400, ErrorCode.INVALID_REQUEST)
    refused = GatewayError("no", status=400, code=ErrorCode.REQUEST_FAILED)
    assert refused.status == 400


@pytest.mark.parametrize(
    ("status", "code"),
    [(502, ErrorCode.UPSTREAM_TIMEOUT), (401, ErrorCode.INVALID_REQUEST), (500, ErrorCode.CONTEXT_LENGTH_EXCEEDED)],
)
def test_a_status_the_code_is_never_answered_with_is_a_bug(status: int, code: ErrorCode) -> None:
    with pytest.raises(ValueError, match=f"{code} is never answered with HTTP {status}"):
        UpstreamError("x", status=status, code=code)


def test_a_class_default_code_agrees_with_its_status() -> None:
    assert GatewayError("x").code == "internal_error"
    assert GatewayError("x").status == 500
    assert UpstreamError("x").code == "upstream_error"
    assert UpstreamError("x").status == 502


def test_the_envelope_carries_the_plain_code_string() -> None:
    error = AuthenticationFailed("Invalid API key.", code=ErrorCode.INVALID_API_KEY)
    body = orjson.loads(error.body())
    assert body == {
        "error": {
            "message": "Invalid API key.",
            "type": "authentication_error",
            "param": None,
            "code": "invalid_api_key",
        }
    }
    unavailable = ServiceUnavailable("later", retry_after=5, code=ErrorCode.AUTH_BUSY)
    assert unavailable.headers == {"Retry-After": "5"}
    assert orjson.loads(unavailable.body())["error"]["code"] == "auth_busy"


def test_generated_tables_have_a_row_per_status_and_per_code() -> None:
    status_table, code_table = markdown_tables().split("\n\n")
    assert len(status_table.splitlines()) == 2 + len(ERROR_CATALOGUE)
    assert len(code_table.splitlines()) == 2 + len(ErrorCode)
    assert "| 404 | `NotFoundError` |" in status_table
    assert "| 503 | `InternalServerError` |" in status_table
    assert "| 405 | `APIStatusError` |" in status_table
    assert f"| `context_length_exceeded` | {_status_column(ErrorCode.CONTEXT_LENGTH_EXCEEDED)} |" in code_table
    assert "| `model_not_found` | 404 |" in code_table


def test_the_tables_replace_only_what_lies_between_the_markers() -> None:
    page = "# Guide\n\n<!-- error tables: generated by `python -m resource_server.errors --write`; do not edit -->\n"
    page += "| stale |\n<!-- end of the generated error tables -->\n\nMore.\n"
    updated = user_guide_with_tables(page)
    assert updated.startswith("# Guide\n\n<!-- error tables") and updated.endswith("tables -->\n\nMore.\n")
    assert "| stale |" not in updated and markdown_tables() in updated
    with pytest.raises(ValueError, match="markers"):
        user_guide_with_tables("# Guide without the markers\n")


def test_the_command_prints_the_tables_and_refuses_unknown_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 0
    assert capsys.readouterr().out == markdown_tables()
    assert main(["--markdwon"]) == 2
    assert "usage:" in capsys.readouterr().err
