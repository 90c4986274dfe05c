import pytest
from pydantic import ValidationError

from resource_server.schemas import ChatCompletionRequest, CompletionRequest, EmbeddingRequest

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def test_vllm_extensions_are_kept_unchanged() -> None:
    body = {**CHAT, "top_k": 5, "min_p": 0.1, "repetition_penalty": 1.1, "chat_template_kwargs": {"x": [1]}}
    parsed = ChatCompletionRequest.model_validate(body)
    assert parsed.model_extra == {
        "top_k": 5,
        "min_p": 0.1,
        "repetition_penalty": 1.1,
        "chat_template_kwargs": {"x": [1]},
    }


@pytest.mark.parametrize(
    "change",
    [
        {"temperature": -0.1},
        {"top_p": 1.5},
        {"n": 0},
        {"messages": []},
        {"messages": [{"content": "no role"}]},
        {"model": ""},
        {"stream_options": {"include_usage": True}},
    ],
)
def test_bad_chat_fields_are_refused(change: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        ChatCompletionRequest.model_validate({**CHAT, **change})


@pytest.mark.parametrize("change", [{"temperature": "0.5"}, {"max_tokens": 4.0}, {"stream": "yes"}, {"logprobs": 1}])
def test_the_documented_schema_accepts_what_vllm_coerces(change: dict[str, object]) -> None:
    ChatCompletionRequest.model_validate({**CHAT, **change})


def test_stream_options_with_stream_is_accepted() -> None:
    parsed = ChatCompletionRequest.model_validate({**CHAT, "stream": True, "stream_options": {"include_usage": True}})
    assert parsed.stream_options is not None and parsed.stream_options.include_usage


@pytest.mark.parametrize("prompt", ["text", ["a", "b"], [1, 2, 3], [[1, 2], [3]]])
def test_completion_prompt_forms(prompt: object) -> None:
    assert CompletionRequest.model_validate({"model": "m", "prompt": prompt}).prompt == prompt


def test_completion_requires_prompt() -> None:
    with pytest.raises(ValidationError):
        CompletionRequest.model_validate({"model": "m"})


@pytest.mark.parametrize("bad", [{"input": ""}, {"input": []}, {"encoding_format": "int8", "input": "x"}])
def test_bad_embedding_requests_are_refused(bad: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        EmbeddingRequest.model_validate({"model": "m", **bad})
