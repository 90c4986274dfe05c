"""docs/architecture.md's picture of one request matches the code: its modules exist, its stages are the pipeline's."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

from resource_server.pipeline import run

ROOT = Path(__file__).resolve().parent.parent
STAGE = re.compile(r"^\s+(\d)? +(authenticate|body|parse|route|admit|dispatch|respond|meter)\s+(\S+\.py)\b", re.M)
# The call that is each stage in `inference_run`, in the order the stages run (the meter wraps them all).
STAGE_CALLS = {
    "authenticate": "principal_from_authorization(",
    "body": "body_read(",
    "parse": "request_parse(",
    "route": "endpoint_candidates(",
    "admit": "admit(",
    "dispatch": "dispatch_stream(",
    "respond": "stream_relay(",
}


def _picture() -> str:
    text = (ROOT / "docs" / "architecture.md").read_text()
    return text[text.index("```\n") : text.index("```\n", text.index("```\n") + 4)]


def _module_exists(name: str) -> bool:
    if "/" in name:
        return (ROOT / "resource_server" / name).is_file() or (ROOT / name).is_file()
    return any(ROOT.glob(f"resource_server/**/{name}")) or any(ROOT.glob(f"gateway/{name}"))


def test_every_module_the_picture_names_exists() -> None:
    named = set(re.findall(r"[\w/]+\.py", _picture()))
    assert len(named) > 20, "the picture names the modules of the doors and of every stage"
    assert sorted(name for name in named if not _module_exists(name)) == []


def test_the_pictures_stages_are_the_pipelines_in_order() -> None:
    pictured = [(stage, module) for _, stage, module in STAGE.findall(_picture())]
    stated = [(stage, module) for _, stage, module in STAGE.findall(run.__doc__ or "")]
    assert [stage for stage, _ in stated] == [*STAGE_CALLS, "meter"]
    assert pictured == stated


def test_inference_run_calls_the_stages_in_the_stated_order() -> None:
    source = inspect.getsource(run.inference_run)
    positions = [source.index(call) for call in STAGE_CALLS.values()]
    assert positions == sorted(positions)
