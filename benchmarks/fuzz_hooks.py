"""Schemathesis hooks of the fuzz run (loaded through SCHEMATHESIS_HOOKS by benchmarks/fuzz.py).

A fuzzed model or cluster name almost never exists, so without help nearly every case would stop at
routing (404) and never reach the relay, the model server or usage recording. Each case therefore keeps
its generated model and cluster or takes those of one served endpoint (FUZZ_SERVED), drawn by Hypothesis
like any other input; Schemathesis re-checks a changed case, so a negative case made valid is judged as a
positive one.

Every answer's status is appended to the tally file (FUZZ_TALLY) for the run's summary.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import schemathesis
from hypothesis import strategies as st


def _endpoints(spec: str) -> list[tuple[str, str, str]]:
    """(model, cluster, framework) of each "model@cluster/framework" entry of a comma-separated list."""
    endpoints = []
    for entry in filter(None, spec.split(",")):
        model, _, place = entry.partition("@")
        cluster, _, framework = place.partition("/")
        endpoints.append((model, cluster, framework))
    return endpoints


SERVED = _endpoints(os.environ.get("FUZZ_SERVED", ""))
TALLY = os.environ.get("FUZZ_TALLY")
_tally_lock = threading.Lock()


def _served(case: Any, served: tuple[str, str, str] | None) -> Any:
    """The case with the model and the cluster of one served endpoint, where it has them (None: as drawn)."""
    if served is not None:
        model, cluster, framework = served
        if isinstance(case.body, dict) and "model" in case.body:
            case.body = {**case.body, "model": model}
        if {"cluster", "framework"} <= set(case.path_parameters or {}):
            case.path_parameters = {**case.path_parameters, "cluster": cluster, "framework": framework}
    return case


@schemathesis.hook
def flatmap_case(context: Any, case: Any) -> st.SearchStrategy[Any]:
    return st.sampled_from([None, *SERVED]).map(lambda served: _served(case, served))


@schemathesis.hook
def after_call(context: Any, case: Any, response: Any) -> None:
    if TALLY:
        method = case.method.upper()
        # The unsupported_method check sends other methods to each path: one line for all of them.
        name = f"{method} {case.path}" if method == case.operation.method.upper() else "(undocumented methods)"
        with _tally_lock, open(TALLY, "a") as tally:
            tally.write(f"{response.status_code} {response.elapsed:.3f} {name}\n")
