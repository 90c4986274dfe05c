"""Schemathesis against the OpenAPI the gateway serves, on a real gateway process: a short run of `make fuzz`.

`python -m benchmarks.fuzz` runs the long one (500 generated cases per operation, on a fresh database).
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from benchmarks.fuzz import CHECKS, OPENAPI_PATH, schemathesis_run
from tests.conftest import Seeded, seed
from tests.e2e.conftest import e2e_gateway

pytestmark = pytest.mark.django_db(transaction=True)


def test_short_fuzz_run_finds_no_5xx_and_answers_as_documented(tmp_path_factory: Any, model_server: str) -> None:
    seeded: Seeded = seed(model_server)
    served = f"demo-model@{seeded.cluster.name}/{seeded.endpoint.framework}"
    with e2e_gateway(tmp_path_factory) as url:
        spec = httpx.get(url + OPENAPI_PATH, timeout=10).json()
        outcome = schemathesis_run(url, api_key=seeded.key, cases=3, served=(served,), seed=1)
    print(outcome.summary())
    assert "not_a_server_error" in CHECKS and "response_schema_conformance" in CHECKS
    assert outcome.server_errors == 0
    assert outcome.returncode == 0, "a check failed: see the Schemathesis report above"
    documented = {f"{method.upper()} {path}" for path, item in spec["paths"].items() for method in item}
    assert documented <= set(outcome.statuses), "every operation is fuzzed"
    inference = [name for name in documented if name.startswith("POST") and "api-keys" not in name]
    for name in inference:
        # The served model was drawn often enough to get through routing to the model server and back.
        assert outcome.statuses[name][200] > 0, (name, outcome.statuses[name])
