"""OpenAI request bodies: known fields are checked; unknown fields (vLLM extensions) pass through."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

from resource_server.dispatch.base import Route

# Strict: OpenAI refuses "0.5" for a number, so do we. Extra fields are allowed and forwarded untouched.
_REQUEST_CONFIG = ConfigDict(extra="allow", strict=True)

Temperature = Annotated[float, Field(ge=0, le=2)]
Probability = Annotated[float, Field(ge=0, le=1)]
Penalty = Annotated[float, Field(ge=-2, le=2)]
PositiveInt = Annotated[int, Field(ge=1)]
Stop = str | list[str]
TokenIds = list[Annotated[int, Field(ge=0)]]
ModelName = Annotated[str, Field(min_length=1, max_length=255)]


class StreamOptions(BaseModel):
    model_config = _REQUEST_CONFIG
    include_usage: bool | None = None


class ChatMessage(BaseModel):
    model_config = _REQUEST_CONFIG
    role: Annotated[str, Field(min_length=1)]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None


class _Generation(BaseModel):
    """Fields shared by chat and text completions."""

    model_config = _REQUEST_CONFIG
    model: ModelName
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    max_tokens: PositiveInt | None = None
    temperature: Temperature | None = None
    top_p: Probability | None = None
    n: Annotated[int, Field(ge=1, le=128)] | None = None
    stop: Stop | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None
    seed: int | None = None
    user: str | None = None

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> Self:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self


class ChatCompletionRequest(_Generation):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: PositiveInt | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None


class CompletionRequest(_Generation):
    prompt: str | Annotated[list[str], Field(min_length=1)] | Annotated[TokenIds, Field(min_length=1)] | list[TokenIds]
    logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    echo: bool | None = None
    suffix: str | None = None
    best_of: PositiveInt | None = None


class EmbeddingRequest(BaseModel):
    model_config = _REQUEST_CONFIG
    model: ModelName
    input: (
        Annotated[str, Field(min_length=1)]
        | Annotated[list[str], Field(min_length=1)]
        | Annotated[TokenIds, Field(min_length=1)]
        | Annotated[list[TokenIds], Field(min_length=1)]
    )
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: PositiveInt | None = None
    user: str | None = None


REQUEST_SCHEMAS: dict[Route, type[BaseModel]] = {
    Route.CHAT: ChatCompletionRequest,
    Route.COMPLETIONS: CompletionRequest,
    Route.EMBEDDINGS: EmbeddingRequest,
}
