"""Status models (kstatus conventions: observedGeneration, phase, conditions[])."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Literal

from pydantic import Field

from fedtune.api.base import ApiModel

MAX_HISTORY = 50

JobPhase = Literal["Pending", "Running", "Succeeded", "Failed"]
PartyPhase = Literal["Pending", "Ready", "Training", "Submitted", "Straggler", "Failed", "Dropped", "Done"]
Stage = Literal["init", "training", "aggregating", "evaluating", "done"]


def utcnow() -> datetime:
    return datetime.now(UTC)


class Condition(ApiModel):
    """A standard Kubernetes condition."""

    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str = Field(pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$")
    message: str = ""
    last_transition_time: datetime | None = None
    observed_generation: int | None = None


class Metrics(ApiModel):
    """Training/evaluation metrics of one party or of a round (sample-weighted)."""

    train_loss: float | None = None
    eval_loss: float | None = None
    eval_accuracy: float | None = None
    eval_perplexity: float | None = None


class PartyState(ApiModel):
    """Per-party progress inside a job."""

    name: str = Field(description="Party namespace/name.")
    state: PartyPhase = "Pending"
    last_round: int = Field(0, description="Last round whose update was accepted.")
    num_samples: int | None = None
    metrics: Metrics | None = None
    failures: int = Field(0, description="Consecutive rounds missed or rejected.")
    message: str = ""
    fingerprint: str | None = Field(None, description="Base-model fingerprint the party reported.")
    # The party's answer to the current round (cleared when a round or attempt starts).
    update_sha256: str | None = None
    num_eval_samples: int | None = None
    bytes_up: int = 0
    bytes_down: int = 0
    train_seconds: float = 0.0


class RoundRecord(ApiModel):
    """One finished round, kept in a bounded history."""

    round: int
    attempt: int = 0
    participants: list[str] = Field(default_factory=list)
    rejected: dict[str, str] = Field(default_factory=dict, description="party -> reason its update was not used.")
    stragglers: list[str] = Field(default_factory=list)
    bytes_up: int = 0
    bytes_down: int = 0
    duration_seconds: float = 0.0
    slowest_train_seconds: float = 0.0
    metrics: Metrics = Field(default_factory=Metrics)
    lora_residual: float | None = None
    finished_at: datetime | None = None


class FederatedJobStatus(ApiModel):
    """Observed state of a FederatedJob, driven by the round state machine."""

    observed_generation: int | None = None
    phase: JobPhase = "Pending"
    conditions: list[Condition] = Field(default_factory=list)
    current_round: int = Field(0, description="Round in progress (0 = initialising the global adapter).")
    stage: Stage = "init"
    attempt: int = Field(0, description="Retry number of the current round.")
    round_started_at: datetime | None = None
    round_deadline: datetime | None = None
    parties: list[PartyState] = Field(default_factory=list)
    parties_ready: str = Field("0/0", description="Parties that answered the current round / active parties.")
    history: list[RoundRecord] = Field(default_factory=list)
    last_metric: str | None = Field(None, description="Last round's evaluation metric, for printer columns.")
    base_model_fingerprint: str | None = None
    global_sha256: str | None = Field(None, description="sha256 of the current global adapter.")
    final_adapter: str | None = Field(None, description="s3:// URI of the final adapter (PEFT layout).")
    server_state_sha256: str | None = None
    message: str = ""

    def party(self, name: str) -> PartyState:
        for p in self.parties:
            if p.name == name:
                return p
        raise KeyError(name)

    def condition(self, ctype: str) -> Condition | None:
        return next((c for c in self.conditions if c.type == ctype), None)
