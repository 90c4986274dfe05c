"""A fast, deterministic fake of vLLM's OpenAI-compatible server, as a pure ASGI app.

It backs the demo, the test-suite and the benchmarks. It answers like vLLM 0.32 does (routes, response
and error bodies, SSE framing, context-length rules, the --api-key check; checked against captures of a
real server) but "generates" words from a fixed vocabulary picked by a hash of the prompt, so the same
request always gets the same answer. A token is one whitespace-separated word, in prompts and completions.

Faults can be set for the whole server (`FakeServerConfig`) or per request with an extra body field, which
also proves that a proxy in front passes unknown fields through::

    "fake_vllm": {"status": 503, "message": "...", "latency": 0.2, "ttft": 0.05,
                  "tokens_per_second": 50, "hang": true, "fail_after_tokens": 3}

`GET /fake/stats` returns counters and the last inference request body.

Run it from the repository root with `python -m fakes.model_server --port 8001`.
The app itself needs only the standard library, orjson and (for the audio routes' multipart forms)
python-multipart, the parser vLLM's FastAPI uses; uvicorn is imported only to run it.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import hmac
import io
import json
import math
import os
import struct
import time
import urllib.parse
import wave
import zlib
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field, fields
from fractions import Fraction
from functools import partial
from http import HTTPStatus
from typing import Any, Literal

import orjson
from python_multipart import MultipartParser
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import parse_options_header

from fakes import asgi
from fakes.asgi import JSON, Header, Receive, Scope, Send

Handler = Callable[[Scope, Receive, Send], Awaitable[None]]
StreamOutcome = Literal["completed", "aborted", "disconnected"]

VLLM_VERSION = "0.32.0"  # the release whose answers this fake copies
SYSTEM_FINGERPRINT = f"vllm-{VLLM_VERSION}-fake"
RUNNERS = ("all", "generate", "pooling")
# The inference routes only one kind of model has on vLLM; tokenize and detokenize are served for both.
_GENERATE_ONLY = frozenset(
    (
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/responses",
        "/v1/messages",
        "/v1/messages/count_tokens",
        "/v1/audio/transcriptions",
        "/v1/audio/translations",
    )
)
_POOLING_ONLY = frozenset(("/v1/embeddings", "/pooling", "/classify", "/v1/score", "/v1/rerank"))
ERROR_STATUSES = frozenset(s.value for s in HTTPStatus if 400 <= s.value < 600)


@dataclass(frozen=True, slots=True)
class FakeServerConfig:
    """What the fake serves and how it misbehaves. Checked on creation: bad values fail at boot.

    `default_max_tokens` is the /v1/completions length when a request sets none (vLLM and OpenAI
    use 16); chat, like vLLM, may then use the rest of the context.
    """

    models: tuple[str, ...] = ("demo-model",)
    max_model_len: int = 4096
    embedding_dim: int = 16
    latency: float = 0.0
    ttft: float = 0.0
    tokens_per_second: float = 0.0
    default_max_tokens: int = 16
    error_rate: float = 0.0
    error_status: int = 500
    error_message: str = "Injected failure from the fake vLLM server."
    api_key: str | None = None
    # Which routes it serves, as vLLM does for the kind of model it runs: "generate" (chat, completions,
    # responses, messages...), "pooling" (embeddings, pooling, classify, score, rerank), or "all" (a fake only).
    runner: str = "all"

    def __post_init__(self) -> None:
        checks = (
            (bool(self.models) and all(self.models), "models must be non-empty names"),
            (self.max_model_len >= 1, "max_model_len must be at least 1"),
            (self.embedding_dim >= 1, "embedding_dim must be at least 1"),
            (self.default_max_tokens >= 1, "default_max_tokens must be at least 1"),
            (
                min(self.latency, self.ttft, self.tokens_per_second) >= 0,
                "latency, ttft and tokens_per_second must be >= 0",
            ),
            (0 <= self.error_rate <= 1, "error_rate must be between 0 and 1"),
            (self.error_status in ERROR_STATUSES, "error_status must be 4xx or 5xx"),
            (self.api_key != "", "api_key must be None or non-empty"),
            (self.runner in RUNNERS, f"runner must be one of {', '.join(RUNNERS)}"),
        )
        problems = [message for ok, message in checks if not ok]
        if problems:
            raise ValueError("; ".join(problems))


_DEFAULTS = FakeServerConfig()


def create_app(config: FakeServerConfig) -> FakeModelServer:
    """Build the ASGI app for `config`."""
    return FakeModelServer(config)


# --- errors -----------------------------------------------------------------------------------

# vLLM names the common statuses like the OpenAI SDK's exceptions; others get the HTTP phrase.
_ERROR_TYPES = {
    400: "BadRequestError",
    404: "NotFoundError",
    429: "RateLimitError",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
}


def error_type_for(status: int) -> str:
    """The envelope `type` the fake uses for an HTTP error status."""
    return _ERROR_TYPES.get(status) or HTTPStatus(status).phrase.replace(" ", "")


class ApiError(Exception):
    """An error answered in vLLM's envelope: {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        error_type: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = int(status)  # a plain int, not HTTPStatus, in the JSON body
        self.message = message
        self.param = param
        self.error_type = error_type or error_type_for(self.status)

    def body(self) -> bytes:
        error = {"message": self.message, "type": self.error_type, "param": self.param}
        return orjson.dumps({"error": {**error, "code": self.status}})


_UNSET = object()


def _invalid(param: str | None, message: str, value: object = _UNSET) -> ApiError:
    """A failed vLLM-side check: BadRequestError, with vLLM's "(parameter=..., value=...)" tail."""
    if param is None:
        return ApiError(HTTPStatus.BAD_REQUEST, message)
    tail = f"parameter={param}" if value is _UNSET else f"parameter={param}, value={value}"
    return ApiError(HTTPStatus.BAD_REQUEST, f"{message} ({tail})", param=param)


_SCHEMA_ERROR_TYPE = "Bad Request"


def _schema_error(loc: str, kind: str, msg: str, value: object, **ctx: str) -> ApiError:
    """A body that fails vLLM's request schema: FastAPI's validation error, typed 'Bad Request'."""
    detail: JSON = {"type": kind, "loc": loc, "msg": msg, "input": _input_repr(value)}
    if ctx:
        detail["ctx"] = ctx
    return ApiError(
        HTTPStatus.BAD_REQUEST,
        f"1 validation error:\n  {detail!r}",
        param=loc,
        error_type=_SCHEMA_ERROR_TYPE,
    )


def _input_repr(value: object) -> str:
    if isinstance(value, dict | list):
        return f"<{type(value).__name__} of {len(value)} items>"
    return str(value)


# --- field readers: pydantic's lax mode, as vLLM's request models read JSON, in pydantic's words --------


def _is_int(value: object) -> bool:
    # JSON true/false arrive as bool, which is a subclass of int.
    return isinstance(value, int) and not isinstance(value, bool)


_TRUE_STRINGS = frozenset(("1", "on", "t", "true", "y", "yes"))
_FALSE_STRINGS = frozenset(("0", "off", "f", "false", "n", "no"))
_NOT_READ = object()


def _lax_integer(value: object) -> object:
    if isinstance(value, int):  # true is 1
        return int(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    return _NOT_READ


def _lax_number(value: object) -> object:
    if isinstance(value, int | float):
        return value
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            pass
    return _NOT_READ


def _lax_boolean(value: object) -> object:
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.lower() in _TRUE_STRINGS | _FALSE_STRINGS:
        return value.lower() in _TRUE_STRINGS
    return _NOT_READ


def _strict(check: Callable[[object], bool]) -> Callable[[object], object]:
    return lambda value: value if check(value) else _NOT_READ


# kind -> (lax reader, pydantic error type, message, error type and message when a string was sent)
_KINDS: dict[str, tuple[Callable[[object], object], str, str, str, str]] = {
    "integer": (
        _lax_integer,
        "int_type",
        "Input should be a valid integer",
        "int_parsing",
        "Input should be a valid integer, unable to parse string as an integer",
    ),
    "number": (
        _lax_number,
        "float_type",
        "Input should be a valid number",
        "float_parsing",
        "Input should be a valid number, unable to parse string as a number",
    ),
    "boolean": (
        _lax_boolean,
        "bool_type",
        "Input should be a valid boolean",
        "bool_parsing",
        "Input should be a valid boolean, unable to interpret input",
    ),
    "string": (
        _strict(lambda value: isinstance(value, str)),
        "string_type",
        "Input should be a valid string",
        "string_type",
        "Input should be a valid string",
    ),
    "object": (
        _strict(lambda value: isinstance(value, dict)),
        "dict_type",
        "Input should be a valid dictionary",
        "dict_type",
        "Input should be a valid dictionary",
    ),
}


def _field(body: Mapping[str, Any], name: str, kind: str, *, at: str = "body") -> Any:
    """`body[name]` read as vLLM reads it (None when absent or null), or a schema error if it cannot be."""
    value = body.get(name)
    if value is None:
        return None
    read, error, msg, string_error, string_msg = _KINDS[kind]
    result = read(value)
    if result is not _NOT_READ:
        return result
    if isinstance(value, str):
        error, msg = string_error, string_msg
    raise _schema_error(f"{at}.{name}", error, msg, value)


def _require(body: JSON, name: str) -> Any:
    if body.get(name) is None:
        raise _schema_error(f"body.{name}", "missing", "Field required", body)
    return body[name]


# --- per-request faults -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Fault:
    """The `fake_vllm` body field: an injected error, other pacing, a hang or a broken stream."""

    status: int | None = None
    message: str | None = None
    latency: float | None = None
    ttft: float | None = None
    tokens_per_second: float | None = None
    hang: bool = False
    fail_after_tokens: int | None = None

    @property
    def injects_error(self) -> bool:
        return self.status is not None or self.message is not None


_NO_FAULT = Fault()
_FAULT_FIELDS = frozenset(spec.name for spec in fields(Fault))
_FAULT_AT = "body.fake_vllm"


def _parse_fault(value: object) -> Fault:
    if value is None:
        return _NO_FAULT
    if not isinstance(value, dict):
        raise _schema_error(_FAULT_AT, "dict_type", "Input should be a valid dictionary", value)
    unknown = sorted(value.keys() - _FAULT_FIELDS)
    if unknown:
        # Fail loudly so a typo in a test's fault does not silently test nothing.
        raise _invalid("fake_vllm", f"Unknown fake_vllm fields: {', '.join(unknown)}.")
    status = _field(value, "status", "integer", at=_FAULT_AT)
    if status is not None and status not in ERROR_STATUSES:
        raise _invalid("fake_vllm.status", "status must be a 4xx or 5xx code.", status)
    fail_after = _field(value, "fail_after_tokens", "integer", at=_FAULT_AT)
    if fail_after is not None and fail_after < 0:
        raise _invalid("fake_vllm.fail_after_tokens", "must be non-negative.", fail_after)
    return Fault(
        status=status,
        message=_field(value, "message", "string", at=_FAULT_AT),
        latency=_seconds(value, "latency"),
        ttft=_seconds(value, "ttft"),
        tokens_per_second=_seconds(value, "tokens_per_second"),
        hang=bool(_field(value, "hang", "boolean", at=_FAULT_AT)),
        fail_after_tokens=fail_after,
    )


def _seconds(fault: JSON, name: str) -> float | None:
    value = _field(fault, name, "number", at=_FAULT_AT)
    if value is not None and value < 0:
        raise _invalid(f"fake_vllm.{name}", "must be non-negative.", value)
    return None if value is None else float(value)


@dataclass(frozen=True, slots=True)
class _Pace:
    latency: float
    ttft: float
    token_interval: float


def _pace(config: FakeServerConfig, fault: Fault) -> _Pace:
    def pick(override: float | None, default: float) -> float:
        return default if override is None else override

    rate = pick(fault.tokens_per_second, config.tokens_per_second)
    return _Pace(
        latency=pick(fault.latency, config.latency),
        ttft=pick(fault.ttft, config.ttft),
        token_interval=1 / rate if rate else 0.0,
    )


class _ErrorSchedule:
    """Fails an exact, evenly spread fraction of requests, deterministically (no randomness).

    Rate 1/4 fails the 4th, 8th, ... request; rate 2/5 fails the 3rd and 5th of every five.
    """

    def __init__(self, rate: float) -> None:
        fraction = Fraction(rate).limit_denominator(1000)
        self._numerator = fraction.numerator
        self._denominator = fraction.denominator
        self._count = 0

    def next_fails(self) -> bool:
        self._count += 1
        before = (self._count - 1) * self._numerator // self._denominator
        return self._count * self._numerator // self._denominator > before


# --- prompts and "generation" -----------------------------------------------------------------

# A chat template wraps each message in a few special tokens; count them like one would.
CHAT_TOKENS_PER_MESSAGE = 3
MIN_NATURAL_TOKENS = 8
MAX_NATURAL_TOKENS = 64
_NATURAL_SPAN = MAX_NATURAL_TOKENS - MIN_NATURAL_TOKENS + 1
_VOCAB = (
    *("the", "a", "of", "and", "to", "in", "model", "token", "gateway", "cluster"),
    *("node", "stream", "answer", "quick", "brown", "fox", "jumps", "over", "lazy"),
    *("dog", "compute", "endpoint", "research", "science", "data", "graph", "vector"),
    *("kernel", "batch", "queue", "tensor", "prompt", "river", "forest", "ocean"),
    *("signal", "energy", "matter", "photon", "lattice", "orbit", "comet", "galaxy"),
    *("planet", "system", "network", "packet", "routing", "cache", "memory", "thread"),
    *("socket", "engine", "sample", "result", "value", "limit", "window", "context"),
)
# Hash bytes map straight to words, so one C call draws a whole completion.
_WORD_FOR_BYTE = tuple(_VOCAB[byte % len(_VOCAB)] for byte in range(256))


@dataclass(frozen=True, slots=True)
class _Choice:
    index: int
    tokens: tuple[str, ...]
    finish_reason: str
    echo: str = ""  # the prompt, when a completion echoes it (it comes before the tokens)
    logprobs: JSON | None = None
    prompt_logprobs: list[JSON | None] | None = None  # completions with echo and logprobs
    # vLLM generates one token for a prompt it only scores (echo, max_tokens 0), drops it and counts it.
    unshown_tokens: int = 0

    @property
    def text(self) -> str:
        # Each token is " word", so the full text is exactly the concatenation of the chunks.
        return self.echo + "".join(f" {token}" for token in self.tokens)


@dataclass(frozen=True, slots=True)
class _Generation:
    chat: bool
    model: str
    prompt_tokens: int
    choices: tuple[_Choice, ...]
    stream: bool
    include_usage: bool
    continuous_usage: bool

    def usage(self) -> JSON:
        completion_tokens = sum(len(choice.tokens) + choice.unshown_tokens for choice in self.choices)
        return {
            "prompt_tokens": self.prompt_tokens,
            "total_tokens": self.prompt_tokens + completion_tokens,
            "completion_tokens": completion_tokens,
        }


@dataclass(frozen=True, slots=True)
class _Sampling:
    max_tokens: int | None
    min_tokens: int
    ignore_eos: bool
    n: int
    stream: bool
    include_usage: bool
    continuous_usage: bool
    echo: bool  # completions: the prompt before the completion (with max_tokens 0, only the prompt: scoring)
    logprobs: int | None  # alternatives per token (chat: top_logprobs, once logprobs is true); None: no logprobs


def _generate(seed: str, limit: int, sampling: _Sampling) -> tuple[tuple[str, ...], str]:
    """Words and finish reason of one choice: the seed's hash fixes the words and a natural length.

    vLLM's `min_tokens` and `ignore_eos` move the natural end, so tests can ask for long outputs.
    """
    # SHAKE's output is one stream: the first two bytes set the length, the next ones the words.
    draw = hashlib.shake_128(seed.encode())
    natural = MIN_NATURAL_TOKENS + int.from_bytes(draw.digest(2), "little") % _NATURAL_SPAN
    ends_at = max(natural, sampling.min_tokens)
    count, finish_reason = (limit, "length") if sampling.ignore_eos or ends_at > limit else (ends_at, "stop")
    return tuple(map(_WORD_FOR_BYTE.__getitem__, draw.digest(2 + count)[2:])), finish_reason


def _parse_sampling(body: JSON, config: FakeServerConfig, *, chat: bool) -> _Sampling:
    temperature = _field(body, "temperature", "number")
    if temperature is not None and temperature < 0:
        temperature = float(temperature)
        raise _invalid("temperature", f"temperature must be non-negative, got {temperature}.", temperature)
    top_p = _field(body, "top_p", "number")
    if top_p is not None and not 0 < top_p <= 1:
        raise _invalid("top_p", f"top_p must be in (0, 1], got {float(top_p)}.", float(top_p))
    echo = not chat and bool(_field(body, "echo", "boolean"))
    # vLLM reads the newer name first and reports either one as max_tokens.
    max_tokens = _field(body, "max_completion_tokens", "integer")
    if max_tokens is None:
        max_tokens = _field(body, "max_tokens", "integer")
    if max_tokens is not None and not (echo and max_tokens == 0):  # echo without generation scores a prompt
        _check_max_tokens(max_tokens, config.max_model_len)
    n = _field(body, "n", "integer")
    if n is not None and n < 1:
        raise _invalid(None, f"n must be at least 1, got {n}.")
    stream = bool(_field(body, "stream", "boolean"))
    include_usage, continuous_usage = _usage_options(body, stream=stream)
    # Chat's logprobs is a boolean, with top_logprobs alternatives; text completions' counts the alternatives.
    if chat:
        logprobs = (_field(body, "top_logprobs", "integer") or 0) if _field(body, "logprobs", "boolean") else None
    else:
        logprobs = _field(body, "logprobs", "integer")
    return _Sampling(
        max_tokens=max_tokens,
        min_tokens=_min_tokens(body, max_tokens),
        ignore_eos=bool(_field(body, "ignore_eos", "boolean")),
        n=n or 1,
        stream=stream,
        include_usage=include_usage,
        continuous_usage=continuous_usage,
        echo=echo,
        logprobs=logprobs,
    )


def _min_tokens(body: JSON, max_tokens: int | None) -> int:
    min_tokens = _field(body, "min_tokens", "integer") or 0
    if min_tokens < 0:
        message = f"min_tokens must be greater than or equal to 0, got {min_tokens}."
        raise _invalid("min_tokens", message, min_tokens)
    if max_tokens is not None and min_tokens > max_tokens:
        message = f"min_tokens must be less than or equal to max_tokens={max_tokens}, got {min_tokens}."
        raise _invalid("min_tokens", message, min_tokens)
    return int(min_tokens)


def _check_max_tokens(max_tokens: int, max_model_len: int) -> None:
    if max_tokens < 1:
        raise _invalid("max_tokens", f"max_tokens must be at least 1, got {max_tokens}.", max_tokens)
    if max_tokens > max_model_len:
        raise _invalid(
            "max_tokens",
            f"max_tokens={max_tokens} cannot be greater than max_model_len={max_model_len}. "
            "Please request fewer output tokens.",
            max_tokens,
        )


def _usage_options(body: JSON, *, stream: bool) -> tuple[bool, bool]:
    """vLLM's stream_options: include_usage (true once stream_options is given) and continuous_usage_stats."""
    options = _field(body, "stream_options", "object")
    if options is None:
        return False, False
    if not stream:
        raise _invalid("stream_options", "Stream options can only be defined when `stream=True`.")
    include = "include_usage" not in options or bool(
        _field(options, "include_usage", "boolean", at="body.stream_options")
    )
    continuous = bool(_field(options, "continuous_usage_stats", "boolean", at="body.stream_options"))
    return include, include and continuous


def _chat_prompt(body: JSON) -> tuple[str, int]:
    """Hash seed and token count of a conversation."""
    messages = _require(body, "messages")
    if not isinstance(messages, list):
        raise _schema_error("body.messages", "list_type", "Input should be a valid list", messages)
    parts = []
    tokens = 0
    for position, message in enumerate(messages):
        at = f"body.messages.{position}"
        if not isinstance(message, dict):
            raise _schema_error(at, "dict_type", "Input should be a valid dictionary", message)
        role = _field(message, "role", "string", at=at)
        if role is None:
            raise _schema_error(f"{at}.role", "missing", "Field required", message)
        text = _message_text(message.get("content"), at)
        parts.append(f"{role}: {text}")
        tokens += CHAT_TOKENS_PER_MESSAGE + len(text.split())
    return "\n".join(parts), tokens


def _message_text(content: object, at: str) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list) and all(isinstance(part, dict) for part in content):
        # Only text parts have words to count; image or audio parts are accepted and ignored.
        texts = [part.get("text") for part in content if part.get("type") == "text"]
        return " ".join(text for text in texts if isinstance(text, str))
    raise _schema_error(f"{at}.content", "string_type", "Input should be a valid string", content)


def _prompt_items(value: object, name: str) -> list[tuple[str, int]]:
    """(hash seed, token count) per prompt, for vLLM's shapes: text(s) or token-id list(s)."""
    if isinstance(value, str):
        return [(value, len(value.split()))]
    if isinstance(value, list) and value:
        if all(isinstance(item, str) for item in value):
            return [(item, len(item.split())) for item in value]
        if all(_is_int(item) for item in value):
            return [_token_ids_item(value)]
        if all(isinstance(item, list) and all(_is_int(t) for t in item) for item in value):
            return [_token_ids_item(item) for item in value]
    raise _schema_error(f"body.{name}", "string_type", "Input should be a valid string", value)


def _completion_prompts(body: JSON) -> list[tuple[str, int]]:
    prompt = body.get("prompt")
    if prompt in (None, "", []):
        raise _invalid("prompt", "Either prompt or prompt_embeds must be provided and non-empty.")
    return _prompt_items(prompt, "prompt")


def _token_ids_item(ids: list[int]) -> tuple[str, int]:
    return " ".join(map(str, ids)), len(ids)


def _check_prompt_fits(prompt_tokens: int, max_model_len: int) -> None:
    if prompt_tokens > max_model_len:
        # vLLM stops counting one token past the limit, so it always reports max_model_len + 1.
        over = max_model_len + 1
        raise _invalid(
            "input_tokens",
            f"This model's maximum context length is {max_model_len} tokens. However, your prompt "
            f"contains at least {over} input tokens, which exceeds this limit even without any "
            "output tokens. Please reduce the length of the input prompt.",
            over,
        )


def _completion_budget(prompt_tokens: int, sampling: _Sampling, config: FakeServerConfig, *, chat: bool) -> int:
    """Tokens this prompt may generate. Like vLLM, a too-large max_tokens is cut to what fits."""
    _check_prompt_fits(prompt_tokens, config.max_model_len)
    room = config.max_model_len - prompt_tokens
    if sampling.max_tokens is not None:
        budget = min(sampling.max_tokens, room)
    else:
        budget = room if chat else min(config.default_max_tokens, room)
    if budget < 1 and not (sampling.echo and sampling.max_tokens == 0):
        raise _invalid("max_tokens", f"max_tokens must be at least 1, got {budget}.", budget)
    return budget


def _text_logprobs(echo: str, tokens: tuple[str, ...]) -> JSON:
    """vLLM's text-completion logprobs of the echoed prompt's words and the generated tokens; a fixed made-up
    value per position (the first prompt token has none: nothing comes before it)."""
    pieces = (
        [
            *(f" {word}" if position else word for position, word in enumerate(echo.split(" "))),
            *(f" {token}" for token in tokens),
        ]
        if echo
        else [f" {token}" for token in tokens]
    )
    logprobs: list[float | None] = [-1.0 - (position % 7) / 8 for position in range(len(pieces))]
    if echo:
        logprobs[0] = None
    offsets, at = [], 0
    for piece in pieces:
        offsets.append(at)
        at += len(piece)
    return {
        "text_offset": offsets,
        "token_logprobs": logprobs,
        "tokens": pieces,
        "top_logprobs": [
            None if value is None else {piece: value} for piece, value in zip(pieces, logprobs, strict=True)
        ],
    }


def _chat_logprobs(tokens: tuple[str, ...], alternatives: int) -> JSON:
    """vLLM's chat logprobs of the generated tokens: each token (the same made-up values as _text_logprobs),
    its UTF-8 bytes, and `alternatives` top tokens, the chosen one first."""
    return {
        "content": [_chat_token_logprob(f" {token}", position, alternatives) for position, token in enumerate(tokens)]
    }


def _chat_token_logprob(piece: str, position: int, alternatives: int) -> JSON:
    value = -1.0 - (position % 7) / 8
    word = piece.strip()
    others = [f" {other}" for other in _VOCAB if other != word][: max(alternatives - 1, 0)]
    top = [(piece, value), *((other, value - 1 - rank / 4) for rank, other in enumerate(others))][:alternatives]
    return {
        "token": piece,
        "logprob": value,
        "bytes": list(piece.encode()),
        "top_logprobs": [{"token": text, "logprob": logprob, "bytes": list(text.encode())} for text, logprob in top],
    }


def _prompt_logprobs(logprobs: JSON) -> list[JSON | None]:
    """vLLM's `prompt_logprobs` of an echoed prompt (with logprobs): none for the first token, then each prompt
    token's logprob, rank and text by token id, as the echoed part of the text logprobs has them."""
    entries: list[JSON | None] = []
    for piece, value in zip(logprobs["tokens"], logprobs["token_logprobs"], strict=False):
        if value is None:
            entries.append(None)
            continue
        entries.append({str(_token_id(piece.strip())): {"logprob": value, "rank": 1, "decoded_token": piece}})
    return entries


def _generation(
    *,
    chat: bool,
    model: str,
    prompts: list[tuple[str, int]],
    sampling: _Sampling,
    config: FakeServerConfig,
) -> _Generation:
    choices: list[_Choice] = []
    for seed, prompt_tokens in prompts:
        budget = _completion_budget(prompt_tokens, sampling, config, chat=chat)
        echo = seed if sampling.echo else ""
        for sample in range(sampling.n):
            tokens, finish_reason = _generate(f"{sample}:{seed}", budget, sampling) if budget else ((), "length")
            logprobs = prompt_logprobs = None
            if sampling.logprobs is not None and chat:
                logprobs = _chat_logprobs(tokens, sampling.logprobs)
            elif sampling.logprobs is not None:
                logprobs = _text_logprobs(echo, tokens)
                if echo:
                    prompt_logprobs = _prompt_logprobs(logprobs)[: len(echo.split(" "))]
            choices.append(
                _Choice(
                    len(choices),
                    tokens,
                    finish_reason,
                    echo,
                    logprobs,
                    prompt_logprobs,
                    unshown_tokens=0 if budget else 1,
                )
            )
    return _Generation(
        chat=chat,
        model=model,
        prompt_tokens=sum(tokens for _, tokens in prompts),
        choices=tuple(choices),
        stream=sampling.stream,
        include_usage=sampling.include_usage,
        continuous_usage=sampling.continuous_usage,
    )


def _new_id(prefix: str) -> str:
    return prefix + os.urandom(8).hex()  # 16 hex digits, like vLLM


# vLLM's response models always carry these fields, mostly null; a proxy should cope with them.
_CHAT_MESSAGE_EXTRAS = dict.fromkeys(("refusal", "annotations", "audio", "function_call", "reasoning"))
_CHOICE_EXTRAS: JSON = {"stop_reason": None, "token_ids": None}
_TEXT_CHOICE_EXTRAS: JSON = {
    **_CHOICE_EXTRAS,
    "prompt_logprobs": None,
    "prompt_token_ids": None,
}
_USAGE_DETAILS = dict.fromkeys(("prompt_tokens_details", "completion_tokens_details"))
_TRANSFER_EXTRAS = dict.fromkeys(("kv_transfer_params", "ec_transfer_params", "metrics"))
_CHAT_RESPONSE_EXTRAS: JSON = {
    **dict.fromkeys(("prompt_logprobs", "prompt_token_ids", "prompt_text")),
    **_TRANSFER_EXTRAS,
}


def _completion_body(generation: _Generation) -> bytes:
    if generation.chat:
        prefix, kind, extras = "chatcmpl-", "chat.completion", _CHAT_RESPONSE_EXTRAS
        choices = [
            {
                "index": choice.index,
                "message": {"role": "assistant", "content": choice.text, **_CHAT_MESSAGE_EXTRAS},
                "logprobs": choice.logprobs,
                "finish_reason": choice.finish_reason,
                **_CHOICE_EXTRAS,
                "routed_experts": None,
            }
            for choice in generation.choices
        ]
    else:
        prefix, kind, extras = "cmpl-", "text_completion", _TRANSFER_EXTRAS
        choices = [
            {
                "index": choice.index,
                "text": choice.text,
                "logprobs": choice.logprobs,
                "finish_reason": choice.finish_reason,
                **_TEXT_CHOICE_EXTRAS,
                "prompt_logprobs": choice.prompt_logprobs,
                "routed_experts": None,
            }
            for choice in generation.choices
        ]
    return orjson.dumps(
        {
            "id": _new_id(prefix),
            "object": kind,
            "created": int(time.time()),
            "model": generation.model,
            "choices": choices,
            "service_tier": None,
            "system_fingerprint": SYSTEM_FINGERPRINT,
            "usage": {**generation.usage(), **_USAGE_DETAILS},
            **extras,
        }
    )


# --- streaming --------------------------------------------------------------------------------

_DONE_EVENT = b"data: [DONE]\n\n"


@dataclass(frozen=True, slots=True)
class _StreamPlan:
    """All SSE events of one stream, grouped by when they are due."""

    head: list[bytes]  # chat role chunks, sent with the first token
    steps: list[list[bytes]]  # per token position: one event per choice still generating
    tail: list[bytes]  # the usage chunk when asked for, then [DONE]


def _sse(payload: JSON) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def _stream_plan(generation: _Generation) -> _StreamPlan:
    chat = generation.chat
    prefix, kind = ("chatcmpl-", "chat.completion.chunk") if chat else ("cmpl-", "text_completion")
    base = {
        "id": _new_id(prefix),
        "object": kind,
        "created": int(time.time()),
        "model": generation.model,
    }
    head = []
    if chat:
        role = {"role": "assistant", "content": ""}
        head = [
            _sse(
                {
                    **base,
                    "choices": [{"index": c.index, "delta": role, "logprobs": None, "finish_reason": None}],
                    "prompt_token_ids": None,
                    "prompt_text": None,
                }
            )
            for c in generation.choices
        ]
    # vLLM puts the fingerprint on the last chunk: the usage chunk if there is one, else each finishing chunk.
    fingerprint = {} if generation.include_usage else {"system_fingerprint": SYSTEM_FINGERPRINT}

    def usage_so_far(completion_tokens: int) -> JSON:
        # continuous_usage_stats: each chunk counts its own choice's tokens so far.
        if not generation.continuous_usage:
            return {}
        prompt = generation.prompt_tokens
        return {
            "usage": {
                "prompt_tokens": prompt,
                "total_tokens": prompt + completion_tokens,
                "completion_tokens": completion_tokens,
                "completion_tokens_details": None,  # on each chunk's usage, not on the final usage chunk's
            }
        }

    if chat:
        head = [_sse({**orjson.loads(event[6:]), **usage_so_far(0)}) for event in head]

    def token_event(choice: _Choice, position: int) -> bytes:
        last = position == _positions(choice) - 1
        chunk = {
            **base,
            "choices": [_token_choice(choice, position, chat=chat)],
            **usage_so_far(min(position + 1, len(choice.tokens))),
        }
        return _sse({**chunk, **(fingerprint if last else {})})

    longest = max(_positions(choice) for choice in generation.choices)
    steps = [
        [token_event(choice, position) for choice in generation.choices if position < _positions(choice)]
        for position in range(longest)
    ]
    tail = [_DONE_EVENT]
    if generation.include_usage:
        final = {"choices": [], "usage": generation.usage(), "system_fingerprint": SYSTEM_FINGERPRINT}
        tail = [_sse({**base, **final}), _DONE_EVENT]
    return _StreamPlan(head=head, steps=steps, tail=tail)


def _positions(choice: _Choice) -> int:
    """How many chunks a choice streams: one per token, or one for an echoed prompt alone (max_tokens 0)."""
    return max(len(choice.tokens), 1)


def _token_choice(choice: _Choice, position: int, *, chat: bool) -> JSON:
    token = f" {choice.tokens[position]}" if position < len(choice.tokens) else ""
    text = choice.echo + token if position == 0 else token
    finish_reason = choice.finish_reason if position == _positions(choice) - 1 else None
    if not chat:
        # The first chunk of an echo carries the prompt's pieces and token ids too.
        prompt_pieces = len(choice.echo.split(" ")) if choice.echo else 0
        start, end = (
            (0, prompt_pieces + 1) if position == 0 else (prompt_pieces + position, prompt_pieces + position + 1)
        )
        logprobs = (
            None if choice.logprobs is None else {key: items[start:end] for key, items in choice.logprobs.items()}
        )
        prompt_ids = [_token_id(word) for word in choice.echo.split(" ")] if choice.echo and position == 0 else None
        return {
            "index": choice.index,
            "text": text,
            "logprobs": logprobs,
            "finish_reason": finish_reason,
            "stop_reason": None,
            "prompt_token_ids": prompt_ids,
            "token_ids": None,
        }
    # Chat chunks name stop_reason only on the finishing chunk.
    stop = {"stop_reason": None} if finish_reason else {}
    logprobs = None if choice.logprobs is None else {"content": [choice.logprobs["content"][position]]}
    return {
        "index": choice.index,
        "delta": {"content": text},
        "logprobs": logprobs,
        "finish_reason": finish_reason,
        **stop,
        "token_ids": None,
    }


async def _send_events(send: Send, events: list[bytes]) -> None:
    # One ASGI message per event so each reaches the client as soon as it exists.
    for event in events:
        await send({"type": "http.response.body", "body": event, "more_body": True})


async def _play(send: Send, plan: _StreamPlan, pace: _Pace, fail_after_tokens: int | None) -> StreamOutcome:
    try:
        if pace.ttft:
            await asyncio.sleep(pace.ttft)
        await _send_events(send, plan.head)
        for position, events in enumerate(plan.steps):
            if position == fail_after_tokens:
                return "aborted"
            if position and pace.token_interval:
                await asyncio.sleep(pace.token_interval)
            await _send_events(send, events)
        await _send_events(send, plan.tail)
        await send({"type": "http.response.body", "body": b"", "more_body": False})
    except OSError:
        # Servers other than uvicorn report a vanished client by failing the send.
        return "disconnected"
    return "completed"


async def _until_disconnect(receive: Receive, work: Coroutine[Any, Any, StreamOutcome]) -> StreamOutcome:
    """Run `work`, cancelling it as soon as the client goes away.

    uvicorn drops data sent to a closed connection without an error, so only the ASGI
    `http.disconnect` message tells us to stop generating.
    """
    worker = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(asgi.wait_disconnect(receive))
    try:
        await asyncio.wait((worker, watcher), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        worker.cancel()  # a no-op when it has finished
    return worker.result() if worker.done() else "disconnected"


# --- embeddings -------------------------------------------------------------------------------


def _embedding_vector(seed: str, dim: int) -> bytes:
    """A deterministic unit vector as little-endian float32, the form both encodings come from."""
    raw = struct.unpack(f"<{dim}H", hashlib.shake_128(seed.encode()).digest(2 * dim))
    centred = [value - 32767.5 for value in raw]
    norm = math.sqrt(math.fsum(value * value for value in centred))  # >= 0.5: never zero
    return struct.pack(f"<{dim}f", *(value / norm for value in centred))


def _encode_embedding(vector: bytes, encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":
        return base64.b64encode(vector).decode("ascii")
    return list(struct.unpack(f"<{len(vector) // 4}f", vector))


# --- HTTP plumbing ----------------------------------------------------------------------------

_SSE_HEADERS: list[Header] = [(b"content-type", b"text/event-stream; charset=utf-8")]  # vLLM sends no others
# vLLM's --api-key check answers with this bare body, not the usual error envelope.
_UNAUTHORIZED = orjson.dumps({"error": "Unauthorized"})
_VERSION = orjson.dumps({"version": VLLM_VERSION})
_STATS_PATH = "/fake/stats"


async def _send_json(send: Send, status: int, body: bytes, *headers: Header) -> None:
    await asgi.send_response(send, status, body, (asgi.JSON_TYPE, *headers))


def _check_json_content_type(scope: Scope) -> None:
    for name, value in scope["headers"]:
        if name == b"content-type":
            if value.split(b";", 1)[0].strip().lower() == b"application/json":
                return
            break
    raise ApiError(
        HTTPStatus.BAD_REQUEST,
        "1 validation error:\n  Unsupported Media Type: Only 'application/json' is allowed",
        error_type="Bad Request",
    )


def _parse_json(raw: bytes) -> JSON:
    if not raw:
        raise _schema_error("body", "missing", "Field required", None)
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as error:
        position, reason = _json_error_detail(raw, error)
        raise _schema_error(f"body.{position}", "json_invalid", "JSON decode error", {}, error=reason) from None
    if not isinstance(body, dict):
        raise _schema_error(
            "body",
            "model_attributes_type",
            "Input should be a valid dictionary or object to extract fields from",
            body,
        )
    return body


def _json_error_detail(raw: bytes, error: orjson.JSONDecodeError) -> tuple[int, str]:
    # vLLM (FastAPI) quotes the standard library parser; ask it on this rare path only.
    try:
        json.loads(raw)
    except json.JSONDecodeError as stdlib_error:
        return stdlib_error.pos, stdlib_error.msg
    except ValueError:  # not UTF-8
        pass
    return error.pos, error.msg


def _bearer_matches(scope: Scope, token: bytes) -> bool:
    for name, value in scope["headers"]:
        if name == b"authorization":
            scheme, _, credential = value.partition(b" ")
            return scheme.lower() == b"bearer" and hmac.compare_digest(credential, token)
    return False


def _models_body(config: FakeServerConfig) -> bytes:
    created = int(time.time())
    permission = {
        "id": _new_id("modelperm-"),
        "object": "model_permission",
        "created": created,
        "allow_create_engine": False,
        "allow_sampling": True,
        "allow_logprobs": True,
        "allow_search_indices": False,
        "allow_view": True,
        "allow_fine_tuning": False,
        "organization": "*",
        "group": None,
        "is_blocking": False,
    }
    models = [
        {
            "id": name,
            "object": "model",
            "created": created,
            "owned_by": "vllm",
            "root": name,
            "parent": None,
            "max_model_len": config.max_model_len,
            "permission": [permission],
        }
        for name in config.models
    ]
    return orjson.dumps({"object": "list", "data": models})


@dataclass(slots=True)
class FakeStats:
    """Counters served at /fake/stats so tests can see what reached the model server."""

    requests: Counter[str] = field(default_factory=Counter)
    streams_started: int = 0
    streams_completed: int = 0
    streams_disconnected: int = 0  # the client went away mid-stream
    streams_aborted: int = 0  # cut by fake_vllm.fail_after_tokens
    active_streams: int = 0
    last_request: JSON | None = None


@dataclass(frozen=True, slots=True)
class _Admitted:
    body: JSON
    fault: Fault
    pace: _Pace


class FakeModelServer(asgi.App):
    """The ASGI app. Build it with `create_app`; one instance keeps its counters in `stats`."""

    def __init__(self, config: FakeServerConfig) -> None:
        self.config = config
        self.stats = FakeStats()
        self._models = frozenset(config.models)
        self._models_json = _models_body(config)
        self._token = config.api_key.encode() if config.api_key else None
        self._errors = _ErrorSchedule(config.error_rate)
        self._routes: dict[str, dict[str, Handler]] = {
            "/health": {"GET": self._health},
            "/version": {"GET": self._version},
            "/v1/models": {"GET": self._list_models},
            "/v1/chat/completions": {"POST": self._chat_completions},
            "/v1/completions": {"POST": self._completions},
            "/v1/embeddings": {"POST": self._embeddings},
            "/v1/responses": {"POST": self._responses},
            "/v1/messages": {"POST": self._messages},
            "/v1/messages/count_tokens": {"POST": self._count_tokens},
            "/tokenize": {"POST": self._tokenize},
            "/detokenize": {"POST": self._detokenize},
            "/v1/score": {"POST": self._score},
            "/v1/rerank": {"POST": self._rerank},
            "/pooling": {"POST": self._pooling},
            "/classify": {"POST": self._classify},
            "/v1/audio/transcriptions": {"POST": self._transcriptions},
            "/v1/audio/translations": {"POST": self._translations},
            _STATS_PATH: {"GET": self._stats},
        }
        # vLLM registers only the routes of its model's kind: the others answer FastAPI's 404 "Not Found".
        unserved = {"generate": _POOLING_ONLY, "pooling": _GENERATE_ONLY}.get(config.runner, frozenset())
        for path in unserved:
            del self._routes[path]

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        method: str = scope["method"]
        if not self._authorized(scope, path, method):
            await _send_json(send, HTTPStatus.UNAUTHORIZED, _UNAUTHORIZED)
            return
        methods = self._routes.get(path)
        if methods is None:
            await _send_json(send, HTTPStatus.NOT_FOUND, asgi.NOT_FOUND)
            return
        handler = methods.get(method)
        if handler is None:
            await _send_json(send, HTTPStatus.METHOD_NOT_ALLOWED, asgi.METHOD_NOT_ALLOWED, asgi.allow_header(methods))
            return
        if path != _STATS_PATH:
            self.stats.requests[path] += 1
        try:
            await handler(scope, receive, send)
        except ApiError as error:
            await _send_json(send, error.status, error.body())

    def _authorized(self, scope: Scope, path: str, method: str) -> bool:
        # Like vLLM's middleware: only /v1 routes are guarded, before routing, OPTIONS exempt.
        if self._token is None or not path.startswith("/v1") or method == "OPTIONS":
            return True
        return _bearer_matches(scope, self._token)

    async def _health(self, scope: Scope, receive: Receive, send: Send) -> None:
        await asgi.send_response(send, HTTPStatus.OK, b"")

    async def _version(self, scope: Scope, receive: Receive, send: Send) -> None:
        await _send_json(send, HTTPStatus.OK, _VERSION)

    async def _list_models(self, scope: Scope, receive: Receive, send: Send) -> None:
        await _send_json(send, HTTPStatus.OK, self._models_json)

    async def _stats(self, scope: Scope, receive: Receive, send: Send) -> None:
        await _send_json(send, HTTPStatus.OK, orjson.dumps(self.stats))

    async def _chat_completions(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._generate(scope, receive, send, chat=True)

    async def _completions(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._generate(scope, receive, send, chat=False)

    async def _generate(self, scope: Scope, receive: Receive, send: Send, *, chat: bool) -> None:
        request = await self._admit(scope, receive)
        if request is None:
            return
        sampling = _parse_sampling(request.body, self.config, chat=chat)
        prompts = [_chat_prompt(request.body)] if chat else _completion_prompts(request.body)
        generation = _generation(
            chat=chat,
            model=self._model(request.body),
            prompts=prompts,
            sampling=sampling,
            config=self.config,
        )
        await self._answer(generation, request, receive, send)

    async def _embeddings(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = await self._admit(scope, receive)
        if request is None:
            return
        body = self._embedding_body(request.body)
        await _sleep(request.pace.latency)
        await _send_json(send, HTTPStatus.OK, body)

    async def _responses(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = await self._admit(scope, receive)
        if request is None:
            return
        body = request.body
        max_tokens = _field(body, "max_output_tokens", "integer")
        if max_tokens is not None:
            _check_max_tokens(max_tokens, self.config.max_model_len)
        sampling = _single_sampling(max_tokens, stream=bool(_field(body, "stream", "boolean")))
        generation = _generation(
            chat=True,
            model=self._model(body),
            prompts=[_responses_prompt(body)],
            sampling=sampling,
            config=self.config,
        )
        settings = _response_settings(body, max_tokens)
        shape = (partial(_response_body, settings=settings), partial(_response_stream_plan, settings=settings))
        await self._answer(generation, request, receive, send, shape)

    async def _messages(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            request = await self._admit(scope, receive)
            if request is None:
                return
            body = request.body
            max_tokens = _field(body, "max_tokens", "integer")
            if max_tokens is None:
                raise _schema_error("body.max_tokens", "missing", "Field required", body)
            _check_max_tokens(max_tokens, self.config.max_model_len)
            sampling = _single_sampling(max_tokens, stream=bool(_field(body, "stream", "boolean")))
            generation = _generation(
                chat=True,
                model=self._model(body),
                prompts=[_messages_prompt(body)],
                sampling=sampling,
                config=self.config,
            )
        except ApiError as error:
            if error.error_type == _SCHEMA_ERROR_TYPE:
                raise  # FastAPI's validation answer, before vLLM's Anthropic handler runs
            await _send_json(send, error.status, _anthropic_error(error))
            return
        await self._answer(generation, request, receive, send, (_message_body, _message_stream_plan))

    async def _count_tokens(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = await self._admit(scope, receive)
        if request is None:
            return
        try:
            self._model(request.body)
            _, tokens = _messages_prompt(request.body)
        except ApiError as error:
            if error.error_type == _SCHEMA_ERROR_TYPE:
                raise
            await _send_json(send, error.status, _anthropic_error(error))
            return
        counted = {"input_tokens": tokens, "context_management": {"original_input_tokens": tokens}}
        await _send_json(send, HTTPStatus.OK, orjson.dumps(counted))

    async def _tokenize(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._pooling_answer(scope, receive, send, self._tokens_body)

    async def _detokenize(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._pooling_answer(scope, receive, send, self._detokenized_body)

    async def _score(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._pooling_answer(scope, receive, send, self._score_body)

    async def _rerank(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._pooling_answer(scope, receive, send, self._rerank_body)

    async def _pooling(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._pooling_answer(scope, receive, send, self._pooled_body)

    async def _classify(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._pooling_answer(scope, receive, send, self._classified_body)

    async def _transcriptions(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._speech_to_text(scope, receive, send, task="transcribe")

    async def _translations(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._speech_to_text(scope, receive, send, task="translate")

    async def _speech_to_text(self, scope: Scope, receive: Receive, send: Send, *, task: str) -> None:
        """vLLM's speech-to-text routes, in the order vLLM checks a request: the form, the model, the response
        format, then the audio itself."""
        form = _read_form(scope, await asgi.read_body(receive))
        self.stats.last_request = {**form.fields, "files": {name: len(data) for name, data in form.files.items()}}
        admitted = await self._faulted(form.fields, _form_fault(form), receive)
        if admitted is None:
            return
        request = _speech_request(form)
        model = self._model(form.fields)
        if request.response_format not in ("text", "json", "verbose_json"):
            raise _invalid(None, "Currently only support response_format: `text`, `json` or `verbose_json`")
        if request.response_format == "verbose_json" and request.stream:
            raise _invalid(None, "verbose_json format doesn't support streaming case")
        duration = _audio_duration(request.audio)
        seed = f"{task}:{request.language}:{request.prompt}:{hashlib.sha256(request.audio).hexdigest()}"
        limit = request.max_completion_tokens or MAX_NATURAL_TOKENS
        sampling = _single_sampling(limit, stream=request.stream)
        tokens, finish_reason = _generate(seed, limit, sampling)
        generation = _Generation(
            chat=False,
            model=model,
            prompt_tokens=_SPEECH_PROMPT_TOKENS + len(request.prompt.split()),
            choices=(_Choice(0, tokens, finish_reason),),
            stream=request.stream,
            include_usage=request.include_usage,
            continuous_usage=request.include_usage and request.continuous_usage,
        )
        speech = _Speech(task, request, duration)
        shape = (speech.body, speech.stream_plan)
        await self._answer(generation, admitted, receive, send, shape)

    async def _pooling_answer(self, scope: Scope, receive: Receive, send: Send, answer: Callable[[JSON], JSON]) -> None:
        """A non-generating route: read and check the request, answer its JSON after the pace's latency."""
        request = await self._admit(scope, receive)
        if request is None:
            return
        body = answer(request.body)
        await _sleep(request.pace.latency)
        await _send_json(send, HTTPStatus.OK, orjson.dumps(body))

    def _tokens_body(self, body: JSON) -> JSON:
        self._model(body, generating=False)
        if body.get("messages") is not None:
            seed, _ = _chat_prompt(body)
            words = seed.split()
        else:
            prompt = _require(body, "prompt")
            if not isinstance(prompt, str):
                raise _schema_error("body.prompt", "string_type", "Input should be a valid string", prompt)
            words = prompt.split()
        ids = [_token_id(word) for word in words]
        return {"count": len(ids), "max_model_len": self.config.max_model_len, "tokens": ids, "token_strs": None}

    def _detokenized_body(self, body: JSON) -> JSON:
        self._model(body, generating=False)
        ids = _require(body, "tokens")
        if not isinstance(ids, list) or not all(_is_int(item) for item in ids):
            raise _schema_error("body.tokens", "list_type", "Input should be a valid list", ids)
        return {"prompt": " ".join(_VOCAB[item % len(_VOCAB)] for item in ids)}

    def _score_body(self, body: JSON) -> JSON:
        model = self._model(body, generating=False)
        firsts = _prompt_items(_require(body, "text_1"), "text_1")
        seconds = _prompt_items(_require(body, "text_2"), "text_2")
        if len(firsts) == 1:
            firsts = firsts * len(seconds)
        if len(firsts) != len(seconds):
            raise _invalid(None, "At least one of text_1 or text_2 must be a string, or both lists of one length.")
        pairs = list(zip(firsts, seconds, strict=True))
        data = [
            {"index": index, "object": "score", "score": _unit_score(a[0] + "\n" + b[0])}
            for index, (a, b) in enumerate(pairs)
        ]
        return self._pooled_list("score-", model, data, sum(a[1] + b[1] for a, b in pairs))

    def _rerank_body(self, body: JSON) -> JSON:
        model = self._model(body, generating=False)
        query, query_tokens = _prompt_items(_require(body, "query"), "query")[0]
        documents = _prompt_items(_require(body, "documents"), "documents")
        top_n = _field(body, "top_n", "integer") or len(documents)
        scored = sorted(
            ((_unit_score(query + "\n" + text), index, text) for index, (text, _) in enumerate(documents)),
            reverse=True,
        )
        results = [
            {"index": index, "document": {"text": text, "multi_modal": None}, "relevance_score": score}
            for score, index, text in scored[:top_n]
        ]
        tokens = sum(query_tokens + document_tokens for _, document_tokens in documents)
        return {
            "id": _new_id("score-"),  # vLLM answers rerank with its score machinery, and names it so
            "model": model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            "results": results,
        }

    def _pooled_body(self, body: JSON) -> JSON:
        model = self._model(body, generating=False)
        items = _prompt_items(_require(body, "input"), "input")
        dim = self.config.embedding_dim
        data = [
            {"index": index, "object": "pooling", "data": _encode_embedding(_embedding_vector(seed, dim), "float")}
            for index, (seed, _) in enumerate(items)
        ]
        return self._pooled_list("pool-", model, data, sum(tokens for _, tokens in items))

    def _classified_body(self, body: JSON) -> JSON:
        model = self._model(body, generating=False)
        items = _prompt_items(_require(body, "input"), "input")
        data = []
        for index, (seed, _) in enumerate(items):
            positive = _unit_score(seed)
            label = "LABEL_1" if positive >= 0.5 else "LABEL_0"
            data.append({"index": index, "label": label, "probs": [1 - positive, positive], "num_classes": 2})
        return self._pooled_list("classify-", model, data, sum(tokens for _, tokens in items))

    def _pooled_list(self, prefix: str, model: str, data: list[JSON], prompt_tokens: int) -> JSON:
        usage = {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens, "completion_tokens": 0}
        return {
            "id": _new_id(prefix),
            "object": "list",
            "created": int(time.time()),
            "model": model,
            "data": data,
            "usage": {**usage, **_USAGE_DETAILS},
        }

    async def _admit(self, scope: Scope, receive: Receive) -> _Admitted | None:
        """Read an inference request and apply faults; None once it hung until the client left."""
        _check_json_content_type(scope)
        body = _parse_json(await asgi.read_body(receive))
        self.stats.last_request = body
        return await self._faulted(body, _parse_fault(body.get("fake_vllm")), receive)

    async def _faulted(self, body: JSON, fault: Fault, receive: Receive) -> _Admitted | None:
        """Apply a request's faults (and the server's error rate); None once it hung until the client left."""
        pace = _pace(self.config, fault)
        scheduled_error = self._errors.next_fails()
        if fault.hang:
            await asgi.wait_disconnect(receive)
            return None
        if fault.injects_error or scheduled_error:
            await _sleep(pace.latency)
            status = fault.status or self.config.error_status
            raise ApiError(status, fault.message or self.config.error_message)
        return _Admitted(body=body, fault=fault, pace=pace)

    def _model(self, body: JSON, *, generating: bool = True) -> str:
        model = _field(body, "model", "string")
        if model is None:
            return self.config.models[0]  # vLLM serves its first name when none is given
        if model in self._models:
            return str(model)
        message = f"The model `{model}` does not exist."
        if not generating:  # vLLM's pooling (embeddings) server words it more tersely
            raise ApiError(HTTPStatus.NOT_FOUND, message)
        aliases = ", ".join(self.config.models)
        raise ApiError(HTTPStatus.NOT_FOUND, f"{message} Valid aliases: {aliases}.", param="model")

    async def _answer(
        self,
        generation: _Generation,
        request: _Admitted,
        receive: Receive,
        send: Send,
        shape: _AnswerShape | None = None,
    ) -> None:
        body, stream_plan = shape or (_completion_body, _stream_plan)
        if not generation.stream:
            await _sleep(request.pace.latency)
            await _send_json(send, HTTPStatus.OK, body(generation))
            return
        plan = stream_plan(generation)
        start = {"type": "http.response.start", "status": HTTPStatus.OK, "headers": _SSE_HEADERS}
        await send(start)
        stats = self.stats
        stats.streams_started += 1
        stats.active_streams += 1
        try:
            work = _play(send, plan, request.pace, request.fault.fail_after_tokens)
            outcome = await _until_disconnect(receive, work)
        finally:
            stats.active_streams -= 1
        if outcome == "completed":
            stats.streams_completed += 1
        elif outcome == "aborted":
            # Returning without the final body message makes uvicorn drop the connection.
            stats.streams_aborted += 1
        else:
            stats.streams_disconnected += 1

    def _embedding_body(self, body: JSON) -> bytes:
        items = _prompt_items(_require(body, "input"), "input")
        encoding_format = _field(body, "encoding_format", "string") or "float"
        if encoding_format not in ("float", "base64"):
            raise _invalid(
                "encoding_format",
                "encoding_format must be 'float' or 'base64'.",
                encoding_format,
            )
        model = self._model(body, generating=False)
        for _, tokens in items:
            _check_prompt_fits(tokens, self.config.max_model_len)
        dim = self.config.embedding_dim
        data = [
            {
                "index": index,
                "object": "embedding",
                "embedding": _encode_embedding(_embedding_vector(seed, dim), encoding_format),
            }
            for index, (seed, _) in enumerate(items)
        ]
        prompt_tokens = sum(tokens for _, tokens in items)
        usage = {
            "prompt_tokens": prompt_tokens,
            "total_tokens": prompt_tokens,
            "completion_tokens": 0,
            **_USAGE_DETAILS,
        }
        return orjson.dumps(
            {
                "id": _new_id("embd-"),
                "object": "list",
                "created": int(time.time()),
                "model": model,
                "data": data,
                "usage": usage,
            }
        )


# --- the Responses API and the Anthropic Messages API -------------------------------------------
# vLLM serves both by converting them to a chat completion; the fake does the same with its generator.

_AnswerShape = tuple[Callable[[_Generation], bytes], Callable[[_Generation], _StreamPlan]]
_STOP_REASONS = {"stop": "end_turn", "length": "max_tokens"}


def _single_sampling(max_tokens: int | None, *, stream: bool) -> _Sampling:
    """One choice, no usage chunk: these APIs have neither `n` nor `stream_options`."""
    return _Sampling(
        max_tokens=max_tokens,
        min_tokens=0,
        ignore_eos=False,
        n=1,
        stream=stream,
        include_usage=False,
        continuous_usage=False,
        echo=False,
        logprobs=None,
    )


def _conversation(messages: list[tuple[str, str]]) -> tuple[str, int]:
    seed = "\n".join(f"{role}: {text}" for role, text in messages)
    return seed, sum(CHAT_TOKENS_PER_MESSAGE + len(text.split()) for _, text in messages)


def _parts_text(content: object, at: str) -> str:
    """The text of a message's content: a string, or parts whose `text` counts (input_text, text...)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(part, dict) for part in content):
        return " ".join(part["text"] for part in content if isinstance(part.get("text"), str))
    raise _schema_error(f"{at}.content", "string_type", "Input should be a valid string", content)


def _responses_prompt(body: JSON) -> tuple[str, int]:
    messages: list[tuple[str, str]] = []
    instructions = _field(body, "instructions", "string")
    if instructions:
        messages.append(("system", instructions))
    items = _require(body, "input")
    if isinstance(items, str):
        messages.append(("user", items))
    elif isinstance(items, list):
        for position, item in enumerate(items):
            at = f"body.input.{position}"
            if not isinstance(item, dict):
                raise _schema_error(at, "dict_type", "Input should be a valid dictionary", item)
            role = _field(item, "role", "string", at=at) or "user"
            messages.append((role, _parts_text(item.get("content", ""), at)))
    else:
        raise _schema_error("body.input", "string_type", "Input should be a valid string", items)
    return _conversation(messages)


def _messages_prompt(body: JSON) -> tuple[str, int]:
    messages: list[tuple[str, str]] = []
    system = body.get("system")
    if system:
        messages.append(("system", _parts_text(system, "body.system")))
    items = _require(body, "messages")
    if not isinstance(items, list):
        raise _schema_error("body.messages", "list_type", "Input should be a valid list", items)
    for position, item in enumerate(items):
        at = f"body.messages.{position}"
        if not isinstance(item, dict):
            raise _schema_error(at, "dict_type", "Input should be a valid dictionary", item)
        role = _field(item, "role", "string", at=at)
        if role is None:
            raise _schema_error(f"{at}.role", "missing", "Field required", item)
        messages.append((role, _parts_text(item.get("content", ""), at)))
    return _conversation(messages)


def _anthropic_error(error: ApiError) -> bytes:
    """vLLM's Anthropic routes translate its error envelope to Anthropic's."""
    return orjson.dumps({"type": "error", "error": {"type": error.error_type, "message": error.message}})


def _response_usage(generation: _Generation) -> JSON:
    usage = generation.usage()
    return {
        "input_tokens": usage["prompt_tokens"],
        "input_tokens_details": {
            "cached_tokens": 0,
            "cache_write_tokens": 0,
            "input_tokens_per_turn": [],
            "cached_tokens_per_turn": [],
        },
        "output_tokens": usage["completion_tokens"],
        "output_tokens_details": {
            "reasoning_tokens": 0,
            "tool_output_tokens": 0,
            "output_tokens_per_turn": [],
            "tool_output_tokens_per_turn": [],
        },
        "total_tokens": usage["total_tokens"],
    }


def _response_settings(body: JSON, max_output_tokens: int | None) -> JSON:
    """What a response object repeats of its request, as vLLM fills it in (its defaults where none is given).
    Tools are repeated only when there are none: vLLM rewrites each tool it is given with fields of its own."""
    tools = body.get("tools") or []
    return {
        "instructions": _field(body, "instructions", "string"),
        "metadata": body.get("metadata"),
        "temperature": _number_or(body, "temperature", 1.0),
        "tool_choice": body.get("tool_choice") or ("auto" if tools else "none"),
        "top_p": _number_or(body, "top_p", 1.0),
        "max_output_tokens": max_output_tokens,
        "user": _field(body, "user", "string"),
        "presence_penalty": _number_or(body, "presence_penalty", 0.0),
        "frequency_penalty": _number_or(body, "frequency_penalty", 0.0),
    }


def _number_or(body: JSON, name: str, default: float) -> float:
    value = _field(body, name, "number")
    return default if value is None else float(value)


def _response_object(generation: _Generation, response_id: str, item_id: str, *, done: bool, settings: JSON) -> JSON:
    choice = generation.choices[0]
    content: list[JSON] = [{"type": "output_text", "text": choice.text, "annotations": [], "logprobs": None}]
    output = [
        {
            "id": item_id,
            "type": "message",
            "role": "assistant",
            "status": "completed",
            "content": content,
            "phase": None,
        }
    ]
    incomplete = done and choice.finish_reason == "length"
    return {
        "id": response_id,
        "created_at": int(time.time()),
        "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
        "instructions": settings["instructions"],
        "metadata": settings["metadata"],
        "model": generation.model,
        "object": "response",
        "output": output if done else [],
        "parallel_tool_calls": True,
        "temperature": settings["temperature"],
        "tool_choice": settings["tool_choice"],
        "tools": [],
        "top_p": settings["top_p"],
        "background": False,
        "max_output_tokens": settings["max_output_tokens"],
        "max_tool_calls": None,
        "previous_response_id": None,
        "prompt": None,
        "reasoning": None,
        "service_tier": "auto",
        "status": ("incomplete" if incomplete else "completed") if done else "in_progress",
        "text": None,
        "top_logprobs": None,
        "truncation": "disabled",
        "usage": _response_usage(generation) if done else None,
        "user": settings["user"],
        "presence_penalty": settings["presence_penalty"],
        "frequency_penalty": settings["frequency_penalty"],
        **dict.fromkeys(("kv_transfer_params", "ec_transfer_params", "input_messages", "output_messages")),
    }


def _response_body(generation: _Generation, *, settings: JSON) -> bytes:
    return orjson.dumps(_response_object(generation, _new_id("resp_"), _new_id("msg_"), done=True, settings=settings))


def _named_event(payload: JSON) -> bytes:
    return b"event: " + str(payload["type"]).encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n"


def _response_stream_plan(generation: _Generation, *, settings: JSON) -> _StreamPlan:
    response_id, item_id = _new_id("resp_"), _new_id("msg_")
    choice = generation.choices[0]
    sequence = iter(range(1 << 30))

    def event(kind: str, **fields: Any) -> bytes:
        return _named_event({"type": kind, "sequence_number": next(sequence), **fields})

    started = _response_object(generation, response_id, item_id, done=False, settings=settings)
    finished = _response_object(generation, response_id, item_id, done=True, settings=settings)
    item: JSON = {
        "id": item_id,
        "type": "message",
        "role": "assistant",
        "status": "in_progress",
        "content": [],
        "phase": None,
    }
    part: JSON = {"type": "output_text", "text": "", "annotations": [], "logprobs": None}
    where = {"item_id": item_id, "output_index": 0, "content_index": 0}
    head = [
        event("response.created", response=started),
        event("response.in_progress", response=started),
        event("response.output_item.added", output_index=0, item=item),
        event("response.content_part.added", **where, part=part),
    ]
    steps = [[event("response.output_text.delta", **where, delta=f" {token}", logprobs=[])] for token in choice.tokens]
    tail = [
        event("response.output_text.done", **where, text=choice.text, logprobs=[]),
        event("response.content_part.done", **where, part={**part, "text": choice.text}),
        event("response.output_item.done", output_index=0, item=finished["output"][0]),
        # vLLM ends every stream with response.completed, whatever the response's status.
        event("response.completed", response=finished),
    ]
    return _StreamPlan(head=head, steps=steps, tail=tail)


def _message_body(generation: _Generation) -> bytes:
    choice = generation.choices[0]
    usage = generation.usage()
    return orjson.dumps(
        {
            "id": _new_id("chatcmpl-"),
            "type": "message",
            "role": "assistant",
            "content": [{"type": "text", "text": choice.text}],
            "model": generation.model,
            "stop_reason": _STOP_REASONS.get(choice.finish_reason, "end_turn"),
            "usage": {"input_tokens": usage["prompt_tokens"], "output_tokens": usage["completion_tokens"]},
        }
    )


def _message_stream_plan(generation: _Generation) -> _StreamPlan:
    choice = generation.choices[0]
    usage = generation.usage()
    message: JSON = {
        "id": _new_id("chatcmpl-"),
        "type": "message",
        "role": "assistant",
        "content": [],
        "model": generation.model,
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {"input_tokens": usage["prompt_tokens"], "output_tokens": 0},
    }
    head = [
        _named_event({"type": "message_start", "message": message}),
        _named_event({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
    ]
    steps = [
        [_named_event({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": f" {t}"}})]
        for t in choice.tokens
    ]
    final_usage = {"input_tokens": usage["prompt_tokens"], "output_tokens": usage["completion_tokens"]}
    tail = [
        _named_event({"type": "content_block_stop", "index": 0}),
        _named_event(
            {
                "type": "message_delta",
                "delta": {"stop_reason": _STOP_REASONS.get(choice.finish_reason, "end_turn"), "stop_sequence": None},
                "usage": final_usage,
            }
        ),
        _named_event({"type": "message_stop"}),
    ]
    return _StreamPlan(head=head, steps=steps, tail=tail)


def _token_id(word: str) -> int:
    """A word's token id: its place in the vocabulary (so /detokenize inverts it), else a hash past it."""
    try:
        return _VOCAB.index(word)
    except ValueError:
        return len(_VOCAB) + int.from_bytes(hashlib.blake2b(word.encode(), digest_size=2).digest(), "little")


def _unit_score(seed: str) -> float:
    """A deterministic score in [0, 1) for a text."""
    return int.from_bytes(hashlib.blake2b(seed.encode(), digest_size=4).digest(), "little") / 2**32


async def _sleep(seconds: float) -> None:
    if seconds:
        await asyncio.sleep(seconds)


# --- speech to text (/v1/audio/transcriptions, /v1/audio/translations) ---------------------------
# vLLM reads these multipart forms with FastAPI (python-multipart): a part with a filename is a file, any
# other a text field; a repeated field's last value counts, except the list `timestamp_granularities[]`.
# The fake "hears" words drawn from a hash of the audio, like its other generations.

_SPEECH_PROMPT_TOKENS = 4  # Whisper's decoder prompt: start of transcript, language, task, no timestamps
_SPEECH_FORMATS = ("json", "text", "srt", "verbose_json", "vtt")
_TIMESTAMP_GRANULARITIES = ("word", "segment")
_MAX_AUDIO_MB = 25  # VLLM_MAX_AUDIO_CLIP_FILESIZE_MB's default


@dataclass(frozen=True, slots=True)
class _Form:
    fields: dict[str, str]
    lists: dict[str, list[str]]  # every value of each text field, in order
    files: dict[str, bytes]


def _read_form(scope: Scope, raw: bytes) -> _Form:
    """The form as Starlette reads it: multipart, or URL-encoded (text fields only); any other body is an empty
    form (so `file` is missing)."""
    content_type = dict(scope["headers"]).get(b"content-type", b"")
    kind, options = parse_options_header(content_type)
    if kind == b"application/x-www-form-urlencoded":
        pairs = urllib.parse.parse_qsl(raw.decode("latin-1"), keep_blank_values=True)
        return _Form(dict(pairs), {name: [v for n, v in pairs if n == name] for name, _ in pairs}, {})
    if kind != b"multipart/form-data" or not options.get(b"boundary"):
        return _Form({}, {}, {})
    parts: list[tuple[dict[bytes, bytes], list[bytes]]] = []
    header: list[bytes] = [b"", b""]

    def header_field(data: bytes, start: int, end: int) -> None:
        header[0] += data[start:end]

    def header_value(data: bytes, start: int, end: int) -> None:
        header[1] += data[start:end]

    def header_end() -> None:
        if header[0].lower() == b"content-disposition":
            parts[-1][0].update(parse_options_header(header[1])[1])
        header[:] = [b"", b""]

    callbacks = {
        "on_part_begin": lambda: parts.append(({}, [])),
        "on_header_field": header_field,
        "on_header_value": header_value,
        "on_header_end": header_end,
        "on_part_data": lambda data, start, end: parts[-1][1].append(data[start:end]),
    }
    try:
        parser = MultipartParser(options[b"boundary"], callbacks)  # type: ignore[arg-type]  # a TypedDict of callbacks
        parser.write(raw)
        parser.finalize()
    except MultipartParseError as error:
        raise ApiError(HTTPStatus.BAD_REQUEST, f"There was an error parsing the body: {error}") from None
    form = _Form({}, {}, {})
    for disposition, data in parts:
        name = disposition.get(b"name", b"").decode("utf-8", "replace")
        if b"filename" in disposition:
            form.files[name] = b"".join(data)
        else:
            value = b"".join(data).decode("utf-8", "replace")
            form.fields[name] = value
            form.lists.setdefault(name, []).append(value)
    return form


def _form_fault(form: _Form) -> Fault:
    """The `fake_vllm` field of a form: the JSON object a JSON body would carry."""
    raw = form.fields.get("fake_vllm")
    try:
        return _parse_fault(None if raw is None else orjson.loads(raw))
    except orjson.JSONDecodeError:
        raise _invalid("fake_vllm", "fake_vllm must be a JSON object.") from None


@dataclass(frozen=True, slots=True)
class _SpeechRequest:
    audio: bytes
    language: str | None
    prompt: str
    response_format: str
    temperature: float
    stream: bool
    include_usage: bool
    continuous_usage: bool
    max_completion_tokens: int | None


def _speech_request(form: _Form) -> _SpeechRequest:
    """vLLM's TranscriptionRequest / TranslationRequest validation of the form."""
    fields = form.fields
    if "file" in fields and "file" not in form.files:
        raise ApiError(HTTPStatus.UNPROCESSABLE_ENTITY, "Expected 'file' to be a file-like object, not 'str'.")
    # vLLM's model validator reads the raw form strings: any non-empty value is "set".
    stream_options = ("stream_include_usage", "stream_continuous_usage_stats")
    if any(fields.get(option) for option in stream_options) and not fields.get("stream"):
        raise _schema_error(
            "body", "value_error", "Value error, Stream options can only be defined when `stream=True`.", fields
        )
    if "file" not in form.files:
        raise _schema_error("body.file", "missing", "Field required", fields)
    response_format = fields.get("response_format", "json")
    if response_format not in _SPEECH_FORMATS:
        expected = ", ".join(f"'{name}'" for name in _SPEECH_FORMATS[:-1]) + f" or '{_SPEECH_FORMATS[-1]}'"
        raise _schema_error("body.response_format", "literal_error", f"Input should be {expected}", response_format)
    for value in form.lists.get("timestamp_granularities[]", []):
        if value not in _TIMESTAMP_GRANULARITIES:
            raise _schema_error(
                "body.timestamp_granularities[]", "literal_error", "Input should be 'word' or 'segment'", value
            )
    max_tokens = _field(fields, "max_completion_tokens", "integer")
    if max_tokens is not None and max_tokens < 1:
        raise _invalid("max_tokens", f"max_tokens must be at least 1, got {max_tokens}.", max_tokens)
    return _SpeechRequest(
        audio=form.files["file"],
        language=_field(fields, "language", "string") or None,
        prompt=fields.get("prompt", ""),
        response_format=response_format,
        temperature=float(_field(fields, "temperature", "number") or 0.0),
        stream=bool(_field(fields, "stream", "boolean")),
        include_usage=bool(_field(fields, "stream_include_usage", "boolean")),
        continuous_usage=bool(_field(fields, "stream_continuous_usage_stats", "boolean")),
        max_completion_tokens=max_tokens,
    )


def _audio_duration(audio: bytes) -> float:
    """The audio's length in seconds. vLLM decodes many formats with librosa; the fake reads WAV only."""
    if len(audio) / 1024**2 > _MAX_AUDIO_MB:
        raise _invalid("audio_filesize_mb", "Maximum file size exceeded", len(audio) / 1024**2)
    try:
        with wave.open(io.BytesIO(audio)) as clip:
            return float(clip.getnframes() / clip.getframerate())
    except (wave.Error, EOFError, ZeroDivisionError):
        raise _invalid(None, "Invalid or unsupported audio file.") from None


@dataclass(frozen=True, slots=True)
class _Speech:
    """How a speech-to-text answer looks, beside its generation."""

    task: str  # "transcribe" or "translate"
    request: _SpeechRequest
    duration: float

    def body(self, generation: _Generation) -> bytes:
        text = generation.choices[0].text
        if self.request.response_format == "verbose_json":
            return orjson.dumps(self._verbose(generation, text))
        if self.task == "translate":
            return orjson.dumps({"text": text})  # vLLM reports no usage for translations
        # Usage is the audio's duration, rounded up as OpenAI does.
        return orjson.dumps({"text": text, "usage": {"type": "duration", "seconds": math.ceil(self.duration)}})

    def _verbose(self, generation: _Generation, text: str) -> JSON:
        choice = generation.choices[0]
        encoded = text.encode()
        segment = {
            "id": 0,
            "avg_logprob": -0.25,
            "compression_ratio": len(encoded) / len(zlib.compress(encoded)),
            "end": round(self.duration, 2),
            "no_speech_prob": None,
            "seek": 0,
            "start": 0.0,
            "temperature": self.request.temperature,
            "text": text,
            "tokens": [_token_id(word) for word in choice.tokens],
        }
        language = self.request.language or "en"  # Whisper's default
        return {
            "duration": str(self.duration),
            "language": language,
            "text": text,
            "segments": [segment],
            "words": None,
        }

    def stream_plan(self, generation: _Generation) -> _StreamPlan:
        """One chunk per token (vLLM sets only the fields it has: no finish_reason until the last), the usage
        chunk when asked for, then [DONE]."""
        kind = "transcription.chunk" if self.task == "transcribe" else "translation.chunk"
        base = {"id": _new_id(f"{self.task}-"), "object": kind, "created": int(time.time()), "model": generation.model}
        choice = generation.choices[0]
        prompt = generation.prompt_tokens

        def usage(completion: int) -> JSON:
            return {"prompt_tokens": prompt, "total_tokens": prompt + completion, "completion_tokens": completion}

        steps = []
        for position, token in enumerate(choice.tokens):
            last = position == len(choice.tokens) - 1
            ending = {"finish_reason": choice.finish_reason, "stop_reason": None} if last else {}
            chunk = {**base, "choices": [{"delta": {"content": f" {token}"}, **ending}]}
            if generation.continuous_usage:
                chunk["usage"] = usage(position + 1)
            steps.append([_sse(chunk)])
        tail = [_DONE_EVENT]
        if generation.include_usage:
            tail = [_sse({**base, "choices": [], "usage": usage(len(choice.tokens))}), _DONE_EVENT]
        return _StreamPlan(head=[], steps=steps, tail=tail)


# --- command line -----------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `python -m fakes.model_server` beside --host and --port."""
    d = _DEFAULTS
    parser.add_argument(
        "--model",
        dest="models",
        action="append",
        metavar="NAME",
        help=f"served model name; repeat for several (default: {d.models[0]})",
    )
    parser.add_argument("--max-model-len", type=int, default=d.max_model_len, metavar="N")
    parser.add_argument("--embedding-dim", type=int, default=d.embedding_dim, metavar="N")
    parser.add_argument(
        "--default-max-tokens",
        type=int,
        default=d.default_max_tokens,
        metavar="N",
        help="/v1/completions length when a request sets no max_tokens (default: %(default)s)",
    )
    parser.add_argument("--latency", type=float, default=d.latency, metavar="S", help="delay of JSON answers")
    parser.add_argument("--ttft", type=float, default=d.ttft, metavar="S", help="delay of a stream's first token")
    parser.add_argument(
        "--tokens-per-second",
        type=float,
        default=d.tokens_per_second,
        metavar="R",
        help="stream pace; 0 (default) streams as fast as possible",
    )
    parser.add_argument(
        "--error-rate",
        type=float,
        default=d.error_rate,
        metavar="F",
        help="fraction of inference requests that fail, evenly spread, not random",
    )
    parser.add_argument("--error-status", type=int, default=d.error_status, metavar="N")
    parser.add_argument("--error-message", default=d.error_message, metavar="M")
    parser.add_argument(
        "--api-key-env",
        metavar="VAR",
        help="require 'Authorization: Bearer <key>' on /v1 routes; the key is read from $VAR",
    )
    parser.add_argument(
        "--runner",
        choices=RUNNERS,
        default=d.runner,
        help="serve the routes of a generating or a pooling model, as vLLM does, or all (default: %(default)s)",
    )


def config_from_options(options: Mapping[str, Any]) -> FakeServerConfig:
    """Build the config from parsed options; raises ValueError on a bad value."""
    return FakeServerConfig(
        models=tuple(options["models"] or _DEFAULTS.models),
        max_model_len=options["max_model_len"],
        embedding_dim=options["embedding_dim"],
        default_max_tokens=options["default_max_tokens"],
        latency=options["latency"],
        ttft=options["ttft"],
        tokens_per_second=options["tokens_per_second"],
        error_rate=options["error_rate"],
        error_status=options["error_status"],
        error_message=options["error_message"],
        api_key=_api_key_from_env(options["api_key_env"]),
        runner=options.get("runner") or _DEFAULTS.runner,
    )


def _api_key_from_env(variable: str | None) -> str | None:
    if variable is None:
        return None
    key = os.environ.get(variable)
    if not key:
        raise ValueError(f"--api-key-env names {variable}, which is unset or empty")
    return key


def main(argv: Sequence[str] | None = None) -> None:
    parser = asgi.command_line(
        prog="python -m fakes.model_server",
        description="A fast, deterministic fake of vLLM's OpenAI-compatible server.",
        port=8001,
    )
    add_arguments(parser)
    options = vars(parser.parse_args(argv))
    try:
        config = config_from_options(options)
    except ValueError as error:
        parser.error(str(error))
    host, port = options["host"], options["port"]
    banner = f"fake vLLM serving {', '.join(config.models)} on http://{host}:{port}"
    asgi.serve(create_app(config), host=host, port=port, banner=banner)


if __name__ == "__main__":
    main()
