"""Helpers of the benchmark smoke tests: run a bench script as a person would, read its tables."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench"


def run_smoke(script: str, out: Path, result: str | None = None, timeout: float = 600) -> str:
    """Run `bench/SCRIPT --smoke --out OUT` in a subprocess; the markdown it wrote (OUT/RESULT, by
    default the script's name with .md)."""
    proc = subprocess.run(
        [sys.executable, str(BENCH / script), "--smoke", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return (out / (result or script.replace(".py", ".md"))).read_text()


def tables(markdown: str) -> list[list[list[str]]]:
    """Every markdown table as rows of cells (header first, the --- line dropped)."""
    found, current = [], []
    for line in markdown.splitlines() + [""]:
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not all(set(c) <= {"-"} for c in cells):
                current.append(cells)
        elif current:
            found.append(current)
            current = []
    return found


def table(markdown: str, first_header: str) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the table whose first header cell is `first_header`."""
    return next((t[0], t[1:]) for t in tables(markdown) if t[0][0] == first_header)


def machine_noted(markdown: str) -> bool:
    return "- cpu:" in markdown and "- torch:" in markdown and "cores" in markdown
