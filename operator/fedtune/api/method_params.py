"""Numeric peft.config parameters of the methods fedtune implements itself (FedKSeed, offsite tuning)."""

from __future__ import annotations

from typing import Any

# key (the job's camelCase) -> (default, low, high, whether an integer)
Table = dict[str, tuple[float, float, float, bool]]


def method_params(method: str, table: Table, config: dict[str, Any], floats_open_low: bool) -> dict[str, float]:
    """`config` with defaults filled in from `table`. ValueError naming the field at fault and what it must be.

    Integers lie in [low, high]; numbers in (low, high] when `floats_open_low`, else in [low, high]."""
    unknown = sorted(set(config) - set(table))
    if unknown:
        raise ValueError(
            f"peft.config: {method} has no parameter(s) {', '.join(unknown)}; it accepts: {', '.join(table)}"
        )
    out: dict[str, float] = {}
    for key, (default, low, high, integral) in table.items():
        value = config.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (integral and not isinstance(value, int)):
            kind = "an integer" if integral else "a number"
            raise ValueError(f"peft.config.{key} must be {kind} (got {value!r})")
        if (integral or not floats_open_low) and not low <= value <= high:
            raise ValueError(f"peft.config.{key} must be between {low:g} and {high:g} (got {value})")
        if not integral and floats_open_low and not low < value <= high:
            raise ValueError(f"peft.config.{key} must be > {low:g} and <= {high:g} (got {value})")
        out[key] = value
    return out
