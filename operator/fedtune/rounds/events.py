"""What the round state machine tells a person: Kubernetes Events on the operator, progress lines locally."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Event:
    """Something worth telling a person (a Kubernetes Event, a progress line)."""

    type: Literal["Normal", "Warning"]
    reason: str
    message: str
