"""A wheel built from this checkout carries the product and no fake: the fakes run from the checkout only."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path, PurePosixPath

import pytest

ROOT = Path(__file__).resolve().parent.parent
PRODUCT = ("gateway", "resource_server", "compute_functions")
# What a fresh clone does not have: a build from a developer's tree must not pick up stale build output.
NOT_IN_A_CLONE = shutil.ignore_patterns(".git", ".venv", "var", "build", "dist", "*.egg-info", "__pycache__", ".*cache")


@pytest.fixture(scope="module")
def wheel_files(tmp_path_factory: pytest.TempPathFactory) -> list[PurePosixPath]:
    """The paths inside a wheel built, offline, from a copy of this checkout."""
    source = tmp_path_factory.mktemp("checkout") / "inference-gateway"
    shutil.copytree(ROOT, source, ignore=NOT_IN_A_CLONE)
    out = tmp_path_factory.mktemp("wheel")
    # The venv's setuptools (a dev dependency) builds it: no build isolation, so no download.
    args = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q"]
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    done = subprocess.run(
        [*args, "-w", str(out), str(source)], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    [wheel] = out.glob("inference_gateway-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        return [PurePosixPath(name) for name in archive.namelist()]


def test_wheel_carries_the_product_packages(wheel_files: list[PurePosixPath]) -> None:
    packages = {path.parts[0] for path in wheel_files if path.name == "__init__.py"}
    commands = {path.name for path in wheel_files if path.parent.match("resource_server/management/commands")}

    assert packages >= set(PRODUCT)
    assert {"seed_demo.py", "create_api_key.py"} <= commands


def test_wheel_carries_no_fake(wheel_files: list[PurePosixPath]) -> None:
    fakes = [str(path) for path in wheel_files if any(part.startswith("fake") for part in path.parts)]
    outside = sorted({path.parts[0] for path in wheel_files} - set(PRODUCT))

    assert fakes == []
    assert [top for top in outside if not top.endswith(".dist-info")] == []
