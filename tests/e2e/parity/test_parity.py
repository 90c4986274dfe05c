"""Parity: every request of the corpus (corpus.json) is sent to the model server directly and through the
gateway, on the `direct` backend and on the `local` one (the compute function in a process pool, streams
through the relay), and must get the same status and the same body, streamed or not, once ids and creation
times are set aside (answers.VOLATILE_FIELDS).

The model server is the fake vLLM, or real vLLMs with `make test-real-vllm`, one for each kind of server
the cases need (see conftest.py); the gateway reaches each kind on a cluster of its own.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson
import pytest

from resource_server.models import Cluster, Endpoint, User
from resource_server.services.api_keys import api_key_create
from tests.audio import wav_clip
from tests.e2e.conftest import e2e_gateway
from tests.e2e.parity.answers import Answer, exchange, exchange_form
from tests.e2e.parity.conftest import GENERATE, REAL_VLLM_KINDS, REAL_VLLM_UNSERVED, ModelServer, server_kind

pytestmark = pytest.mark.django_db(transaction=True)

CORPUS = orjson.loads((Path(__file__).with_name("corpus.json")).read_bytes())["cases"]
MODEL_PLACEHOLDER = "VAR_model_id"  # FIRST's own placeholder in its request corpus
BACKENDS = ("direct", "local")


@dataclass(frozen=True)
class Gateway:
    url: str
    key: str

    def path(self, backend: str, kind: str, upstream_path: str) -> str:
        """FIRST's path on the cluster whose `kind` of server serves the model with `backend`: the route below
        the server's /v1."""
        route = upstream_path.removeprefix("/v1/").lstrip("/")
        return f"{self.url}/resource_server/{cluster_name(backend, kind)}/vllm/v1/{route}"


def cluster_name(backend: str, kind: str) -> str:
    return f"parity-{backend}" if kind == GENERATE else f"parity-{backend}-{kind}"


@pytest.fixture(scope="module")
def gateway_url(django_db_setup: None, tmp_path_factory: Any) -> Iterator[str]:
    with e2e_gateway(tmp_path_factory) as url:
        yield url


@pytest.fixture
def gateway(transactional_db: None, gateway_url: str, served: dict[str, ModelServer]) -> Gateway:
    """A user with a key, and for each kind of server and each backend a cluster with an endpoint for the model
    that server serves (one cluster per kind: the servers of two kinds serve the same model name)."""
    owner = User.objects.create(identity_id="id-parity", username="parity@anl.gov")
    _, key = api_key_create(owner=owner, name="parity")
    for kind, model_server in served.items():
        server = urlsplit(model_server.url)
        timeout = model_server.read_timeout
        configs = {
            "direct": {"base_url": model_server.url, "read_timeout": timeout},
            "local": {"vllm": {"host": server.hostname, "port": server.port, "read_timeout": timeout}, "workers": 2},
        }
        for backend, config in configs.items():
            endpoint = Endpoint(
                cluster=Cluster.objects.create(name=cluster_name(backend, kind)),
                model=model_server.model,
                backend=backend,
                backend_config=config,
            )
            endpoint.full_clean()
            endpoint.save()
    return Gateway(gateway_url, key)


def request_body(case: dict[str, Any], model: str) -> Any:
    """The case's body with FIRST's model placeholder replaced by the served model's name."""
    body = copy.deepcopy(case["body"])
    if body.get("model") == MODEL_PLACEHOLDER:
        body["model"] = model
    return body


def form_parts(case: dict[str, Any], model: str) -> list[tuple[str, str | tuple[str, bytes, str]]]:
    """The case's form parts in order: text fields (the model placeholder replaced), and files."""
    parts: list[tuple[str, str | tuple[str, bytes, str]]] = []
    for name, value in case["form"]:
        if isinstance(value, dict):
            data = wav_clip(value["wav_seconds"]) if "wav_seconds" in value else value["bytes"].encode()
            parts.append((name, ("speech.wav", data, "audio/wav")))
        else:
            parts.append((name, model if value == MODEL_PLACEHOLDER else value))
    return parts


def _params() -> list[Any]:
    """Every case on every backend; a case that needs another part of issue 11 is skipped, unless
    PARITY_IGNORE_NEEDS is set (to see which of them pass once that part has landed). Against real vLLMs, a
    case for a kind of server the suite does not know how to start is skipped, naming the kind."""
    honour_needs = not os.environ.get("PARITY_IGNORE_NEEDS")
    real_vllm = bool(os.environ.get("PARITY_REAL_VLLM"))
    params = []
    for case in CORPUS:
        needs = case.get("needs") if honour_needs else None
        marks = [pytest.mark.skip(reason=f"needs part {needs} of issue 11")] if needs else []
        kind = server_kind(case)
        if real_vllm and kind not in REAL_VLLM_KINDS:
            reason = REAL_VLLM_UNSERVED.get(kind, f"the suite starts no real vLLM of the kind {kind!r}")
            marks.append(pytest.mark.skip(reason=reason))
        params += [pytest.param(case, backend, id=f"{case['name']}-{backend}", marks=marks) for backend in BACKENDS]
    return params


@pytest.mark.parametrize(("case", "backend"), _params())
def test_the_gateway_answers_as_the_model_server_does(
    case: dict[str, Any], backend: str, gateway: Gateway, served: dict[str, ModelServer]
) -> None:
    kind = server_kind(case)
    model_server = served[kind]
    upstream_url = model_server.url.removesuffix("/v1") + case["path"]
    gateway_url = gateway.path(backend, kind, case["path"])
    auth = {"Authorization": f"Bearer {gateway.key}"}
    if "form" in case:
        parts = form_parts(case, model_server.model)
        direct = exchange_form(upstream_url, parts).normalised()
        through = exchange_form(gateway_url, parts, auth)
    else:
        body = request_body(case, model_server.model)
        direct = exchange(upstream_url, body).normalised()
        through = exchange(gateway_url, body, auth)

    # The corpus says what the model server makes of the request: a case that stopped meaning it is stale.
    assert (direct.status < 400) == (case["expect"] == "ok"), f"the model server answered {direct}"
    assert through.normalised() == direct, describe(direct, through.normalised())


def describe(expected: Answer, got: Answer) -> str:
    return f"model server: {expected.status} {expected.body!r}\ngateway:      {got.status} {got.body!r}"
