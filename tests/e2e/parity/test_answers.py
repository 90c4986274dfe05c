"""The parity suite's normaliser and event reader: what they ignore, and what they must not."""

from __future__ import annotations

from typing import Any

from tests.e2e.parity.answers import Answer, normalised, sse_events


def test_ids_and_times_are_replaced_at_every_depth_but_kept_as_keys() -> None:
    one = {"id": "chatcmpl-1", "created": 1, "choices": [{"message": {"tool_calls": [{"id": "call-a"}]}}]}
    other = {"id": "chatcmpl-2", "created": 2, "choices": [{"message": {"tool_calls": [{"id": "call-b"}]}}]}

    assert normalised(one) == normalised(other)
    assert normalised(one)["id"] == "<id>"
    assert normalised({"response": {"created_at": 5}}) == {"response": {"created_at": "<time>"}}


def test_a_missing_id_or_any_other_difference_still_counts() -> None:
    assert normalised({"id": "a", "x": 1}) != normalised({"x": 1})
    assert normalised({"id": "a", "model": "m1"}) != normalised({"id": "a", "model": "m2"})
    assert normalised({"system_fingerprint": "f", "created": 1}) != normalised({"created": 1})
    # Only scalar values are placeholders: an object under such a key is compared inside.
    assert normalised({"id": {"x": 1}}) != normalised({"id": {"x": 2}})


def test_events_keep_their_names_order_and_done() -> None:
    text = 'event: message_start\ndata: {"a": 1}\n\ndata: {"b": 2}\n\n: comment\n\ndata: [DONE]\n\n'

    assert sse_events(text) == [
        {"event": "message_start", "data": {"a": 1}},
        {"data": {"b": 2}},
        {"data": "[DONE]"},
    ]


def test_a_stream_is_compared_choice_by_choice_but_in_order_within_each() -> None:
    def chunk(index: int, text: str) -> dict[str, object]:
        return {"data": {"id": "x", "choices": [{"index": index, "text": text}]}}

    usage = {"data": {"choices": [], "usage": {"completion_tokens": 4}}}
    interleaved = Answer(200, True, [chunk(0, "a"), chunk(1, "c"), chunk(0, "b"), chunk(1, "d"), usage])
    grouped = Answer(200, True, [chunk(1, "c"), chunk(1, "d"), chunk(0, "a"), chunk(0, "b"), usage])
    reordered = Answer(200, True, [chunk(0, "b"), chunk(0, "a"), chunk(1, "c"), chunk(1, "d"), usage])
    usage_first = Answer(200, True, [usage, chunk(0, "a"), chunk(0, "b"), chunk(1, "c"), chunk(1, "d")])

    assert interleaved.normalised() == grouped.normalised()
    assert interleaved.normalised() != reordered.normalised()
    assert interleaved.normalised() != usage_first.normalised()


def _responses_stream(*deltas: str, numbers: list[int] | None = None, done_text: str | None = None) -> Answer:
    """A Responses stream whose output text comes in `deltas` (and is `done_text` in its done event: the joined
    deltas unless told), its events numbered from 0 (or by `numbers`)."""
    where = {"item_id": "msg_1", "output_index": 0, "content_index": 0}
    events: list[dict[str, Any]] = [
        {"type": "response.created", "response": {"id": "resp_1", "status": "in_progress"}},
        *({"type": "response.output_text.delta", **where, "delta": delta, "logprobs": []} for delta in deltas),
        {"type": "response.output_text.done", **where, "text": done_text or "".join(deltas), "logprobs": []},
        {"type": "response.completed", "response": {"id": "resp_1", "status": "completed"}},
    ]
    numbers = list(range(len(events))) if numbers is None else numbers
    return Answer(
        200,
        True,
        [
            {"event": event["type"], "data": {**event, "sequence_number": number}}
            for event, number in zip(events, numbers, strict=True)
        ],
    )


def test_a_responses_stream_is_compared_by_its_joined_text_however_vllm_cuts_it() -> None:
    three = _responses_stream(" a", " b", " c")

    assert three.normalised() == _responses_stream(" a b", " c").normalised()
    assert three.normalised() == _responses_stream(" a b c").normalised()
    # The text itself, its order, and each event's number still count.
    assert three.normalised() != _responses_stream(" a", " b", " d").normalised()
    assert three.normalised() != _responses_stream(" a", " b", " d", done_text=" a b c").normalised()
    assert three.normalised() != _responses_stream(" b", " a", " c").normalised()
    assert three.normalised() != _responses_stream(" a", " b", " c", numbers=[0, 1, 2, 2, 3, 4]).normalised()
    assert three.normalised() != _responses_stream(" a", " b", " c", numbers=[1, 2, 3, 4, 5, 6]).normalised()


def _chat_chunk(text: str | None, *, finish: str | None = None, model: str = "m", tokens: int) -> dict[str, Any]:
    """A chat chunk of choice 0 carrying `text` (None: vLLM's empty delta), with continuous usage so far."""
    delta = {} if text is None else {"content": text}
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish, "stop_reason": None}
    usage = {"prompt_tokens": 3, "completion_tokens": tokens, "total_tokens": 3 + tokens}
    return {"data": {"id": "chatcmpl-1", "created": 1, "model": model, "choices": [choice], "usage": usage}}


def _chat_stream(*chunks: dict[str, Any]) -> Answer:
    role = {"index": 0, "delta": {"role": "assistant", "content": ""}}
    first = {"data": {"id": "chatcmpl-1", "created": 1, "model": "m", "choices": [role]}}
    return Answer(200, True, [first, *chunks, {"data": "[DONE]"}])


def test_chat_chunks_are_compared_by_their_joined_text_up_to_the_choices_end() -> None:
    one_by_one = _chat_stream(
        _chat_chunk(" a", tokens=1), _chat_chunk(" b", tokens=2), _chat_chunk(" c", finish="length", tokens=3)
    ).normalised()

    assert (
        one_by_one
        == _chat_stream(_chat_chunk(" a b", tokens=2), _chat_chunk(" c", finish="length", tokens=3)).normalised()
    )
    assert one_by_one == _chat_stream(_chat_chunk(" a b c", finish="length", tokens=3)).normalised()
    # vLLM sends an empty delta for a token that decodes to nothing; merged, it adds no text.
    assert (
        _chat_stream(_chat_chunk(" a b c", tokens=3), _chat_chunk(None, finish="length", tokens=4)).normalised()
        == _chat_stream(_chat_chunk(" a b c", finish="length", tokens=4)).normalised()
    )
    # Other text, or a chunk that differs in anything but its text, its end and its usage, still counts.
    other_text = (_chat_chunk(" a", tokens=1), _chat_chunk(" B", tokens=2))
    other_model = (_chat_chunk(" a", model="x", tokens=1), _chat_chunk(" b", tokens=2))
    for start in (other_text, other_model):
        assert one_by_one != _chat_stream(*start, _chat_chunk(" c", finish="length", tokens=3)).normalised()
    # Nor is text after the choice's end merged, nor is a final usage that differs ignored.
    ended_early = (_chat_chunk(" a", finish="stop", tokens=1), _chat_chunk(" b c", finish="length", tokens=3))
    assert one_by_one != _chat_stream(*ended_early).normalised()
    assert one_by_one != _chat_stream(_chat_chunk(" a b c", finish="length", tokens=4)).normalised()


def test_completion_chunks_are_joined_with_their_logprobs_and_the_first_ones_prompt_ids() -> None:
    def chunk(pieces: list[str], offsets: list[int], finish: str | None = None, ids: Any = None) -> dict[str, Any]:
        logprobs = {
            "text_offset": offsets,
            "token_logprobs": [-1.0] * len(pieces),
            "tokens": pieces,
            "top_logprobs": [{piece: -1.0} for piece in pieces],
        }
        choice = {"index": 0, "text": "".join(pieces), "logprobs": logprobs, "finish_reason": finish}
        return {"data": {"id": "cmpl-1", "choices": [{**choice, "prompt_token_ids": ids}]}}

    one_by_one = Answer(200, True, [chunk(["x", " a"], [0, 1], ids=[7]), chunk([" b"], [3], "length")])
    joined = Answer(200, True, [chunk(["x", " a", " b"], [0, 1, 3], "length", ids=[7])])

    assert one_by_one.normalised() == joined.normalised()
    assert Answer(200, True, [chunk(["x", " a"], [0, 1], ids=[7]), chunk([" b"], [4], "length")]).normalised() != (
        joined.normalised()
    )
    # Prompt ids only stand on a choice's first chunk: a later chunk naming them is not merged away.
    late_ids = Answer(200, True, [chunk(["x", " a"], [0, 1], ids=[7]), chunk([" b"], [3], "length", ids=[7])])
    assert late_ids.normalised() != joined.normalised()


def test_anthropic_text_deltas_are_compared_joined() -> None:
    def delta(text: str) -> dict[str, Any]:
        return {
            "event": "content_block_delta",
            "data": {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}},
        }

    stop = {"event": "content_block_stop", "data": {"type": "content_block_stop", "index": 0}}

    assert (
        Answer(200, True, [delta(" a"), delta(" b"), stop]).normalised()
        == Answer(200, True, [delta(" a b"), stop]).normalised()
    )
    assert (
        Answer(200, True, [delta(" a"), delta(" b"), stop]).normalised()
        != Answer(200, True, [delta(" a c"), stop]).normalised()
    )
