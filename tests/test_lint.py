"""The code base stays ruff-clean (style, unused names, import order, common bugs)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_ruff_check_is_clean():
    ruff = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    if not Path(ruff).exists():
        pytest.skip("ruff is not installed (it comes with the dev extra)")
    targets = [d for d in ("operator", "trainer_image", "tests", "bench") if (ROOT / d).exists()]
    out = subprocess.run(
        [ruff, "check", "--output-format", "concise", *targets], cwd=ROOT, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout + out.stderr
