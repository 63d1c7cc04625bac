"""Status models (kstatus conventions: observedGeneration, phase, conditions[])."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Literal

from pydantic import Field

from fedtune.api.base import ApiModel
from fedtune.api.privacy import PrivacyStatus
from fedtune.api.secagg import SecureAggregationStatus

MAX_HISTORY = 50

# Stopped: local mode only, the runner stopped before the job ended (Ctrl-C, a crash, a kill); resumable.
JobPhase = Literal["Pending", "Running", "Succeeded", "Failed", "Stopped"]
# StorageFailed: the party's ticket failed because the object store did (not counted against the party).
PartyPhase = Literal[
    "Pending", "Ready", "Training", "Submitted", "Straggler", "Failed", "StorageFailed", "Dropped", "Done"
]
Stage = Literal["init", "training", "aggregating", "evaluating", "done"]


def utcnow() -> datetime:
    return datetime.now(UTC)


class Condition(ApiModel):
    """A standard Kubernetes condition."""

    type: str = Field(description="Condition type, e.g. Ready or Succeeded.")
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: str = Field(
        pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$", description="CamelCase reason for the last transition."
    )
    message: str = Field("", description="Human-readable details.")
    last_transition_time: datetime | None = Field(None, description="When status last changed.")
    observed_generation: int | None = Field(None, description="metadata.generation the condition was set for.")


class Metrics(ApiModel):
    """Training/evaluation metrics of one party or of a round (sample-weighted)."""

    train_loss: float | None = Field(None, description="Mean local training loss.")
    train_distill_loss: float | None = Field(
        None,
        description="Mean distillation term T²·KL(teacher ‖ student) of local training (training.distillation), "
        "before its weight alpha; train_loss is then the cross-entropy on the labels alone.",
    )
    eval_loss: float | None = Field(None, description="Evaluation loss.")
    eval_accuracy: float | None = Field(None, description="Evaluation accuracy (sequence classification).")
    eval_perplexity: float | None = Field(None, description="Evaluation perplexity (causal LM).")
    global_eval_loss: float | None = Field(
        None,
        description="Personalization: evaluation loss of the global (shared) part with the party's initial "
        "personal part; eval* are then the personalised adapter's (shared part with the party's own).",
    )
    global_eval_accuracy: float | None = Field(
        None, description="Personalization: evaluation accuracy of the global part with the initial personal part."
    )


class PartyState(ApiModel):
    """Per-party progress inside a job."""

    name: str = Field(description="Party namespace/name.")
    role: Literal["trainer", "evaluator"] = Field(
        "trainer", description="trainer, or evaluator: evaluates every global adapter on a held-out test set."
    )
    state: PartyPhase = Field("Pending", description="Where the party is in the current round.")
    last_round: int = Field(0, description="Last round whose update was accepted.")
    num_samples: int | None = Field(None, description="Training examples behind the last update.")
    metrics: Metrics | None = Field(None, description="Metrics the party last reported.")
    failures: int = Field(0, description="Consecutive rounds missed or rejected.")
    message: str = Field("", description="Why the party failed or was dropped.")
    pod_restarts: int = Field(0, description="Times the operator recreated this party's trainer pod.")
    pod_retry_at: datetime | None = Field(None, description="Earliest time a failed trainer pod is recreated.")
    fingerprint: str | None = Field(None, description="Base-model fingerprint the party reported.")
    sample_epsilon: float | None = Field(
        None,
        description="privacy.dpSgd: ε the party's examples have spent in all rounds it trained (its accountant). "
        "Never lowered: a restarted trainer's accountant counts from zero, so after a restart this is the largest "
        "ε any of its accountants reported, a lower bound of the true spend.",
    )
    personal_object: str | None = Field(
        None,
        description="Personalization: the key, in the party's own bucket, of its personal part of the last round "
        "that was aggregated with its update (the final one after the final evaluation); the next round starts "
        "from it.",
    )
    personal_sha256: str | None = Field(None, description="Personalization: sha256 of that personal part.")
    # The party's answer to the current round (cleared when a round or attempt starts).
    update_sha256: str | None = Field(None, description="sha256 of the update submitted this round.")
    round_personal_sha256: str | None = Field(
        None,
        description="Personalization: sha256 of the personal part written with this attempt's update; it becomes "
        "personalObject/personalSha256 only if the round is aggregated with that update.",
    )
    num_eval_samples: int | None = Field(None, description="Evaluation examples behind the metrics.")
    bytes_up: int = Field(0, description="Bytes the party uploaded this round.")
    bytes_down: int = Field(0, description="Bytes the party downloaded this round.")
    train_seconds: float = Field(0.0, description="Local training time this round.")


class RoundRecord(ApiModel):
    """One finished round, kept in a bounded history."""

    round: int = Field(description="Round number (1-based).")
    attempt: int = Field(0, description="Attempt that completed the round.")
    participants: list[str] = Field(default_factory=list, description="Parties whose updates were aggregated.")
    rejected: dict[str, str] = Field(default_factory=dict, description="party -> reason its update was not used.")
    stragglers: list[str] = Field(default_factory=list, description="Parties that missed the deadline.")
    bytes_up: int = Field(0, description="Bytes uploaded in the round, all parties and the aggregator.")
    bytes_down: int = Field(0, description="Bytes downloaded in the round, all parties and the aggregator.")
    duration_seconds: float = Field(0.0, description="Wall time from round start to aggregation.")
    slowest_train_seconds: float = Field(0.0, description="Longest local training time among participants.")
    metrics: Metrics = Field(default_factory=Metrics, description="Sample-weighted metrics of the round.")
    held_out: Metrics | None = Field(
        None, description="The round's global adapter on the evaluator's held-out test set (spec.evaluator)."
    )
    held_out_samples: int | None = Field(None, description="Examples in the held-out test set.")
    lora_residual: float | None = Field(None, description="Relative Frobenius residual of exact LoRA re-factoring.")
    party_eval: dict[str, Metrics] = Field(
        default_factory=dict,
        description="Personalization: each party's evaluation of the round's global adapter, personalised (eval*) "
        "and global (globalEval*), on its own eval split.",
    )
    epsilon: float | None = Field(
        None, description="Differential privacy: ε spent by the job up to and including this round (spec.privacy.dp)."
    )
    sample_epsilon: float | None = Field(
        None,
        description="privacy.dpSgd: the largest sample-level ε among the round's participants, each over all "
        "rounds it trained so far.",
    )
    finished_at: datetime | None = Field(None, description="When the round was aggregated.")


class FederatedJobStatus(ApiModel):
    """Observed state of a FederatedJob, driven by the round state machine."""

    observed_generation: int | None = Field(None, description="metadata.generation this status reflects.")
    phase: JobPhase = Field(
        "Pending",
        description="Pending, Running, Succeeded, Failed, or Stopped (local mode: its runner stopped before the "
        "job ended; the run resumes from its work directory).",
    )
    conditions: list[Condition] = Field(default_factory=list, description="Latest observations of the job.")
    current_round: int = Field(0, description="Round in progress (0 = initialising the global adapter).")
    stage: Stage = Field("init", description="Step of the job: init, training, aggregating, evaluating, done.")
    attempt: int = Field(0, description="Retry number of the current round.")
    round_started_at: datetime | None = Field(None, description="When the current round (attempt) started.")
    round_deadline: datetime | None = Field(None, description="When the current step times out.")
    parties: list[PartyState] = Field(default_factory=list, description="Progress of each party.")
    parties_ready: str = Field("0/0", description="Parties that answered the current round / active parties.")
    history: list[RoundRecord] = Field(default_factory=list, description="Finished rounds, most recent last (bounded).")
    last_metric: str | None = Field(None, description="Last round's evaluation metric, for printer columns.")
    base_model_fingerprint: str | None = Field(None, description="Base-model fingerprint all parties must share.")
    global_sha256: str | None = Field(None, description="sha256 of the current global adapter.")
    adapter_bytes: int | None = Field(
        None, description="Size of the global adapter in bytes (from init); large ones travel in parts."
    )
    final_adapter: str | None = Field(None, description="s3:// URI of the final adapter (PEFT layout).")
    aggregator_restarts: int = Field(0, description="Times the operator recreated the aggregator pod.")
    aggregator_retry_at: datetime | None = Field(None, description="Earliest time a failed aggregator is recreated.")
    server_state_sha256: str | None = Field(None, description="sha256 of the server optimiser state (FedOpt).")
    storage_unavailable_since: datetime | None = Field(
        None, description="Since when the object store does not answer (rounds are paused meanwhile)."
    )
    storage_retries: int = Field(
        0, description="Attempts of the current round restarted for storage failures (not counted as retries)."
    )
    resume_restarts: int = Field(
        0,
        description="Attempts of the current round restarted because a local run resumed it under secure "
        "aggregation (its secrets died with the last run's parties; not counted as retries).",
    )
    storage_retry_since: datetime | None = Field(
        None, description="When the current round first restarted for a storage failure the probe did not see."
    )
    storage_restarts: int = Field(0, description="Times local mode restarted its embedded S3 server (SeaweedFS).")
    privacy: PrivacyStatus | None = Field(
        None, description="Differential privacy spent so far and the budget (spec.privacy.dp)."
    )
    secure_aggregation: SecureAggregationStatus | None = Field(
        None, description="The current round's secure aggregation (spec.privacy.secureAggregation): public values."
    )
    message: str = Field("", description="Human-readable summary of the job's state.")

    @property
    def evaluator(self) -> PartyState | None:
        """The evaluation-only party's state, if the job has one."""
        return next((p for p in self.parties if p.role == "evaluator"), None)

    def party(self, name: str) -> PartyState:
        for p in self.parties:
            if p.name == name:
                return p
        raise KeyError(name)

    def condition(self, ctype: str) -> Condition | None:
        return next((c for c in self.conditions if c.type == ctype), None)
