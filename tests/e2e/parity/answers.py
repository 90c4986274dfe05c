"""One answer of a model server or of the gateway, read whole (JSON or server-sent events), and the one
normaliser the parity suite compares answers through."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import httpx
import orjson

# What differs between two answers to the same request on any server, and only that: response, item, message
# and tool-call ids (vLLM draws them at random), and creation times. The key is kept with a placeholder,
# so an answer that lacks the field, or carries it where the other has none, still differs. Nothing else is
# ignored: status, every other field and value, event names, the order of events, except two things in streams
# that vLLM itself changes from one run to the next (Answer.normalised):
# - with several choices (n > 1) a stream is compared choice by choice: vLLM interleaves the choices' chunks
#   in an order that changes from one run to the next;
# - how the generated text is cut into events: vLLM merges the outputs of several engine steps into one
#   event whenever its API server falls behind the engine (RequestOutputCollector in
#   vllm/v1/engine/output_processor.py), so consecutive text increments of one output are compared joined
#   (`coalesced`), and a Responses stream's `sequence_number`s, which count events, by position (`counted`).
# `item_id`: a Responses stream names its output item's random id in every event about it.
VOLATILE_FIELDS = {"id": "<id>", "item_id": "<id>", "created": "<time>", "created_at": "<time>"}


def normalised(value: Any) -> Any:
    """`value` with the string or number of every VOLATILE_FIELDS key, at any depth, replaced by a placeholder."""
    if isinstance(value, dict):
        return {
            key: VOLATILE_FIELDS[key]
            if key in VOLATILE_FIELDS and isinstance(item, str | int | float) and not isinstance(item, bool)
            else normalised(item)
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [normalised(item) for item in value]
    return value


@dataclass(frozen=True)
class Answer:
    """Status, whether it was a stream, and its body: the JSON document, or each event as {field: value} with
    its `data` parsed as JSON (except `[DONE]`). Bodies that are not JSON are kept as text."""

    status: int
    streamed: bool
    body: Any

    def normalised(self) -> Answer:
        body = normalised(self.body)
        return Answer(self.status, self.streamed, by_choice(body) if self.streamed else body)


CHOICE_CHUNKS = "<a choice's chunks>"


def by_choice(events: list[dict[str, Any]]) -> dict[str, Any]:
    """A stream's events as the sequence of each choice's own chunks (those carrying one choice), and the whole
    sequence with each run of those chunks written as one placeholder: what stays fixed however the server
    interleaves the choices. Text increments are `coalesced`, in each choice's chunks and in the sequence."""
    choices: dict[int, list[dict[str, Any]]] = {}
    sequence: list[Any] = []
    for event in events:
        data = event.get("data")
        one = data.get("choices") if isinstance(data, dict) else None
        if isinstance(one, list) and len(one) == 1 and isinstance(one[0], dict) and "index" in one[0]:
            choices.setdefault(one[0]["index"], []).append(event)
            if not sequence or sequence[-1] != CHOICE_CHUNKS:
                sequence.append(CHOICE_CHUNKS)
        else:
            sequence.append(event)
    return {
        "choices": {index: coalesced(chunks) for index, chunks in choices.items()},
        "sequence": coalesced(counted(sequence)),
    }


def coalesced(events: list[Any]) -> list[Any]:
    """`events` with each run of consecutive text increments of one output merged into one event, as vLLM
    merges them when its API server falls behind: the texts (and logprobs) joined, the last one's end and usage.
    Events are merged only where they are equal apart from those, so any other difference still counts."""
    merged: list[Any] = []
    for event in events:
        joined = _joined(merged[-1], event) if merged else None
        if joined is None:
            merged.append(event)
        else:
            merged[-1] = joined
    return merged


def counted(events: list[Any]) -> list[Any]:
    """A Responses stream with its `sequence_number`s written as a placeholder, if they count the events from 0
    (as vLLM's do): their positions then say the same, and merging increments changes them. Otherwise they are
    left as they are, so that a wrong count still differs (and keeps increments from being merged)."""
    numbers = [_data(event).get("sequence_number") for event in events]
    if not events or numbers != list(range(len(events))):
        return events
    return [{**event, "data": {**event["data"], "sequence_number": "<position>"}} for event in events]


def _data(event: Any) -> dict[str, Any]:
    data = event.get("data") if isinstance(event, dict) else None
    return data if isinstance(data, dict) else {}


def _joined(earlier: Any, later: Any) -> Any:
    """`earlier` and `later` as one event, if they are two increments of one output's text; else None."""
    first, second = _data(earlier), _data(later)
    if not first or not second or {**earlier, "data": None} != {**later, "data": None}:
        return None
    for join in (_joined_chunks, _joined_responses_deltas, _joined_messages_deltas):
        data = join(first, second)
        if data is not None:
            return {**later, "data": data}
    return None


# What an increment may differ in from the next one of its output, besides its text: chat and completion
# chunks carry the choice's end (set on the last only) and, with continuous_usage_stats, the usage so far.
_CHUNK_ENDS = ("finish_reason", "stop_reason")


def _joined_chunks(first: dict[str, Any], second: dict[str, Any]) -> dict[str, Any] | None:
    """Two chat or completion chunks of one choice, the first not its last."""
    if not (len(first.get("choices") or ()) == len(second.get("choices") or ()) == 1):
        return None
    one, two = first["choices"][0], second["choices"][0]
    if not isinstance(one, dict) or not isinstance(two, dict) or one.get("finish_reason") is not None:
        return None
    if "delta" in one:  # chat: deltas that carry text at most (vLLM sends `{}` for a token that decodes to "")
        earlier, later = one["delta"], two.get("delta")
        if not (isinstance(earlier, dict) and isinstance(later, dict)):
            return None
        deltas: tuple[dict[str, Any], ...] = (earlier, later)
        if not all(set(delta) <= {"content"} for delta in deltas):
            return None
        texts = [delta.get("content", "") for delta in deltas]
        if not all(isinstance(text, str) for text in texts):
            return None
        text = {"delta": {"content": "".join(texts)} if any("content" in delta for delta in deltas) else {}}
    elif isinstance(one.get("text"), str) and isinstance(two.get("text"), str):
        text = {"text": one["text"] + two["text"]}
    else:
        return None
    logprobs = _joined_logprobs(one.get("logprobs"), two.get("logprobs"))
    if logprobs is _UNJOINABLE or two.get("prompt_token_ids") is not None:  # only a first chunk names them
        return None
    rest = ("delta", "text", "logprobs", "prompt_token_ids", *_CHUNK_ENDS)
    if _without(one, rest) != _without(two, rest) or _without(first, ("choices", "usage")) != _without(
        second, ("choices", "usage")
    ):
        return None
    joined = {**two, **text, "logprobs": logprobs}
    if "prompt_token_ids" in one:
        joined["prompt_token_ids"] = one["prompt_token_ids"]
    return {**second, "choices": [joined]}


_UNJOINABLE = object()


def _joined_logprobs(one: Any, two: Any) -> Any:
    """Logprobs of two increments as one: none for either, or every list in them (chat's `content`,
    completions' `tokens`, `token_logprobs`, `top_logprobs`, `text_offset`) concatenated."""
    if one is None and two is None:
        return None
    if not (isinstance(one, dict) and isinstance(two, dict) and set(one) == set(two)):
        return _UNJOINABLE
    if not all(isinstance(value, list) for value in (*one.values(), *two.values())):
        return _UNJOINABLE
    return {key: one[key] + two[key] for key in one}


def _joined_responses_deltas(first: dict[str, Any], second: dict[str, Any]) -> dict[str, Any] | None:
    """Two `response.*.delta` events of one content part (same type, item, output and content index)."""
    kind = first.get("type")
    if not (isinstance(kind, str) and kind.startswith("response.") and kind.endswith(".delta")):
        return None
    if not (isinstance(first.get("delta"), str) and isinstance(second.get("delta"), str)):
        return None
    rest = ("delta", "logprobs")
    if _without(first, rest) != _without(second, rest):
        return None
    joined = {**second, "delta": first["delta"] + second["delta"]}
    if "logprobs" in first or "logprobs" in second:
        if not (isinstance(first.get("logprobs"), list) and isinstance(second.get("logprobs"), list)):
            return None
        joined["logprobs"] = first["logprobs"] + second["logprobs"]
    return joined


def _joined_messages_deltas(first: dict[str, Any], second: dict[str, Any]) -> dict[str, Any] | None:
    """Two Anthropic `content_block_delta` events of one block, with one text field of one delta type."""
    if first.get("type") != "content_block_delta" or _without(first, ("delta",)) != _without(second, ("delta",)):
        return None
    one, two = first.get("delta"), second.get("delta")
    if not (isinstance(one, dict) and isinstance(two, dict) and one.get("type") == two.get("type")):
        return None
    [field, *others] = [key for key in one if key != "type"] or [None]
    if others or field is None or set(one) != set(two):
        return None
    if not (isinstance(one[field], str) and isinstance(two[field], str)):
        return None
    return {**second, "delta": {**two, field: one[field] + two[field]}}


def _without(value: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    return {key: item for key, item in value.items() if key not in keys}


def sse_events(text: str) -> list[dict[str, Any]]:
    """Server-sent events as dicts of their fields (`event`, `data`; several data lines joined by newlines)."""
    events = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        fields: dict[str, Any] = {}
        for line in block.split("\n"):
            if not line or line.startswith(":"):
                continue
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            fields[name] = f"{fields[name]}\n{value}" if name in fields else value
        if "data" in fields and fields["data"] != "[DONE]":
            fields["data"] = _json_or_text(fields["data"])
        if fields:
            events.append(fields)
    return events


def _json_or_text(text: str) -> Any:
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return text


def exchange(url: str, body: Any, headers: dict[str, str] | None = None, timeout: float = 120) -> Answer:
    """POST `body` as JSON and read the whole answer."""
    with httpx.stream("POST", url, json=body, headers=headers, timeout=timeout) as response:
        text = response.read().decode()
        streamed = response.headers.get("content-type", "").startswith("text/event-stream")
    return Answer(response.status_code, streamed, sse_events(text) if streamed else _json_or_text(text))


def exchange_form(
    url: str, parts: list[tuple[str, str | tuple[str, bytes, str]]], headers: dict[str, str] | None = None
) -> Answer:
    """POST a multipart/form-data form, its parts in the given order (a text field, or a file as (name, bytes,
    content type)), and read the whole answer."""
    files = [(name, value if isinstance(value, tuple) else (None, value)) for name, value in parts]
    with httpx.stream("POST", url, files=files, headers=headers, timeout=120) as response:
        text = response.read().decode()
        streamed = response.headers.get("content-type", "").startswith("text/event-stream")
    return Answer(response.status_code, streamed, sse_events(text) if streamed else _json_or_text(text))
