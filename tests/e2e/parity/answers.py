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
# ignored: status, every other field and value, event names, the order and number of events, except that with
# several choices (n > 1) a stream is compared choice by choice: vLLM interleaves the choices' chunks in an order
# that changes from one run to the next.
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


def by_choice(events: list[dict[str, Any]]) -> dict[str, Any]:
    """A stream's events as the sequence of each choice's own chunks (those carrying one choice), and the whole
    sequence with each of those chunks written as a placeholder: what stays fixed however the server interleaves
    the choices."""
    choices: dict[int, list[dict[str, Any]]] = {}
    sequence: list[Any] = []
    for event in events:
        data = event.get("data")
        one = data.get("choices") if isinstance(data, dict) else None
        if isinstance(one, list) and len(one) == 1 and isinstance(one[0], dict) and "index" in one[0]:
            choices.setdefault(one[0]["index"], []).append(event)
            sequence.append("<a choice's chunk>")
        else:
            sequence.append(event)
    return {"choices": choices, "sequence": sequence}


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
