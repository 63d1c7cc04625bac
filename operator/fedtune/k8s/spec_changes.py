"""Which FederatedJob spec fields may change while the job runs. Pure.

Changing the model, the data schema, the PEFT method or the parties under a running job would
mix incompatible adapters; changing how long and how patiently it runs is safe.
"""

from __future__ import annotations

from typing import Any

MUTABLE = (
    "rounds",
    "roundTimeoutSeconds",
    "maxRoundRetries",
    "maxPartyFailures",
    "minParties",
    "storageOutageTimeoutSeconds",
    "trainerImage",
)


def changed_fields(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted paths of the leaves that differ between two JSON documents."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for key in sorted(set(old) | set(new)):
            out += changed_fields(old.get(key), new.get(key), f"{prefix}.{key}" if prefix else key)
        return out
    return [] if old == new else [prefix or "(root)"]


def review_change(accepted: dict, proposed: dict, current_round: int) -> tuple[bool, str]:
    """Whether a running job may move from `accepted` to `proposed` spec, and why not."""
    fields = changed_fields(accepted, proposed)
    frozen = [f for f in fields if f.split(".", 1)[0] not in MUTABLE]
    if frozen:
        return False, (
            f"spec fields {', '.join(frozen)} cannot change while the job runs (only "
            f"{', '.join(MUTABLE)} can); revert them, or delete and re-create the job"
        )
    rounds = proposed.get("rounds", accepted.get("rounds"))
    if isinstance(rounds, int) and rounds < current_round:
        return False, f"spec.rounds cannot go below the round in progress ({current_round})"
    return True, ", ".join(fields)
