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
    AnthropicError,
    ChatCompletion,
    ChatCompletionRequest,
    ClassifyRequest,
    Completion,
    CompletionRequest,
    CountTokensRequest,
    Detokenized,
    DetokenizeRequest,
    EmbeddingList,
    EmbeddingRequest,
    Message,
    MessageRequest,
    PoolingAnswer,
    PoolingRequest,
    RerankAnswer,
    RerankRequest,
    Response,
    ResponseRequest,
    ScoreRequest,
    TokenCount,
    TokenizeRequest,
    Tokens,
    Transcription,
    TranscriptionRequest,
)


class Route(StrEnum):
    """Routes the gateway serves, as paths relative to its `/v1/` (and to the model server's `/v1/`, or to its
    root for the routes vLLM serves there: `at_server_root`)."""

    CHAT = "chat/completions"
    COMPLETIONS = "completions"
    EMBEDDINGS = "embeddings"
    RESPONSES = "responses"
    MESSAGES = "messages"
    COUNT_TOKENS = "messages/count_tokens"
    TOKENIZE = "tokenize"
    DETOKENIZE = "detokenize"
    SCORE = "score"
    RERANK = "rerank"
    POOLING = "pooling"
    CLASSIFY = "classify"
    TRANSCRIPTIONS = "audio/transcriptions"
    TRANSLATIONS = "audio/translations"


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


def _sse_data(event: bytes) -> dict[str, Any] | None:
    """The JSON object of an SSE event's `data:` line (after an optional `event:` line); None otherwise."""
    if event.startswith(b"data: "):
        start = 6
    else:
        at = event.find(b"\ndata: ")
        if at < 0:
            return None
        start = at + 7
    try:
        chunk = orjson.loads(event[start:].strip())
    except orjson.JSONDecodeError:
        return None
    return chunk if isinstance(chunk, dict) else None


class UsageReader:
    """Reads token counts where OpenAI-compatible servers put them: a top-level `usage` object, in the JSON
    answer and, when streaming with `include_usage`, in a final chunk (usually with no choices).

    Every reader gives usage in OpenAI's names (prompt_tokens, completion_tokens, total_tokens), which are
    the usage row's columns; routes that name tokens otherwise have their own reader below.
    """

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
        chunk = _sse_data(event) if event.startswith(b"data: ") else None
        return chunk if chunk is not None and isinstance(chunk.get(self._key), dict) else None

    def of_chunk(self, chunk: dict[str, Any]) -> object:
        return chunk[self._key]

    @property
    def key(self) -> str:
        """The usage object's name in an answer or a chunk."""
        return self._key


OPENAI_USAGE = UsageReader()


class _NoUsage(UsageReader):
    """Routes that run no inference (tokenize, count tokens): they use no tokens, whatever counts they return."""

    __slots__ = ()

    def of_answer(self, reply: object) -> object:
        return None

    def event_chunk(self, event: bytes) -> dict[str, Any] | None:
        return None


NO_USAGE = _NoUsage()


def _input_output_usage(usage: object) -> dict[str, int] | None:
    """Usage named as the Responses and Anthropic Messages APIs name it, in OpenAI's names."""
    if not isinstance(usage, dict):
        return None
    tokens = {
        "prompt_tokens": usage.get("input_tokens"),
        "completion_tokens": usage.get("output_tokens"),
        "total_tokens": usage.get("total_tokens"),
    }
    counts = {name: value for name, value in tokens.items() if isinstance(value, int)}
    if "total_tokens" not in counts and {"prompt_tokens", "completion_tokens"} <= counts.keys():
        counts["total_tokens"] = counts["prompt_tokens"] + counts["completion_tokens"]
    return counts


class ResponsesUsage(UsageReader):
    """`POST /v1/responses`: `usage.input_tokens / output_tokens` in the answer, and in the response that the
    final stream event (`response.completed`, or `.incomplete` / `.failed`) carries."""

    __slots__ = ()

    def of_answer(self, reply: object) -> object:
        return _input_output_usage(super().of_answer(reply))

    def event_chunk(self, event: bytes) -> dict[str, Any] | None:
        if b'"usage"' not in event or not event.startswith(RESPONSES_FINAL_EVENTS):
            return None
        chunk = _sse_data(event)
        response = chunk.get("response") if chunk else None
        return chunk if isinstance(response, dict) and isinstance(response.get("usage"), dict) else None

    def of_chunk(self, chunk: dict[str, Any]) -> object:
        return _input_output_usage(chunk["response"]["usage"])


class MessagesUsage(UsageReader):
    """`POST /v1/messages` (Anthropic): `usage.input_tokens / output_tokens` in the answer; in a stream,
    `message_start` carries the input tokens and `message_delta` both counts."""

    __slots__ = ()

    def of_answer(self, reply: object) -> object:
        return _input_output_usage(super().of_answer(reply))

    def event_chunk(self, event: bytes) -> dict[str, Any] | None:
        if b'"usage"' not in event or not event.startswith((b"event: message_start", b"event: message_delta")):
            return None
        return _sse_data(event)

    def of_chunk(self, chunk: dict[str, Any]) -> object:
        if chunk.get("type") == "message_start":
            message = chunk.get("message")
            usage = message.get("usage") if isinstance(message, dict) else None
            counts = _input_output_usage(usage)
            # Only the input is known at the start (its output_tokens is a placeholder 0).
            return {"prompt_tokens": counts["prompt_tokens"]} if counts and "prompt_tokens" in counts else None
        return _input_output_usage(chunk.get("usage"))


RESPONSES_FINAL_EVENTS = (b"event: response.completed", b"event: response.incomplete", b"event: response.failed")


NOT_STREAMED = BodyFields(stream=None, stream_options=None, n=None, max_tokens=())


@dataclass(frozen=True, slots=True)
class StreamFraming:
    """How a route's event stream ends, and how the gateway writes its own error into one.

    OpenAI's chat and completions streams end with `data: [DONE]`; the Responses and Anthropic Messages
    streams end with a named event (`event: response.completed`, `event: message_stop`) and have no [DONE].
    """

    done_event: bytes | None = b"data: [DONE]\n\n"
    final_events: tuple[bytes, ...] = ()  # the `event:` lines that end a complete stream without [DONE]

    def is_done(self, event: bytes) -> bool:
        """The [DONE] event (which the relay writes itself, so never passes on)."""
        return self.done_event is not None and event.startswith(b"data: [DONE]")

    def is_final(self, event: bytes) -> bool:
        return bool(self.final_events) and event.startswith(self.final_events)

    def error_event(self, body: bytes) -> bytes:
        """The gateway's error (its JSON envelope) as the stream's last event."""
        if self.done_event is not None:
            return b"data: " + body + b"\n\n"
        # Both SDKs raise on an `error` event whose data has an `error` object.
        return b"event: error\ndata: " + orjson.dumps({"type": "error", **orjson.loads(body)}) + b"\n\n"


OPENAI_FRAMING = StreamFraming()


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
    framing: StreamFraming = OPENAI_FRAMING
    at_server_root: bool = False  # vLLM serves it at `/<path>`, not `/v1/<path>` (the gateway keeps `/v1/`)
    # Documentation only: the envelope in which the model server refuses a request (passed on unchanged);
    # None: OpenAI's, as the gateway's own errors.
    refusal_schema: type[BaseModel] | None = None
    # The body is a multipart/form-data form (audio), streamed to the model server as it arrives, not JSON;
    # `fields` then names form fields, and its stream options are vLLM's flat `stream_include_usage` ones.
    form: bool = False

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


_SPEECH_FIELDS = BodyFields(stream_options="stream_include_usage", n=None, max_tokens=("max_completion_tokens",))
_SPEECH_STREAM_EXAMPLE = (
    'data: {"id": "transcribe-1", "object": "transcription.chunk", "created": 1767225600, "model": "demo-model", '
    '"choices": [{"delta": {"content": " Hello"}}]}\n\ndata: [DONE]\n\n'
)
# The examples' `file`: an empty WAV clip (8 kHz, 8-bit mono, no samples), whose 44 bytes are all ASCII so that
# the OpenAPI document can carry them as text; a client attaches a real recording instead.
EMPTY_WAV = (
    "RIFF$\x00\x00\x00WAVEfmt \x10\x00\x00\x00\x01\x00\x01\x00"
    "@\x1f\x00\x00@\x1f\x00\x00\x01\x00\x08\x00data\x00\x00\x00\x00"
)
_SPEECH_DESCRIPTION = (
    " A multipart/form-data form, as OpenAI's client sends it: the audio `file` and text fields. The gateway "
    "streams the upload on to the model server as it arrives (up to `AUDIO_MAX_BYTES`, 25 MiB by default; a "
    "model served through Globus Compute takes at most 7.3 MiB), reading only `model` and the stream fields "
    "from the fields before the file. With `stream=true` the text comes as server-sent events (vLLM's extension)."
)


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
            fields=NOT_STREAMED,
            usage=OPENAI_USAGE,
            summary="Create embeddings",
            description="Returns embedding vectors of the inputs, as OpenAI's `POST /v1/embeddings` does.",
            example={"model": "demo-model", "input": "The quick brown fox"},
        ),
        RouteDescriptor(
            Route.RESPONSES,
            request_schema=ResponseRequest,
            response_schema=Response,
            fields=BodyFields(stream_options=None, n=None, max_tokens=("max_output_tokens",)),
            usage=ResponsesUsage(),
            summary="Create a model response",
            description="Generates a response with the named model, as OpenAI's Responses API "
            "`POST /v1/responses` does (vLLM's implementation; stored responses are vLLM's business). Usage "
            "is `input_tokens` / `output_tokens`, in the answer and in the final `response.completed` event.",
            example={"model": "demo-model", "input": "Say hello in one word.", "max_output_tokens": 16},
            stream_example='event: response.created\ndata: {"type": "response.created", "sequence_number": 0, '
            '"response": {"id": "resp_1", "object": "response", "status": "in_progress"}}\n\n'
            'event: response.output_text.delta\ndata: {"type": "response.output_text.delta", '
            '"sequence_number": 4, "item_id": "msg_1", "output_index": 0, "content_index": 0, "delta": " Hello"}'
            "\n\nevent: response.completed\ndata: "
            '{"type": "response.completed", "sequence_number": 8, "response": {"id": "resp_1", '
            '"status": "completed", "usage": {"input_tokens": 9, "output_tokens": 1, "total_tokens": 10}}}\n\n',
            framing=StreamFraming(done_event=None, final_events=RESPONSES_FINAL_EVENTS),
        ),
        RouteDescriptor(
            Route.MESSAGES,
            request_schema=MessageRequest,
            response_schema=Message,
            fields=BodyFields(stream_options=None, n=None),
            usage=MessagesUsage(),
            summary="Create a message (Anthropic Messages API)",
            description="Generates the next message of a conversation, as Anthropic's `POST /v1/messages` "
            "does (vLLM's implementation). The stock `anthropic` client works with "
            '`Anthropic(base_url=".../resource_server", auth_token=<key>)` or `api_key=<key>` (sent as '
            "`x-api-key`). Usage is `input_tokens` / `output_tokens`, in the answer and in the stream's "
            "`message_start` and `message_delta` events.",
            example={
                "model": "demo-model",
                "max_tokens": 16,
                "messages": [{"role": "user", "content": "Say hello in one word."}],
            },
            stream_example='event: message_start\ndata: {"type": "message_start", "message": {"id": "msg_1", '
            '"type": "message", "role": "assistant", "content": [], "model": "demo-model", '
            '"usage": {"input_tokens": 9, "output_tokens": 0}}}\n\n'
            'event: content_block_delta\ndata: {"type": "content_block_delta", "index": 0, '
            '"delta": {"type": "text_delta", "text": " Hello"}}\n\n'
            'event: message_delta\ndata: {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, '
            '"usage": {"input_tokens": 9, "output_tokens": 1}}\n\n'
            'event: message_stop\ndata: {"type": "message_stop"}\n\n',
            framing=StreamFraming(done_event=None, final_events=(b"event: message_stop",)),
            refusal_schema=AnthropicError,
        ),
        RouteDescriptor(
            Route.COUNT_TOKENS,
            request_schema=CountTokensRequest,
            response_schema=TokenCount,
            fields=NOT_STREAMED,
            usage=NO_USAGE,
            summary="Count a message's input tokens (Anthropic Messages API)",
            description="The input tokens a `POST /v1/messages` request would use, as Anthropic's "
            "`POST /v1/messages/count_tokens` does. Nothing is generated, so no tokens are recorded as used.",
            example={"model": "demo-model", "messages": [{"role": "user", "content": "Say hello in one word."}]},
            refusal_schema=AnthropicError,
        ),
        RouteDescriptor(
            Route.TOKENIZE,
            request_schema=TokenizeRequest,
            response_schema=Tokens,
            fields=NOT_STREAMED,
            usage=NO_USAGE,
            summary="Tokenize a prompt",
            description="The token ids of a `prompt` (or of chat `messages`), as vLLM's `POST /tokenize` "
            "(served by vLLM without `/v1`). No tokens are recorded as used.",
            example={"model": "demo-model", "prompt": "The quick brown fox"},
            at_server_root=True,
        ),
        RouteDescriptor(
            Route.DETOKENIZE,
            request_schema=DetokenizeRequest,
            response_schema=Detokenized,
            fields=NOT_STREAMED,
            usage=NO_USAGE,
            summary="Detokenize token ids",
            description="The text of `tokens`, as vLLM's `POST /detokenize` (served by vLLM without `/v1`). "
            "No tokens are recorded as used.",
            example={"model": "demo-model", "tokens": [1, 2, 3]},
            at_server_root=True,
        ),
        RouteDescriptor(
            Route.SCORE,
            request_schema=ScoreRequest,
            response_schema=PoolingAnswer,
            fields=NOT_STREAMED,
            usage=OPENAI_USAGE,
            summary="Score text pairs",
            description="Similarity scores of `text_1` against `text_2`, as vLLM's `POST /v1/score` (a "
            "cross-encoder or embedding model). Usage: `usage.prompt_tokens`.",
            example={"model": "demo-model", "text_1": "What is a fox?", "text_2": ["A fox is an animal.", "Paris."]},
        ),
        RouteDescriptor(
            Route.RERANK,
            request_schema=RerankRequest,
            response_schema=RerankAnswer,
            fields=NOT_STREAMED,
            usage=OPENAI_USAGE,
            summary="Rerank documents",
            description="The `documents` ordered by relevance to `query`, as vLLM's `POST /v1/rerank` (Jina and "
            "Cohere style). Usage: `usage.prompt_tokens` where vLLM reports it, else `usage.total_tokens`.",
            example={"model": "demo-model", "query": "What is a fox?", "documents": ["A fox is an animal.", "Paris."]},
        ),
        RouteDescriptor(
            Route.POOLING,
            request_schema=PoolingRequest,
            response_schema=PoolingAnswer,
            fields=NOT_STREAMED,
            usage=OPENAI_USAGE,
            summary="Pool hidden states",
            description="The pooled hidden states of each input, as vLLM's `POST /pooling` (served by vLLM "
            "without `/v1`). Usage: `usage.prompt_tokens`.",
            example={"model": "demo-model", "input": "The quick brown fox"},
            at_server_root=True,
        ),
        RouteDescriptor(
            Route.CLASSIFY,
            request_schema=ClassifyRequest,
            response_schema=PoolingAnswer,
            fields=NOT_STREAMED,
            usage=OPENAI_USAGE,
            summary="Classify texts",
            description="Class probabilities of each input, as vLLM's `POST /classify` (served by vLLM without "
            "`/v1`). Usage: `usage.prompt_tokens`.",
            example={"model": "demo-model", "input": ["I love it", "I hate it"]},
            at_server_root=True,
        ),
        RouteDescriptor(
            Route.TRANSCRIPTIONS,
            request_schema=TranscriptionRequest,
            response_schema=Transcription,
            fields=_SPEECH_FIELDS,
            usage=OPENAI_USAGE,
            summary="Transcribe audio",
            description="The text of the audio `file`, as OpenAI's `POST /v1/audio/transcriptions` does (vLLM's "
            "implementation: a speech-to-text model such as Whisper). Usage: the audio's `seconds`, or the "
            "tokens of a stream." + _SPEECH_DESCRIPTION,
            example={"model": "demo-model", "response_format": "json", "file": EMPTY_WAV},
            stream_example=_SPEECH_STREAM_EXAMPLE,
            form=True,
        ),
        RouteDescriptor(
            Route.TRANSLATIONS,
            request_schema=TranscriptionRequest,
            response_schema=Transcription,
            fields=_SPEECH_FIELDS,
            usage=OPENAI_USAGE,
            summary="Translate audio into English",
            description="The English text of the audio `file`, as OpenAI's `POST /v1/audio/translations` does "
            "(vLLM's implementation). vLLM reports no usage for a translation that is not streamed."
            + _SPEECH_DESCRIPTION,
            example={"model": "demo-model", "response_format": "json", "file": EMPTY_WAV},
            stream_example=_SPEECH_STREAM_EXAMPLE.replace("transcribe-", "translate-").replace(
                "transcription.chunk", "translation.chunk"
            ),
            form=True,
        ),
    )
}
