"""End to end on a `globus_compute` endpoint: the `openai` client -> gunicorn + uvicorn worker -> the real
globus-compute-sdk `Executor` -> the stood-in Globus Compute service -> the endpoint's real engine running the
function as `manage.py register_functions` registered it -> the fake vLLM; results back through RabbitMQ,
streams through the gateway's relay route; usage in the database."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from fakes.compute_service import RunningCompute
from resource_server.models import Cluster, ComputeFunction, Endpoint, User
from resource_server.services.api_keys import api_key_create
from tests.conftest import COMPUTE_CLIENT_ID, COMPUTE_CLIENT_SECRET
from tests.e2e.conftest import e2e_gateway, usage_row
from tests.servers import ROOT, server_database_url

pytestmark = pytest.mark.django_db(transaction=True)

HELLO: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Hello there"}]


def account(compute: RunningCompute) -> dict[str, str]:
    """The gateway's settings for its Globus Compute service account, and where Globus is."""
    return {
        **compute.environment,
        "GLOBUS_COMPUTE_CLIENT_ID": COMPUTE_CLIENT_ID,
        "GLOBUS_COMPUTE_CLIENT_SECRET": COMPUTE_CLIENT_SECRET,
    }


@pytest.fixture(scope="module")
def gateway_url(django_db_setup: None, tmp_path_factory: Any, compute_service: RunningCompute) -> Iterator[str]:
    with e2e_gateway(tmp_path_factory, **account(compute_service)) as url:
        yield url


@pytest.fixture
def client(transactional_db: None, gateway_url: str, compute_service: RunningCompute, model_server: str) -> Any:
    """A user's client for a model served by a `globus_compute` Endpoint, its function registered by the
    management command an admin runs."""
    registered = subprocess.run(
        [sys.executable, "manage.py", "register_functions"],
        cwd=ROOT,
        env={"PATH": "", **account(compute_service), "DATABASE_URL": server_database_url()},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert registered.returncode == 0, registered.stderr
    function = ComputeFunction.objects.get(name="inference", client_id=COMPUTE_CLIENT_ID)
    url = urlsplit(model_server)
    endpoint = Endpoint(
        cluster=Cluster.objects.create(name="polaris"),
        model="demo-model",
        backend="globus_compute",
        backend_config={
            "endpoint_id": compute_service.service.add_endpoint(allowed_functions=[str(function.function_uuid)]),
            "function_id": str(function.function_uuid),
            "vllm": {"host": url.hostname, "port": url.port, "read_timeout": 10},
        },
    )
    endpoint.full_clean()
    endpoint.save()
    owner = User.objects.create(identity_id="id-hopper", username="hopper@anl.gov")
    _, key = api_key_create(owner=owner, name="e2e")
    return openai.OpenAI(
        base_url=f"{gateway_url}/resource_server/polaris/vllm/v1", api_key=key, max_retries=0, timeout=90
    )


def test_a_chat_runs_on_the_endpoint_and_its_usage_is_logged(client: openai.OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(model="demo-model", messages=HELLO, max_tokens=7)
    reply = raw.parse()

    assert reply.choices[0].message.content
    assert reply.usage is not None and 0 < reply.usage.completion_tokens <= 7
    row = usage_row(request_id=raw.headers["x-request-id"])
    assert (row.status_code, row.streamed, row.route) == (200, False, "chat/completions")
    assert row.endpoint is not None and row.endpoint.backend == "globus_compute"
    assert (row.prompt_tokens, row.completion_tokens) == (reply.usage.prompt_tokens, reply.usage.completion_tokens)


def test_a_streamed_chat_comes_back_through_the_relay_and_its_usage_is_logged(client: openai.OpenAI) -> None:
    reference = client.chat.completions.create(model="demo-model", messages=HELLO, max_tokens=30)

    raw = client.chat.completions.with_raw_response.create(
        model="demo-model", messages=HELLO, max_tokens=30, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(raw.parse())

    assert reference.usage is not None
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text == reference.choices[0].message.content
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == reference.usage.completion_tokens
    row = usage_row(request_id=raw.headers["x-request-id"])
    assert (row.streamed, row.status_code, row.completion_tokens) == (True, 200, reference.usage.completion_tokens)
    assert row.endpoint is not None and row.endpoint.backend == "globus_compute"
