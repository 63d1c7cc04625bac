"""Readable validation errors: one line per problem, naming the field and the fix."""

from __future__ import annotations

import re

from pydantic import ValidationError

# A problem line that starts with the (camelCase) field it is about: "rounds: must be at least 1".
_FIELD = re.compile(r"^([a-z][A-Za-z0-9]*(?:\.[a-z][A-Za-z0-9]*)*): ")


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
        # A validator that found several problems says them one per line, each "field: message" or a sentence.
        for m in msg.splitlines():
            field = _FIELD.match(m)
            at = f"{where}.{field.group(1)}" if field and where else where
            m = m[field.end() :] if field and where else m
            lines.append(f"{at}: {m}" if at else m)
    return "\n".join(lines)
