"""The cluster-side task against the fake vLLM server and a recording relay, over real loopback HTTP."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from globus_compute_sdk.serialize import ComputeSerializer

from compute_functions import CODE_STRATEGY, DATA_STRATEGY, inference
from tests.audio import wav_clip
from tests.servers import fake_model_server, fake_stats, free_port

TOKEN = "task-token-123"
CHAT = {"model": "demo-model", "messages": [{"role": "user", "content": "tell me about the lazy fox"}]}


@dataclass
class Post:
    status: int  # what the relay answered
    path: str
    authorization: str | None
    content_type: str | None
    client_port: int
    message: dict[str, Any]


@dataclass
class Relay:
    """A stand-in for the gateway's relay route: records every POST and answers from a script."""

    url: str
    script: list[int]  # statuses for the first POSTs; 200 once it runs out
    always: int = 200
    posts: list[Post] = field(default_factory=list)

    def answer(self) -> int:
        return self.script.pop(0) if self.script else self.always

    @property
    def accepted(self) -> list[dict[str, Any]]:
        return [post.message for post in self.posts if post.status == 200]

    def events(self) -> list[str]:
        return [event for message in self.accepted for event in message.get("events", [])]


@contextmanager
def relay_server(*script: int, always: int = 200) -> Iterator[Relay]:
    relay = Relay(url="", script=list(script), always=always)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, like the gateway

        def do_POST(self) -> None:
            raw = self.rfile.read(int(self.headers["Content-Length"]))
            status = relay.answer()
            relay.posts.append(
                Post(
                    status=status,
                    path=self.path,
                    authorization=self.headers.get("Authorization"),
                    content_type=self.headers.get("Content-Type"),
                    client_port=self.client_address[1],
                    message=json.loads(raw),
                )
            )
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    relay.url = f"http://127.0.0.1:{server.server_address[1]}/resource_server/relay/task-1"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
    thread.start()
    try:
        yield relay
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def fake_vllm() -> Iterator[str]:
    with fake_model_server("--model", "demo-model", "--max-model-len", "512") as url:
        yield url


@pytest.fixture
def vllm(fake_vllm: str) -> dict[str, Any]:
    return vllm_settings(fake_vllm)


def vllm_settings(base_url: str, **overrides: Any) -> dict[str, Any]:
    url = urlsplit(base_url)
    settings = {
        "host": url.hostname,
        "port": url.port,
        "tls": False,
        "verify_tls": True,
        "api_key_env": None,
        "connect_timeout": 2,
        "read_timeout": 10,
    }
    return {**settings, **overrides}


def stream_task(vllm: dict[str, Any], relay: Relay, body: dict[str, Any], **stream: Any) -> dict[str, Any]:
    settings = {"relay_url": relay.url, "token": TOKEN, "max_coalesce_ms": 5, "retries": 5, "verify_tls": True}
    return {"route": "chat/completions", "body": body, "vllm": vllm, "stream": {**settings, **stream}}


def chat(**extra: Any) -> dict[str, Any]:
    return {**CHAT, **extra}


def long_prompt() -> str:
    return " ".join(["word"] * 600)  # more than --max-model-len 512


def disconnected_streams(base_url: str) -> int:
    """Streams the fake vLLM saw its client abandon."""
    return int(str(fake_stats(base_url)["streams_disconnected"]))


def content_of(events: list[str]) -> str:
    """The assistant text carried by chat completion chunk events."""
    text = []
    for event in events:
        payload = event.removeprefix("data: ").strip()
        if payload != "[DONE]":
            text += [choice["delta"].get("content") or "" for choice in json.loads(payload)["choices"]]
    return "".join(text)


# --- non-streamed ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("route", "body", "kind"),
    [
        ("chat/completions", CHAT, "chat.completion"),
        ("completions", {"model": "demo-model", "prompt": "hello"}, "text_completion"),
        ("embeddings", {"model": "demo-model", "input": ["a", "b"]}, "list"),
    ],
)
def test_each_route_returns_vllm_status_and_json(
    vllm: dict[str, Any], route: str, body: dict[str, Any], kind: str
) -> None:
    result = inference({"route": route, "body": body, "vllm": vllm})

    assert result["status"] == 200
    assert result["body"]["object"] == kind
    assert result["elapsed_ms"] >= 0


def test_unknown_body_fields_reach_vllm(vllm: dict[str, Any], fake_vllm: str) -> None:
    body = chat(max_tokens=3, top_k=7)

    inference({"route": "chat/completions", "body": body, "vllm": vllm})

    assert fake_stats(fake_vllm)["last_request"] == body


def test_context_too_long_stays_400_with_vllm_message(vllm: dict[str, Any]) -> None:
    body = {"model": "demo-model", "prompt": long_prompt()}

    result = inference({"route": "completions", "body": body, "vllm": vllm})

    assert result["status"] == 400
    assert "maximum context length is 512 tokens" in result["body"]["error"]["message"]


def test_vllm_down_is_503_unreachable() -> None:
    vllm = vllm_settings(f"http://127.0.0.1:{free_port()}/v1")

    result = inference({"route": "chat/completions", "body": CHAT, "vllm": vllm})

    assert result["status"] == 503
    assert result["error"]["code"] == "vllm_unreachable"


def write_supervisor_state(log_dir: Path, port: int, state: dict[str, Any]) -> None:
    """What endpoint_configs/launch_vllm.sh's supervisor keeps for the vLLM on `port`."""
    (log_dir / f"vllm-{port}.state").write_text(json.dumps(state))


def test_vllm_down_while_its_supervisor_restarts_it_says_which_attempt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = free_port()
    write_supervisor_state(tmp_path, port, {"state": "restarting", "attempt": 2, "max_attempts": 5, "detail": "x"})
    monkeypatch.setenv("VLLM_LOG_DIR", str(tmp_path))

    result = inference({"route": "chat/completions", "body": CHAT, "vllm": {"host": "127.0.0.1", "port": port}})

    assert result["status"] == 503
    assert result["error"] == {
        "code": "vllm_restarting",
        "message": "The model server on the node stopped and is restarting (attempt 2 of 5).",
    }


def test_vllm_down_after_its_supervisor_gave_up_is_unreachable_with_the_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = free_port()
    detail = "exited with status 1; no restarts left"
    write_supervisor_state(tmp_path, port, {"state": "failed", "attempt": 5, "max_attempts": 5, "detail": detail})
    monkeypatch.setenv("VLLM_LOG_DIR", str(tmp_path))

    result = inference({"route": "chat/completions", "body": CHAT, "vllm": {"host": "127.0.0.1", "port": port}})

    assert result["error"]["code"] == "vllm_unreachable"
    assert result["error"]["message"].endswith(f"its supervisor gave up: {detail}")


def test_silent_vllm_is_504_after_read_timeout(fake_vllm: str) -> None:
    vllm = vllm_settings(fake_vllm, read_timeout=0.5)
    body = chat(fake_vllm={"hang": True})

    result = inference({"route": "chat/completions", "body": body, "vllm": vllm})

    assert result["status"] == 504
    assert result["error"]["code"] == "vllm_timeout"
    assert 450 <= result["elapsed_ms"] < 3000


def test_route_outside_the_openai_set_is_refused_without_calling_vllm(vllm: dict[str, Any], fake_vllm: str) -> None:
    before = fake_stats(fake_vllm)["requests"]

    result = inference({"route": "../fake/stats", "body": {}, "vllm": vllm})

    assert result["status"] == 500
    assert result["error"]["code"] == "invalid_task"
    assert fake_stats(fake_vllm)["requests"] == before


def test_missing_api_key_variable_is_reported(vllm: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GATEWAY_TEST_VLLM_KEY", raising=False)
    task = {"route": "chat/completions", "body": CHAT, "vllm": {**vllm, "api_key_env": "GATEWAY_TEST_VLLM_KEY"}}

    result = inference(task)

    assert result["error"]["code"] == "vllm_api_key_missing"


def test_api_key_from_the_named_variable_is_sent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_TEST_VLLM_KEY", "s3cret-key")
    with fake_model_server("--api-key-env", "GATEWAY_TEST_VLLM_KEY") as url:
        keyed = vllm_settings(url, api_key_env="GATEWAY_TEST_VLLM_KEY")
        unkeyed = vllm_settings(url)

        assert inference({"route": "chat/completions", "body": CHAT, "vllm": keyed})["status"] == 200
        assert inference({"route": "chat/completions", "body": CHAT, "vllm": unkeyed})["status"] == 401


# --- health ------------------------------------------------------------------------------------


def test_health_lists_served_models(vllm: dict[str, Any]) -> None:
    result = inference({"mode": "health", "vllm": vllm})

    assert result["status"] == 200
    assert result["healthy"] is True
    assert result["models"] == ["demo-model"]
    [card] = result["cards"]  # vLLM's model card, for the gateway's GET /v1/models
    assert (card["id"], card["root"], card["parent"]) == ("demo-model", "demo-model", None)
    assert card["max_model_len"] > 0


def test_health_of_a_down_server_is_503() -> None:
    result = inference({"mode": "health", "vllm": vllm_settings(f"http://127.0.0.1:{free_port()}/v1")})

    assert result["status"] == 503
    assert result["healthy"] is False
    assert result["error"]["code"] == "vllm_unreachable"


# --- streamed ----------------------------------------------------------------------------------


def test_stream_relays_every_event_in_order_then_done(vllm: dict[str, Any]) -> None:
    body = chat(max_tokens=40)
    expected = inference({"route": "chat/completions", "body": body, "vllm": vllm})["body"]

    with relay_server() as relay:
        summary = inference(stream_task(vllm, relay, body | {"stream_options": {"include_usage": True}}))

    events = relay.events()
    messages = relay.accepted
    assert [message["seq"] for message in messages] == list(range(len(messages)))
    attempt = messages[0]["attempt"]
    assert messages[-1] == {"seq": len(messages) - 1, "attempt": attempt, "done": True}
    assert all(event.startswith("data: ") and event.endswith("\n\n") for event in events)
    assert events[-1] == "data: [DONE]\n\n"
    assert content_of(events[:-2]) == expected["choices"][0]["message"]["content"]
    assert summary["usage"] == json.loads(events[-2].removeprefix("data: "))["usage"]
    assert summary["usage"]["completion_tokens"] == expected["usage"]["completion_tokens"]
    assert summary | {"elapsed_ms": 0} == {
        "status": 200,
        "outcome": "completed",
        "chunks": len(messages) - 1,
        "events": len(events),
        "usage": summary["usage"],
        "elapsed_ms": 0,
    }


def test_each_run_of_a_task_tags_its_relay_messages_with_its_own_attempt(vllm: dict[str, Any]) -> None:
    # Globus Compute runs the same task again after a lost worker; the gateway tells the runs apart by this.
    with relay_server() as relay:
        task = stream_task(vllm, relay, chat(max_tokens=10))
        inference(task)
        first_run = len(relay.accepted)
        inference(task)

    first = {message["attempt"] for message in relay.accepted[:first_run]}
    second = {message["attempt"] for message in relay.accepted[first_run:]}
    assert len(first) == len(second) == 1
    assert first != second
    assert all(isinstance(attempt, str) and 0 < len(attempt) <= 64 for attempt in first | second)


def test_relay_posts_carry_the_token_as_json_over_one_connection(vllm: dict[str, Any]) -> None:
    with relay_server() as relay:
        inference(stream_task(vllm, relay, chat(max_tokens=10)))

    assert len(relay.posts) >= 2
    assert {post.authorization for post in relay.posts} == {f"Bearer {TOKEN}"}
    assert {post.content_type for post in relay.posts} == {"application/json"}
    assert len({post.client_port for post in relay.posts}) == 1  # kept alive


def test_relay_is_reached_through_the_site_proxy_from_the_environment(
    vllm: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    with relay_server() as proxy:  # the recorder stands in for the proxy and sees the absolute URL
        monkeypatch.setenv("http_proxy", proxy.url.split("/resource_server")[0])
        for variable in ("no_proxy", "NO_PROXY"):
            monkeypatch.delenv(variable, raising=False)
        task = stream_task(vllm, proxy, chat(max_tokens=5))
        task["stream"]["relay_url"] = "http://gateway.example.org/resource_server/relay/task-1"

        summary = inference(task)

    assert summary["outcome"] == "completed"
    assert {post.path for post in proxy.posts} == {"http://gateway.example.org/resource_server/relay/task-1"}


def test_paced_tokens_are_sent_as_they_come_not_held_for_a_batch(vllm: dict[str, Any]) -> None:
    # 25 ms between tokens is far longer than the 5 ms coalescing window.
    body = chat(max_tokens=12, fake_vllm={"tokens_per_second": 40})

    with relay_server() as relay:
        summary = inference(stream_task(vllm, relay, body))

    event_posts = [message for message in relay.accepted if "events" in message]
    assert summary["outcome"] == "completed"
    assert len(event_posts) >= 12


def test_a_burst_of_events_is_coalesced_into_few_posts(vllm: dict[str, Any]) -> None:
    with relay_server() as relay:
        summary = inference(stream_task(vllm, relay, chat(max_tokens=40), max_coalesce_ms=50))

    assert summary["events"] >= 20
    assert summary["chunks"] <= summary["events"] // 4


def test_relay_5xx_twice_is_retried_without_loss_or_duplicates(vllm: dict[str, Any]) -> None:
    body = chat(max_tokens=20)
    with relay_server() as reference:
        inference(stream_task(vllm, reference, body))

    with relay_server(500, 503) as relay:
        summary = inference(stream_task(vllm, relay, body))

    assert [post.status for post in relay.posts[:3]] == [500, 503, 200]
    assert [post.message["seq"] for post in relay.posts[:3]] == [0, 0, 0]
    assert [message["seq"] for message in relay.accepted] == list(range(len(relay.accepted)))
    assert content_of(relay.events()) == content_of(reference.events())
    assert relay.accepted[-1].get("done") is True
    assert summary["outcome"] == "completed"


def test_relay_that_keeps_failing_gives_up_after_the_retries(vllm: dict[str, Any]) -> None:
    with relay_server(always=500) as relay:
        summary = inference(stream_task(vllm, relay, chat(max_tokens=20), retries=2))

    assert len(relay.posts) == 3
    assert summary["outcome"] == "relay_failed"
    assert summary["error"]["code"] == "relay_failed"


def test_relay_403_stops_the_stream_and_disconnects_from_vllm(vllm: dict[str, Any], fake_vllm: str) -> None:
    before = disconnected_streams(fake_vllm)
    body = chat(max_tokens=60, fake_vllm={"tokens_per_second": 20})  # about 3 s if left running

    with relay_server(always=403) as relay:
        summary = inference(stream_task(vllm, relay, body))

    assert summary["outcome"] == "cancelled"
    assert summary["elapsed_ms"] < 1500
    assert len(relay.posts) == 1
    deadline = time.monotonic() + 3
    while disconnected_streams(fake_vllm) == before and time.monotonic() < deadline:
        time.sleep(0.02)
    assert disconnected_streams(fake_vllm) == before + 1


def test_stream_refused_by_vllm_reports_its_status_and_message(vllm: dict[str, Any]) -> None:
    body = {"model": "demo-model", "messages": [{"role": "user", "content": long_prompt()}]}

    with relay_server() as relay:
        summary = inference(stream_task(vllm, relay, body))

    [message] = relay.accepted
    assert message["seq"] == 0
    assert message["error"]["status"] == 400
    assert message["error"]["code"] == "vllm_rejected"
    assert "maximum context length is 512 tokens" in message["error"]["message"]
    assert summary["status"] == 400
    assert summary["outcome"] == "failed"


def test_stream_to_unreachable_vllm_reports_503() -> None:
    vllm = vllm_settings(f"http://127.0.0.1:{free_port()}/v1")

    with relay_server() as relay:
        inference(stream_task(vllm, relay, CHAT))

    assert [message["error"]["code"] for message in relay.accepted] == ["vllm_unreachable"]
    assert relay.accepted[0]["error"]["status"] == 503


def test_stream_that_stalls_reports_a_timeout(fake_vllm: str) -> None:
    vllm = vllm_settings(fake_vllm, read_timeout=0.3)
    body = chat(max_tokens=5, fake_vllm={"ttft": 2})  # headers at once, then silence

    with relay_server() as relay:
        summary = inference(stream_task(vllm, relay, body))

    assert [message["error"]["code"] for message in relay.accepted] == ["vllm_timeout"]
    assert relay.accepted[0]["error"]["status"] == 504
    assert summary["elapsed_ms"] < 1500


def test_stream_broken_midway_reports_an_error_after_the_events(vllm: dict[str, Any]) -> None:
    body = chat(max_tokens=20, fake_vllm={"fail_after_tokens": 3})

    with relay_server() as relay:
        summary = inference(stream_task(vllm, relay, body))

    final = relay.accepted[-1]
    assert "done" not in final
    assert final["error"]["status"] == 502
    assert final["error"]["code"] == "vllm_stream_broken"
    assert content_of(relay.events()).count(" ") == 3  # the three tokens before the break
    assert summary["outcome"] == "failed"


# --- shipped to an endpoint --------------------------------------------------------------------

# Runs where our packages cannot be imported, like an endpoint worker: the payload must carry the code.
ENDPOINT_SCRIPT = """
import json, sys
sys.modules["compute_functions"] = None
from globus_compute_sdk.serialize import ComputeSerializer
payload = open(sys.argv[1]).read()
allowed = sys.argv[2:] or None
function, args, kwargs = ComputeSerializer(allowed_deserializer_types=allowed).unpack_and_deserialize(payload)
print(json.dumps([function(task, **kwargs) for task in args]))
"""


def run_as_endpoint(
    serializer: ComputeSerializer, tasks: list[dict[str, Any]], tmp_path: Path, *allowed: str
) -> subprocess.CompletedProcess[str]:
    packed = serializer.pack_buffers(
        [serializer.serialize(inference), serializer.serialize(tasks), serializer.serialize({})]
    )
    (tmp_path / "payload").write_text(packed)
    return subprocess.run(
        [sys.executable, "-c", ENDPOINT_SCRIPT, str(tmp_path / "payload"), *allowed],
        cwd=tmp_path,  # not the repository, so `tests` and friends are not importable either
        env={"PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_entry_point_survives_the_serializer_and_runs_without_our_packages(
    vllm: dict[str, Any], tmp_path: Path
) -> None:
    serializer = ComputeSerializer(strategy_code=CODE_STRATEGY, strategy_data=DATA_STRATEGY)
    body = chat(max_tokens=5)
    with relay_server() as relay:
        tasks = [{"route": "chat/completions", "body": body, "vllm": vllm}, stream_task(vllm, relay, body)]

        process = run_as_endpoint(serializer, tasks, tmp_path, CODE_STRATEGY, DATA_STRATEGY)

    assert process.returncode == 0, process.stderr
    plain, streamed = json.loads(process.stdout)
    assert plain["status"] == 200
    assert streamed["outcome"] == "completed"
    assert content_of(relay.events()[:-1]) == plain["body"]["choices"][0]["message"]["content"]


def test_the_sdk_default_strategy_would_not_carry_the_code(vllm: dict[str, Any], tmp_path: Path) -> None:
    # Why CODE_STRATEGY exists: DillCode pickles a module-level function by reference.
    task = {"route": "chat/completions", "body": CHAT, "vllm": vllm}

    process = run_as_endpoint(ComputeSerializer(), [task], tmp_path)

    assert process.returncode != 0
    assert "compute_functions" in process.stderr


def _audio_form(*fields: tuple[str, str]) -> dict[str, str]:
    """A transcription form as the gateway puts it in the task: its content type and the form, base64."""
    parts = b"".join(f'--b1\r\nContent-Disposition: form-data; name="{n}"\r\n\r\n{v}\r\n'.encode() for n, v in fields)
    parts += b'--b1\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\n'
    parts += wav_clip(1.2) + b"\r\n--b1--\r\n"
    return {"content_type": "multipart/form-data; boundary=b1", "data": base64.b64encode(parts).decode()}


def test_an_audio_form_goes_to_vllm_as_the_client_sent_it(vllm: dict[str, Any]) -> None:
    result = inference({"route": "audio/transcriptions", "body": _audio_form(("model", "demo-model")), "vllm": vllm})
    assert result["status"] == 200
    assert result["body"]["usage"] == {"type": "duration", "seconds": 2}

    form = _audio_form(("model", "demo-model"), ("stream", "true"), ("stream_include_usage", "true"))
    with relay_server() as relay:
        summary = inference(stream_task(vllm, relay, form) | {"route": "audio/transcriptions"})
    assert summary["outcome"] == "completed" and relay.events()[-1] == "data: [DONE]\n\n"
    assert summary["usage"]["completion_tokens"] == len(relay.events()) - 2  # each word's chunk, usage, [DONE]


def test_a_form_whose_content_type_would_break_the_request_head_is_refused(vllm: dict[str, Any]) -> None:
    body = {"content_type": "multipart/form-data; boundary=b1\r\nX-Injected: 1", "data": ""}
    result = inference({"route": "audio/translations", "body": body, "vllm": vllm})
    assert (result["status"], result["error"]["code"]) == (500, "invalid_task")
