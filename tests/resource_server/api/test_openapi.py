"""The served OpenAPI: valid, complete, described, with example bodies the gateway accepts as they are."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import orjson
import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import AsyncClient, Client
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate

from resource_server.api.edge import INFERENCE_PATH
from resource_server.api.openapi import MODEL_SERVER_REFUSALS
from resource_server.errors import ERROR_CATALOGUE
from resource_server.models import Cluster, Endpoint
from resource_server.routes import ROUTES, Route
from tests.conftest import Seeded

OPENAPI_URL = "/resource_server/openapi.json"
METHODS = ("get", "post", "put", "patch", "delete")
USER_GUIDE = Path(__file__).resolve().parents[3] / "docs" / "user-guide.md"
# What an inference route can answer besides 200, as the issue lists it (and 400 for bad fields).
INFERENCE_ERRORS = {"400", "401", "403", "404", "413", "429", "502", "503", "504"}


@pytest.fixture(scope="module")
def spec() -> dict[str, Any]:
    response = Client().get(OPENAPI_URL)
    assert response.status_code == 200
    document: dict[str, Any] = orjson.loads(response.content)
    return document


def operations(spec: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (path, method, operation)
        for path, item in spec["paths"].items()
        for method, operation in item.items()
        if method in METHODS
    ]


def request_example(operation: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """The media type of an operation's request body and its example, if it takes a body."""
    if "requestBody" not in operation:
        return None
    ((media_type, body),) = operation["requestBody"]["content"].items()
    return media_type, body


def resolve(spec: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        name = node["$ref"].removeprefix("#/components/schemas/")
        node = spec["components"]["schemas"][name]
    return node


def example_path(path: str, operation: dict[str, Any]) -> str:
    """`path` with each path parameter replaced by its documented example."""
    examples = {param["name"]: param["example"] for param in operation.get("parameters", []) if param["in"] == "path"}
    return re.sub(r"\{(\w+)\}", lambda match: str(examples[match[1]]), path)


def test_served_openapi_validates_and_every_reference_resolves(spec: dict[str, Any]) -> None:
    validate(spec)  # resolves every $ref: a missing component (ChatMessage, StreamOptions) fails here
    text = orjson.dumps(spec).decode()
    referenced = set(re.findall(r'"#/components/schemas/([^"]+)"', text))
    assert referenced <= set(spec["components"]["schemas"])
    assert "$defs" not in text, "nested definitions belong in components, where the docs page finds them"


def test_chat_messages_are_documented_as_objects_with_a_role(spec: dict[str, Any]) -> None:
    body = spec["paths"]["/resource_server/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]
    request = resolve(spec, body["schema"])
    message = resolve(spec, request["properties"]["messages"]["items"])
    assert message["type"] == "object"
    assert "role" in message["required"]
    assert message.get("additionalProperties") is True, "tool calls and vLLM fields must stay allowed"
    assert request.get("additionalProperties") is True
    assert resolve(spec, request["properties"]["stream_options"]["anyOf"][0])["properties"]["include_usage"]


def test_every_operation_is_described_and_documents_its_errors_in_the_envelope(spec: dict[str, Any]) -> None:
    for path, method, operation in operations(spec):
        where = f"{method.upper()} {path}"
        assert operation.get("description", "").strip(), f"{where} has no description"
        for param in operation.get("parameters", []):
            assert param.get("description") and "example" in param, f"{where}: parameter {param['name']}"
        responses = operation["responses"]
        successes = [status for status in responses if str(status).startswith("2")]
        assert successes, f"{where} documents no success"
        for status in successes:
            assert responses[status].get("content"), f"{where} {status} has no body schema"
        if operation.get("security"):
            assert {"401", "403", "503"} <= set(responses), f"{where} lacks the authentication errors"
            assert responses["401"]["headers"]["WWW-Authenticate"]["required"] is True
        for status, response in responses.items():
            assert "X-Request-ID" in response["headers"], f"{where} {status}"
            if status[0] in "45":
                assert status in ERROR_CATALOGUE
                schema = response["content"]["application/json"]["schema"]
                envelope = {"$ref": "#/components/schemas/ErrorEnvelope"}
                if "/messages" in path and status in MODEL_SERVER_REFUSALS:
                    # The Messages routes' model server refuses in Anthropic's envelope, passed on unchanged.
                    anthropic = {"$ref": "#/components/schemas/AnthropicError"}
                    assert schema == {"anyOf": [envelope, anthropic]}, f"{where} {status}"
                else:
                    assert schema == envelope, f"{where} {status}"


def test_inference_routes_document_their_error_statuses_and_stream(spec: dict[str, Any]) -> None:
    inference = [(path, op) for path, method, op in operations(spec) if method == "post" and "/v1/" in path]
    inference = [(path, op) for path, op in inference if "api-keys" not in path]
    assert len(inference) == 2 * len(Route)
    for path, operation in inference:
        assert set(operation["responses"]) >= INFERENCE_ERRORS, path
        ok = operation["responses"]["200"]["content"]
        route = Route(path.split("/v1/", 1)[1])
        assert ("text/event-stream" in ok) is ROUTES[route].streams, path


def test_error_envelope_schema_matches_what_the_gateway_sends(spec: dict[str, Any]) -> None:
    envelope = Draft202012Validator({**spec["components"]["schemas"]["ErrorEnvelope"], **_components(spec)})
    response = Client().post(
        "/resource_server/v1/chat/completions", b"{}", content_type="application/json", headers={"Authorization": "x"}
    )
    assert response.status_code == 401
    envelope.validate(orjson.loads(response.content))


def _components(spec: dict[str, Any]) -> dict[str, Any]:
    # Lets a component be checked with jsonschema: its "#/components/schemas/..." references resolve here.
    return {"components": spec["components"]}


def test_every_request_example_fits_its_schema(spec: dict[str, Any]) -> None:
    for path, method, operation in operations(spec):
        if (documented := request_example(operation)) is None:
            continue
        _, body = documented
        assert "example" in body, f"{method.upper()} {path} has no example body"
        schema = {**resolve(spec, body["schema"]), **_components(spec)}
        Draft202012Validator(schema).validate(body["example"])


@pytest.mark.django_db(transaction=True)
async def test_each_example_sent_as_is_is_accepted(spec: dict[str, Any], seeded: Seeded, model_server: str) -> None:
    """The docs page's "Try it out" sends the example: it must not be refused as a bad request."""
    # What `make demo` registers, which the examples name: demo-model on cluster `demo`.
    demo = await Cluster.objects.acreate(name="demo", description="as seed_demo makes it")
    config = {"base_url": model_server, "read_timeout": 5}
    await Endpoint.objects.acreate(
        cluster=demo, framework="vllm", model="demo-model", backend="direct", backend_config=config
    )
    client = AsyncClient()
    for path, method, operation in operations(spec):
        url = example_path(path, operation)
        documented = request_example(operation)
        if documented is None:
            response = await getattr(client, method)(url, headers=seeded.auth)
        elif documented[0] == "multipart/form-data":
            # The binary `file` goes as an upload, as Swagger UI and Schemathesis send it.
            example = documented[1]["example"]
            form = {**example, "file": SimpleUploadedFile("speech.wav", example["file"].encode())}
            response = await client.post(url, form, headers=seeded.auth)  # Django's test client sends multipart
        else:
            raw = orjson.dumps(documented[1]["example"])
            response = await getattr(client, method)(url, raw, content_type="application/json", headers=seeded.auth)
        where = f"{method.upper()} {url}"
        assert response.status_code not in (400, 422), (where, response.content)
        if INFERENCE_PATH.match(url) or url.endswith("/models"):
            # The demo deployment serves the examples' model on the examples' cluster.
            assert response.status_code == 200, (where, response.content)


def test_inference_paths_in_the_openapi_are_the_ones_the_lean_app_serves(spec: dict[str, Any]) -> None:
    documented = {
        example_path(path, operation)
        for path, method, operation in operations(spec)
        if method == "post" and "requestBody" in operation and "api-keys" not in path
    }
    assert documented
    assert all(INFERENCE_PATH.match(url) for url in documented), documented
    served = {f"/resource_server/v1/{route.value}" for route in Route} | {
        f"/resource_server/demo/vllm/v1/{route.value}" for route in Route
    }
    assert documented == served


def test_user_guide_error_table_lists_every_status_of_the_catalogue() -> None:
    table = {line.split("|")[1].strip() for line in USER_GUIDE.read_text().splitlines() if line.startswith("| ")}
    assert set(ERROR_CATALOGUE) <= table
