"""Kubernetes label and field selectors, as the API server applies them to list and watch.

Label selectors: `a=b`, `a==b`, `a!=b`, `a`, `!a`, `a in (x,y)`, `a notin (x,y)`.
Field selectors: `<dotted.path>=x`, `==`, `!=` on any field (a real server allows only some).
Malformed selectors raise ValueError.
"""

from __future__ import annotations

import re
from typing import Any

_LABEL_REQ = re.compile(r"^(!?)([\w./-]+)(?:\s*(==|=|!=)\s*([\w./-]*)|\s+(in|notin)\s*\(([^)]*)\))?$")


def _split_selector(selector: str) -> list[str]:
    """Split on the commas that separate requirements, not those inside `in (a,b)`."""
    parts, depth, cur = [], 0, ""
    for ch in selector:
        depth += ch == "("
        depth -= ch == ")"
        if ch == "," and depth == 0:
            parts.append(cur.strip())
            cur = ""
        else:
            cur += ch
    return [p for p in [*parts, cur.strip()] if p]


def match_labels(selector: str | None, labels: dict[str, str]) -> bool:
    """Whether labels satisfy a label selector (equality- and set-based syntax)."""
    for req in _split_selector(selector or ""):
        m = _LABEL_REQ.match(req)
        if not m:
            raise ValueError(f"unable to parse requirement: {req!r}")
        neg, key, op, val, setop, values = m.groups()
        if setop:
            allowed = {v.strip() for v in values.split(",")}
            ok = (labels.get(key) in allowed) if setop == "in" else (labels.get(key) not in allowed)
        elif op:
            ok = (labels.get(key) == val) if op in ("=", "==") else (labels.get(key) != val)
        else:
            ok = (key in labels) != bool(neg)
        if not ok:
            return False
    return True


def match_fields(selector: str | None, obj: dict[str, Any]) -> bool:
    """Whether an object satisfies a field selector (`a.b=x`, `a.b==x`, `a.b!=x`)."""
    for req in _split_selector(selector or ""):
        m = re.match(r"^([\w.]+)\s*(==|=|!=)\s*(.*)$", req)
        if not m:
            raise ValueError(f"invalid field selector requirement: {req!r}")
        path, op, want = m.groups()
        value: Any = obj
        for part in path.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        got = "" if value is None else str(value)
        if (got == want) != (op != "!="):
            return False
    return True
