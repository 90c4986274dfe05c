"""What the usage writer's tests share: a sink of their own, writing to the test database."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from resource_server.services.usage import UsageSink


def usage_sink(tmp_path: Path) -> UsageSink:
    """A usage sink quick to flush, with its journal and dead letters under `tmp_path`."""
    return UsageSink(
        batch_size=50,
        flush_seconds=0.05,
        spool_dir=tmp_path / "usage-spool",
        dead_letter_dir=tmp_path / "usage-dead-letter",
    )


@pytest.fixture
def sink(tmp_path: Path) -> Iterator[UsageSink]:
    sink = usage_sink(tmp_path)
    yield sink
    sink.stop(timeout=10)
