"""The route table: one row per inference route, which every door and the docs iterate."""

from __future__ import annotations

from pathlib import Path

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
    streaming = [route for route, descriptor in ROUTES.items() if descriptor.streams]
    assert streaming == [
        Route.CHAT,
        Route.COMPLETIONS,
        Route.RESPONSES,
        Route.MESSAGES,
        Route.TRANSCRIPTIONS,
        Route.TRANSLATIONS,
    ]
    assert [route for route, descriptor in ROUTES.items() if descriptor.form] == [
        Route.TRANSCRIPTIONS,
        Route.TRANSLATIONS,
    ]
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


def _named(kind: str, payload: dict[str, object]) -> bytes:
    return f"event: {kind}\ndata: ".encode() + orjson.dumps({"type": kind, **payload}) + b"\n\n"


RESPONSES_USAGE = {"input_tokens": 9, "output_tokens": 4, "total_tokens": 13}


def test_responses_usage_is_read_in_openai_names_from_the_answer_and_the_final_event_only() -> None:
    reader = ROUTES[Route.RESPONSES].usage
    assert reader.of_answer({"object": "response", "usage": RESPONSES_USAGE}) == USAGE_9_4
    for kind in ("response.completed", "response.incomplete"):
        chunk = reader.event_chunk(_named(kind, {"response": {"usage": RESPONSES_USAGE}}))
        assert chunk is not None and reader.of_chunk(chunk) == USAGE_9_4
    in_progress = _named("response.created", {"response": {"usage": None}})
    delta = _named("response.output_text.delta", {"delta": '"usage"'})
    assert reader.event_chunk(in_progress) is None and reader.event_chunk(delta) is None


def test_messages_usage_takes_the_input_from_message_start_and_both_from_message_delta() -> None:
    reader = ROUTES[Route.MESSAGES].usage
    assert reader.of_answer({"type": "message", "usage": {"input_tokens": 9, "output_tokens": 4}}) == USAGE_9_4
    start = reader.event_chunk(_named("message_start", {"message": {"usage": {"input_tokens": 9, "output_tokens": 0}}}))
    assert start is not None and reader.of_chunk(start) == {"prompt_tokens": 9}
    delta = reader.event_chunk(_named("message_delta", {"usage": {"input_tokens": 9, "output_tokens": 4}}))
    assert delta is not None and reader.of_chunk(delta) == USAGE_9_4
    assert reader.event_chunk(_named("content_block_delta", {"delta": {"text": '"usage"'}})) is None


USAGE_9_4 = {"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13}


def test_streams_end_with_done_or_with_their_final_named_event_and_errors_are_written_in_their_framing() -> None:
    chat = ROUTES[Route.CHAT].framing
    responses, messages = ROUTES[Route.RESPONSES].framing, ROUTES[Route.MESSAGES].framing
    assert chat.is_done(b"data: [DONE]\n\n") and not chat.is_final(b"data: {}\n\n")
    assert not responses.is_done(b"data: [DONE]\n\n") and responses.done_event is None
    assert responses.is_final(_named("response.completed", {})) and not responses.is_final(_named("response.x", {}))
    assert messages.is_final(_named("message_stop", {})) and not messages.is_final(_named("message_delta", {}))
    body = orjson.dumps({"error": {"message": "m", "type": "t", "param": None, "code": "c"}})
    assert chat.error_event(body) == b"data: " + body + b"\n\n"
    kind, data = messages.error_event(body).split(b"\n", 1)
    assert kind == b"event: error"
    assert orjson.loads(data.removeprefix(b"data: ")) == {"type": "error", **orjson.loads(body)}


def test_the_user_guide_lists_every_route() -> None:
    guide = (Path(__file__).parents[2] / "docs" / "user-guide.md").read_text()
    for descriptor in ROUTES.values():
        assert f"| `POST /v1/{descriptor.path}`" in guide, descriptor.path
