"""The route table: one row per inference route, which every door and the docs iterate."""

from __future__ import annotations

import orjson

from resource_server.api.edge import INFERENCE_PATH
from resource_server.routes import OPENAI_USAGE, ROUTES, Route

USAGE = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}


def test_every_route_has_one_row_that_the_inference_paths_serve() -> None:
    assert list(ROUTES) == list(Route)
    for route, descriptor in ROUTES.items():
        assert descriptor.route is route
        assert INFERENCE_PATH.match(f"/resource_server/v1/{descriptor.path}")["route"] == route.value  # type: ignore[index]
        assert INFERENCE_PATH.match(f"/resource_server/polaris/vllm/v1/{descriptor.path}")
        descriptor.request_schema.model_validate(descriptor.example)
    assert [route for route, descriptor in ROUTES.items() if not descriptor.streams] == [Route.EMBEDDINGS]
    assert not INFERENCE_PATH.match("/resource_server/v1/models")


def test_usage_is_read_from_the_answer_and_from_a_final_stream_chunk_only() -> None:
    assert OPENAI_USAGE.of_answer({"choices": [], "usage": USAGE}) == USAGE
    assert OPENAI_USAGE.of_answer(None) is None
    final = b"data: " + orjson.dumps({"choices": [], "usage": USAGE}) + b"\n\n"
    chunk = OPENAI_USAGE.event_chunk(final)
    assert chunk is not None and OPENAI_USAGE.of_chunk(chunk) == USAGE
    for event in (
        b'data: {"choices": [{"delta": {"content": "usage"}}], "usage": null}\n\n',
        b'data: {"choices": [], "usage":null}\n\n',
        b'data: {"note": "\\"usage\\""}\n\n',
        b"data: [DONE]\n\n",
    ):
        assert OPENAI_USAGE.event_chunk(event) is None, event
