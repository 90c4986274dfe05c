"""OpenAI request bodies as vLLM reads them, for the served OpenAPI only (`openapi_components`): the gateway
itself reads a handful of fields (routes.py, `BodyFields`) and leaves the rest for the model server to judge, so
these models describe what vLLM accepts (its lax coercion, its ranges) and never refuse a request.

They sit beside models of
the answers and of the error envelope that exist only for the documentation: the gateway relays the
model server's answers unchanged and never validates them.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.json_schema import models_json_schema

# Lax, like vLLM's request models ("0.5" is a number there); extra fields are vLLM's extensions.
_REQUEST_CONFIG = ConfigDict(extra="allow")
# Answers come from the model server: documented with the fields clients rely on; servers add more.
_ANSWER_CONFIG = ConfigDict(extra="allow")

Temperature = Annotated[float, Field(ge=0)]
Probability = Annotated[float, Field(ge=0, le=1)]
Penalty = Annotated[float, Field(ge=-2, le=2)]
PositiveInt = Annotated[int, Field(ge=1)]
Stop = str | list[str]
TokenIds = list[Annotated[int, Field(ge=0)]]
ModelName = Annotated[str, Field(min_length=1, max_length=255)]

_MODEL = "A model name from `GET /v1/models`."
_STREAM = "Send the answer as server-sent events (`text/event-stream`), ending with `data: [DONE]`."
_MAX_TOKENS = "Most tokens to generate. The prompt and these must fit in the model's context length."
_USER = "Your own label for the end user, stored with the usage record."


class StreamOptions(BaseModel):
    """Options of a streamed answer (only with `stream: true`)."""

    model_config = _REQUEST_CONFIG
    include_usage: bool | None = Field(
        default=None, description="End the stream with a chunk that carries the token counts."
    )


class ChatMessage(BaseModel):
    """One message of the conversation. Tool calls and other vLLM fields pass through unchanged."""

    model_config = _REQUEST_CONFIG
    role: Annotated[str, Field(min_length=1)] = Field(
        description="Who speaks: `system`, `user`, `assistant` or `tool`.", examples=["user"]
    )
    content: str | list[dict[str, Any]] | None = Field(
        default=None,
        description='The text, or a list of content parts (e.g. `{"type": "text", "text": "..."}`).',
        examples=["Say hello in one word."],
    )
    name: str | None = Field(default=None, description="An optional name for the speaker.")


class _Generation(BaseModel):
    """Fields shared by chat and text completions."""

    model_config = _REQUEST_CONFIG
    model: ModelName = Field(description=_MODEL, examples=["demo-model"])
    stream: bool | None = Field(default=False, description=_STREAM)
    stream_options: StreamOptions | None = Field(default=None, description="Only allowed with `stream: true`.")
    max_tokens: Annotated[int, Field(ge=0)] | None = Field(
        default=None, description=_MAX_TOKENS + " 0 with `echo` (completions) scores the prompt only."
    )
    temperature: Temperature | None = Field(default=None, description="Sampling temperature; 0 is greedy.")
    top_p: Probability | None = Field(default=None, description="Nucleus sampling: the probability mass kept.")
    n: Annotated[int, Field(ge=1, le=128)] | None = Field(default=None, description="How many choices to generate.")
    stop: Stop | None = Field(default=None, description="Text (or texts) at which generation stops.")
    presence_penalty: Penalty | None = Field(default=None, description="Penalise tokens already present.")
    frequency_penalty: Penalty | None = Field(default=None, description="Penalise tokens by how often they occur.")
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = Field(
        default=None, description="Token id (as a string) to a bias added to its logit."
    )
    seed: int | None = Field(default=None, description="Seed for reproducible sampling.")
    user: str | None = Field(default=None, description=_USER)

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> Self:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self


class ChatCompletionRequest(_Generation):
    """A chat completion. Fields the OpenAI API does not define (vLLM's `top_k`, `min_p`, `guided_json`,
    `chat_template_kwargs`, ...) are passed to the model server unchanged."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)] = Field(
        description="The conversation so far, oldest first."
    )
    max_completion_tokens: PositiveInt | None = Field(default=None, description="Like `max_tokens` (newer name).")
    logprobs: bool | None = Field(default=None, description="Return the log probabilities of the chosen tokens.")
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = Field(
        default=None, description="With `logprobs`: how many alternatives to return per token."
    )
    tools: list[dict[str, Any]] | None = Field(default=None, description="Tools (functions) the model may call.")
    tool_choice: str | dict[str, Any] | None = Field(default=None, description="Which tool the model must call.")
    response_format: dict[str, Any] | None = Field(
        default=None, description='E.g. `{"type": "json_object"}` for JSON output.'
    )


class CompletionRequest(_Generation):
    """A text completion. Fields the OpenAI API does not define are passed to the model server unchanged."""

    prompt: (
        str | Annotated[list[str], Field(min_length=1)] | Annotated[TokenIds, Field(min_length=1)] | list[TokenIds]
    ) = Field(description="The text to continue, several texts, or token ids.", examples=["Once upon a time"])
    logprobs: Annotated[int, Field(ge=0, le=20)] | None = Field(
        default=None, description="Return the log probabilities of this many most likely tokens."
    )
    echo: bool | None = Field(default=None, description="Return the prompt before the completion.")
    suffix: str | None = Field(default=None, description="Text that comes after the completion.")
    best_of: int | None = Field(default=None, description="Generate this many and return the best `n`.")


class EmbeddingRequest(BaseModel):
    """Embeddings of one or more inputs. Unknown fields are passed to the model server unchanged."""

    model_config = _REQUEST_CONFIG
    model: ModelName = Field(description=_MODEL, examples=["demo-model"])
    input: (
        Annotated[str, Field(min_length=1)]
        | Annotated[list[str], Field(min_length=1)]
        | Annotated[TokenIds, Field(min_length=1)]
        | Annotated[list[TokenIds], Field(min_length=1)]
    ) = Field(description="A text, several texts, or token ids.", examples=["The quick brown fox"])
    encoding_format: Literal["float", "base64"] | None = Field(
        default=None, description="`float` (default) or `base64` (little-endian float32)."
    )
    dimensions: PositiveInt | None = Field(default=None, description="Truncate the vectors to this many dimensions.")
    user: str | None = Field(default=None, description=_USER)


# The routes added in issue 11 read only `model` (and `stream` where they stream): the model server checks
# every other field, so their schemas name the main fields for the documentation and validate nothing else.
_PASS_THROUGH_CONFIG = ConfigDict(extra="allow")


class ResponseRequest(BaseModel):
    """An OpenAI Responses API request, as vLLM serves `POST /v1/responses`."""

    model_config = _PASS_THROUGH_CONFIG
    model: ModelName = Field(description=_MODEL, examples=["demo-model"])
    input: Any = Field(default=None, description="A text, or a list of input items (messages).")
    stream: Any = Field(
        default=None, description="Send the answer as named server-sent events, ending with `response.completed`."
    )
    max_output_tokens: Any = Field(default=None, description=_MAX_TOKENS)


class MessageRequest(BaseModel):
    """An Anthropic Messages API request, as vLLM serves `POST /v1/messages`."""

    model_config = _PASS_THROUGH_CONFIG
    model: ModelName = Field(description=_MODEL, examples=["demo-model"])
    messages: Any = Field(default=None, description="The conversation: `role` and `content` per message.")
    max_tokens: Any = Field(default=None, description=_MAX_TOKENS + " Required by the Messages API.")
    stream: Any = Field(
        default=None, description="Send the answer as named server-sent events, ending with `message_stop`."
    )


class CountTokensRequest(BaseModel):
    """Anthropic's `POST /v1/messages/count_tokens`: the input tokens a Messages request would use."""

    model_config = _PASS_THROUGH_CONFIG
    model: ModelName = Field(description=_MODEL, examples=["demo-model"])
    messages: Any = Field(default=None, description="The conversation, as for `POST /v1/messages`.")


class TokenizeRequest(BaseModel):
    """vLLM's `POST /tokenize`: a `prompt`, or chat `messages`, to token ids."""

    model_config = _PASS_THROUGH_CONFIG
    model: ModelName = Field(description=_MODEL, examples=["demo-model"])
    prompt: Any = Field(default=None, description="The text to tokenize (or send `messages`).")


class DetokenizeRequest(BaseModel):
    """vLLM's `POST /detokenize`: token ids back to text."""

    model_config = _PASS_THROUGH_CONFIG
    model: ModelName = Field(description=_MODEL, examples=["demo-model"])
    tokens: Any = Field(default=None, description="The token ids.")


class ScoreRequest(BaseModel):
    """vLLM's `POST /v1/score`: similarity of text pairs with a cross-encoder or embedding model."""

    model_config = _PASS_THROUGH_CONFIG
    model: ModelName = Field(description=_MODEL, examples=["demo-model"])
    text_1: Any = Field(default=None, description="A text, or texts, to score against `text_2`.")
    text_2: Any = Field(default=None, description="A text, or texts.")


class RerankRequest(BaseModel):
    """vLLM's `POST /v1/rerank` (Jina and Cohere style): documents ordered by relevance to a query."""

    model_config = _PASS_THROUGH_CONFIG
    model: ModelName = Field(description=_MODEL, examples=["demo-model"])
    query: Any = Field(default=None, description="The query.")
    documents: Any = Field(default=None, description="The documents to rank.")
    top_n: Any = Field(default=None, description="Return only the best this many.")


class PoolingRequest(BaseModel):
    """vLLM's `POST /pooling`: the pooled hidden states of the inputs."""

    model_config = _PASS_THROUGH_CONFIG
    model: ModelName = Field(description=_MODEL, examples=["demo-model"])
    input: Any = Field(default=None, description="A text, several texts, or token ids.")


class ClassifyRequest(BaseModel):
    """vLLM's `POST /classify`: class probabilities of each input, with a classification model."""

    model_config = _PASS_THROUGH_CONFIG
    model: ModelName = Field(description=_MODEL, examples=["demo-model"])
    input: Any = Field(default=None, description="A text or several texts.")


# Documentation only: what the model server answers, relayed unchanged.


class TranscriptionRequest(BaseModel):
    """vLLM's `POST /v1/audio/transcriptions` and `/v1/audio/translations`: a multipart/form-data form with the
    audio `file` and text fields (vLLM reads booleans and numbers from their text, e.g. `stream=true`)."""

    model_config = _PASS_THROUGH_CONFIG
    file: bytes = Field(description="The audio file: flac, mp3, mp4, mpeg, mpga, m4a, ogg, wav or webm.")
    model: ModelName = Field(
        description=_MODEL + " Send it before `file`, as the OpenAI client does: the gateway routes the upload "
        "by it while the audio streams on (see the user guide).",
        examples=["demo-model"],
    )
    language: str | None = Field(default=None, description="The audio's language (ISO-639-1), e.g. `en`.")
    prompt: str | None = Field(default=None, description="Text to guide the model's style or continue a segment.")
    response_format: Literal["json", "text", "srt", "verbose_json", "vtt"] | None = Field(
        default=None, description="`json` (the default), `text` or `verbose_json`; vLLM refuses `srt` and `vtt`."
    )
    temperature: float | None = Field(default=None, description="Sampling temperature, 0 to 1.")
    stream: bool | None = Field(
        default=None, description="Send the text as server-sent `transcription.chunk` events, ending with [DONE]."
    )
    stream_include_usage: bool | None = Field(default=None, description="With `stream`: a final usage chunk.")
    stream_continuous_usage_stats: bool | None = Field(default=None, description="With `stream`: usage on every chunk.")


class Transcription(BaseModel):
    """The text of the audio; a transcription's `usage` is the audio's duration (`{"type": "duration",
    "seconds": N}`). `verbose_json` adds `duration`, `language` and `segments`."""

    model_config = _ANSWER_CONFIG
    text: str
    usage: dict[str, Any] | None = None


class Usage(BaseModel):
    """Token counts, as the model server reports them."""

    model_config = _ANSWER_CONFIG
    prompt_tokens: int
    completion_tokens: int | None = None
    total_tokens: int


class AssistantMessage(BaseModel):
    model_config = _ANSWER_CONFIG
    role: str
    content: str | None = None


class ChatChoice(BaseModel):
    model_config = _ANSWER_CONFIG
    index: int
    message: AssistantMessage
    finish_reason: str | None = None


class ChatCompletion(BaseModel):
    """A chat completion (`stream` false or absent)."""

    model_config = _ANSWER_CONFIG
    id: str
    object: str = Field(examples=["chat.completion"])
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None


class CompletionChoice(BaseModel):
    model_config = _ANSWER_CONFIG
    index: int
    text: str
    finish_reason: str | None = None


class Completion(BaseModel):
    """A text completion (`stream` false or absent)."""

    model_config = _ANSWER_CONFIG
    id: str
    object: str = Field(examples=["text_completion"])
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class Embedding(BaseModel):
    model_config = _ANSWER_CONFIG
    object: str = Field(examples=["embedding"])
    index: int
    embedding: list[float] | str = Field(description="The vector, or base64 of float32 with `encoding_format`.")


class EmbeddingList(BaseModel):
    """Embeddings, one per input, in input order."""

    model_config = _ANSWER_CONFIG
    object: str = Field(examples=["list"])
    data: list[Embedding]
    model: str
    usage: Usage | None = None


class InputOutputUsage(BaseModel):
    """Token counts as the Responses and Anthropic Messages APIs name them."""

    model_config = _ANSWER_CONFIG
    input_tokens: int
    output_tokens: int


class Response(BaseModel):
    """A Responses API answer (`stream` false or absent)."""

    model_config = _ANSWER_CONFIG
    id: str
    object: str = Field(examples=["response"])
    model: str
    status: str = Field(examples=["completed"])
    output: list[dict[str, Any]]
    usage: InputOutputUsage | None = None


class Message(BaseModel):
    """An Anthropic Messages API answer (`stream` false or absent)."""

    model_config = _ANSWER_CONFIG
    id: str
    type: str = Field(examples=["message"])
    role: str = Field(examples=["assistant"])
    model: str
    content: list[dict[str, Any]]
    stop_reason: str | None = None
    usage: InputOutputUsage


class TokenCount(BaseModel):
    """The input tokens a Messages request would use."""

    model_config = _ANSWER_CONFIG
    input_tokens: int


class Tokens(BaseModel):
    """Token ids of the input."""

    model_config = _ANSWER_CONFIG
    count: int
    max_model_len: int
    tokens: list[int]


class Detokenized(BaseModel):
    """The text of the token ids."""

    model_config = _ANSWER_CONFIG
    prompt: str


class PoolingAnswer(BaseModel):
    """The answer of `/v1/score`, `/pooling` and `/classify`: one `data` item per input (or pair), in order."""

    model_config = _ANSWER_CONFIG
    id: str
    object: str = Field(examples=["list"])
    model: str
    data: list[dict[str, Any]]
    usage: Usage | None = None


class RerankAnswer(BaseModel):
    """Documents by relevance, best first."""

    model_config = _ANSWER_CONFIG
    id: str
    model: str
    results: list[dict[str, Any]]
    usage: dict[str, Any] | None = None


class ModelPlacement(BaseModel):
    model_config = _ANSWER_CONFIG
    cluster: str
    framework: str
    status: str = Field(examples=["queued"])
    since: int | None = Field(description="When it entered that state (Unix time), when known.")
    eta_seconds: int | None = Field(description="Seconds until it is expected to answer, when known.")
    queue_position: int | None = Field(description="Its job's place in the cluster's queue, when queued.")


class Model(BaseModel):
    model_config = _ANSWER_CONFIG
    id: str = Field(description="The name to send as `model`.", examples=["demo-model"])
    object: str = Field(examples=["model"])
    created: int
    owned_by: str = Field(description="The cluster that serves it.")
    max_model_len: int | None = Field(
        default=None, description="The model's context length, as its server reports it (vLLM), once probed."
    )
    root: str | None = Field(default=None, description="What the server loaded (vLLM's `root`), once probed.")
    parent: str | None = Field(default=None, description="The base model of an adapter (vLLM's `parent`).")
    status: str | None = Field(
        default=None,
        description="The model's best state over your endpoints: live, draining, unknown, starting, queued, offline "
        "or maintenance (the user guide explains each).",
        examples=["live"],
    )
    clusters: list[ModelPlacement] | None = Field(
        default=None, description="Every cluster endpoint serving it to you, best first, with its state."
    )


class ModelList(BaseModel):
    """The models you may use, each once, by name."""

    object: Literal["list"]
    data: list[Model]


class ErrorDetail(BaseModel):
    message: str = Field(description="What went wrong and what to do, for a person to read.")
    type: str = Field(description="OpenAI's error type, e.g. `invalid_request_error` (vLLM's: `BadRequestError`).")
    param: str | None = Field(description="The request field at fault, if one is.")
    code: str | int | None = Field(
        description="A stable code for programs (see the user guide's table of codes); a model server's refusal "
        "keeps its own (vLLM's is the HTTP status, a number)."
    )


class ErrorEnvelope(BaseModel):
    """OpenAI's error envelope; some errors add fields beside `error` (e.g. Globus re-authentication hints)."""

    model_config = _ANSWER_CONFIG
    error: ErrorDetail


class AnthropicErrorDetail(BaseModel):
    model_config = _ANSWER_CONFIG
    type: str = Field(description="The error's kind, e.g. `invalid_request_error` (vLLM's: `BadRequestError`).")
    message: str


class AnthropicError(BaseModel):
    """Anthropic's error envelope, in which the Messages routes' model server refuses a request (passed on as is)."""

    model_config = _ANSWER_CONFIG
    type: Literal["error"]
    error: AnthropicErrorDetail


class Health(BaseModel):
    status: Literal["ok"]


_DOCUMENTED: tuple[type[BaseModel], ...] = (
    AnthropicError,
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    ResponseRequest,
    MessageRequest,
    CountTokensRequest,
    TokenizeRequest,
    DetokenizeRequest,
    ScoreRequest,
    RerankRequest,
    PoolingRequest,
    ClassifyRequest,
    TranscriptionRequest,
    ChatCompletion,
    Completion,
    EmbeddingList,
    Response,
    Message,
    TokenCount,
    Tokens,
    Detokenized,
    PoolingAnswer,
    RerankAnswer,
    Transcription,
    ModelList,
    ErrorEnvelope,
    Health,
)


def schema_ref(model: type[BaseModel]) -> dict[str, str]:
    """A reference to `model` among the OpenAPI components."""
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def openapi_components() -> dict[str, Any]:
    """The JSON schemas of every documented body, and of the models they refer to, by name."""
    _, top = models_json_schema(
        [(model, "validation") for model in _DOCUMENTED], ref_template="#/components/schemas/{model}"
    )
    definitions: dict[str, Any] = top["$defs"]
    return definitions
