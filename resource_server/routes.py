"""The inference routes the gateway serves: one row each, read by every part that handles them.

The lean ASGI door's path pattern (`api/fast.py`), the ninja operations (`api/inference.py`), their OpenAPI
documentation (`api/openapi.py`), the parse stage and the stream relay (`pipeline/`) all iterate or look up
`ROUTES`: serving one more OpenAI route is one more row here, not a new code path.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import orjson
from pydantic import BaseModel

from resource_server.schemas import (
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    EmbeddingList,
    EmbeddingRequest,
)


class Route(StrEnum):
    """OpenAI routes the gateway serves, as paths relative to a server's `/v1/`."""

    CHAT = "chat/completions"
    COMPLETIONS = "completions"
    EMBEDDINGS = "embeddings"


@dataclass(frozen=True, slots=True)
class BodyFields:
    """The names of the body fields the gateway itself reads; None (or empty) where a route has no such field.

    Everything else in a body is the model server's business and reaches it unchanged.
    """

    model: str = "model"
    stream: str | None = "stream"
    stream_options: str | None = "stream_options"
    n: str | None = "n"
    max_tokens: tuple[str, ...] = ("max_tokens",)  # the first one present counts


class UsageReader:
    """Reads token counts where OpenAI-compatible servers put them: a top-level `usage` object, in the JSON
    answer and, when streaming with `include_usage`, in a final chunk (usually with no choices)."""

    __slots__ = ("_key", "_marker", "_nulls")

    def __init__(self, key: str = "usage") -> None:
        self._key = key
        self._marker = f'"{key}"'.encode()
        self._nulls = (f'"{key}":null'.encode(), f'"{key}": null'.encode())

    def of_answer(self, reply: object) -> object:
        """The usage object of a parsed JSON answer (None if it has none)."""
        return reply.get(self._key) if isinstance(reply, dict) else None

    def event_chunk(self, event: bytes) -> dict[str, Any] | None:
        """The parsed chunk of an SSE event that carries usage (a cheap byte test comes before parsing)."""
        if self._marker not in event or self._nulls[0] in event or self._nulls[1] in event:
            return None
        if not event.startswith(b"data: "):
            return None
        try:
            chunk = orjson.loads(event[6:].strip())
        except orjson.JSONDecodeError:
            return None
        if isinstance(chunk, dict) and isinstance(chunk.get(self._key), dict):
            return chunk
        return None

    def of_chunk(self, chunk: dict[str, Any]) -> object:
        return chunk[self._key]

    @property
    def key(self) -> str:
        """The usage object's name in an answer or a chunk."""
        return self._key


OPENAI_USAGE = UsageReader()


@dataclass(frozen=True, slots=True)
class RouteDescriptor:
    """Everything the gateway knows about one inference route."""

    route: Route
    # Documentation only (the OpenAPI): the gateway reads `fields`, the model server judges the rest.
    request_schema: type[BaseModel]
    response_schema: type[BaseModel]  # documentation only: answers are relayed unchanged
    fields: BodyFields
    usage: UsageReader
    summary: str
    description: str
    example: dict[str, Any]  # a body the demo deployment serves as it is (the docs page's "Try it out")
    stream_example: str | None = None  # what a streamed answer looks like; None: the route never streams

    def __post_init__(self) -> None:
        if self.streams != (self.stream_example is not None):
            raise ValueError(f"{self.route}: a route that streams documents a stream example, and only such a route")

    @property
    def path(self) -> str:
        """The path below `/v1/`, on the gateway as on the model server."""
        return self.route.value

    @property
    def streams(self) -> bool:
        """Whether the route answers with server-sent events when the body asks for it."""
        return self.fields.stream is not None


ROUTES: dict[Route, RouteDescriptor] = {
    descriptor.route: descriptor
    for descriptor in (
        RouteDescriptor(
            Route.CHAT,
            request_schema=ChatCompletionRequest,
            response_schema=ChatCompletion,
            fields=BodyFields(max_tokens=("max_completion_tokens", "max_tokens")),
            usage=OPENAI_USAGE,
            summary="Create a chat completion",
            description="Generates the next message of a conversation with the named model, as OpenAI's "
            "`POST /v1/chat/completions` does.",
            example={
                "model": "demo-model",
                "messages": [{"role": "user", "content": "Say hello in one word."}],
                "max_tokens": 16,
            },
            stream_example='data: {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1767225600, '
            '"model": "demo-model", "choices": [{"index": 0, "delta": {"content": "Hello"}, "finish_reason": null}]}'
            "\n\ndata: [DONE]\n\n",
        ),
        RouteDescriptor(
            Route.COMPLETIONS,
            request_schema=CompletionRequest,
            response_schema=Completion,
            fields=BodyFields(),
            usage=OPENAI_USAGE,
            summary="Create a text completion",
            description="Continues a prompt with the named model, as OpenAI's `POST /v1/completions` does.",
            example={"model": "demo-model", "prompt": "Once upon a time", "max_tokens": 16},
            stream_example='data: {"id": "cmpl-1", "object": "text_completion", "created": 1767225600, '
            '"model": "demo-model", "choices": [{"index": 0, "text": " there", "finish_reason": null}]}\n\n'
            "data: [DONE]\n\n",
        ),
        RouteDescriptor(
            Route.EMBEDDINGS,
            request_schema=EmbeddingRequest,
            response_schema=EmbeddingList,
            fields=BodyFields(stream=None, stream_options=None, n=None, max_tokens=()),
            usage=OPENAI_USAGE,
            summary="Create embeddings",
            description="Returns embedding vectors of the inputs, as OpenAI's `POST /v1/embeddings` does.",
            example={"model": "demo-model", "input": "The quick brown fox"},
        ),
    )
}
