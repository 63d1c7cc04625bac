"""Imports flow one way: the trainer uses the control plane's API models, never the reverse.

The operator image has no torch and no fedtune_trainer dependencies, so any import of
fedtune_trainer from operator/fedtune (even a lazy one inside a function) is a latent crash there.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def imported_modules(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
    return out


def test_the_control_plane_never_imports_the_trainer():
    offenders = {
        str(path.relative_to(ROOT)): sorted(m for m in imported_modules(path) if m.split(".")[0] == "fedtune_trainer")
        for path in (ROOT / "operator" / "fedtune").rglob("*.py")
    }
    offenders = {k: v for k, v in offenders.items() if v}
    assert not offenders, f"move what they need into fedtune.api: {offenders}"


def test_the_api_imports_no_heavy_library_at_module_load():
    # fedtune.api is imported by the operator (no torch) and by every CLI call (fast start).
    for path in (ROOT / "operator" / "fedtune" / "api").glob("*.py"):
        top = {
            n.module if isinstance(n, ast.ImportFrom) else a.name
            for n in ast.parse(path.read_text()).body
            if isinstance(n, ast.Import | ast.ImportFrom)
            for a in (n.names if isinstance(n, ast.Import) else [n])
        }
        heavy = {m for m in top if m and m.split(".")[0] in {"torch", "transformers", "peft", "kopf", "kubernetes"}}
        assert not heavy, f"{path.name} imports {heavy} at module load"
