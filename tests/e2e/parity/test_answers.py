"""The parity suite's normaliser and event reader: what they ignore, and what they must not."""

from __future__ import annotations

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
