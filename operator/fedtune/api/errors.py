"""Readable validation errors: one line per problem, naming the field and the fix."""

from __future__ import annotations

from pydantic import ValidationError


class SpecError(ValueError):
    """A document that cannot be used as written. `str()` is meant for humans."""


def _path(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def describe(err: ValidationError, prefix: str = "") -> str:
    """Turn a pydantic ValidationError into `field: message` lines."""
    lines = []
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if p not in ("function-after", "function-before"))
        where = _path(loc)
        where = f"{prefix}.{where}" if prefix and where else (prefix or where)
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown field (check its spelling; fields are camelCase)"
        elif e["type"] == "missing":
            msg = "required field is missing"
        lines.append(f"{where}: {msg}" if where else msg)
    return "\n".join(lines)
