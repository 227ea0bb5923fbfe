"""Shared fixtures: the repo root on sys.path and the real SmolLM2-135M-Instruct checkpoint."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import build_fixture  # noqa: E402


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """A real HF checkpoint folder, built once per machine (.ci/run builds it before the tests)."""
    out = build_fixture.default_dir()
    if not build_fixture.is_built(out):
        script = Path(build_fixture.__file__)
        proc = subprocess.run([sys.executable, str(script), "--out", str(out)], text=True)
        if proc.returncode == build_fixture.UNREACHABLE:
            pytest.skip(f"package registry unreachable: cannot fetch {build_fixture.PACKAGE}")
        assert proc.returncode == 0, "tests/build_fixture.py failed"
    return out
