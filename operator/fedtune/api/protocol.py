"""The round protocol: tickets the control plane writes, receipts the pods answer with.

Both sides (operator/local runner and fedtune_trainer) import these models, so the wire
format has one definition. Tickets carry presigned URLs only, never credentials.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import Field, SerializerFunctionWrapHandler, model_serializer, model_validator

from fedtune.api.base import ApiModel
from fedtune.api.job import DataSchema, DeepSpeedSpec, ModelSpec, PeftSpec, PersonalizationSpec, TrainingSpec
from fedtune.api.privacy import DifferentialPrivacySpec, SampleDpSpec
from fedtune.api.robust import RobustSpec
from fedtune.api.secagg import PublicKeys, SecureAggregation, SecureTicket
from fedtune.api.status import Metrics

# Counts a pod reports (samples, bytes): never negative, and exact in every JSON reader (2**53), so
# that the sums of a round stay far inside the 64-bit integers a Kubernetes status holds.
Count = Annotated[int, Field(ge=0, le=2**53)]

# init: load the model, report its fingerprint; the designated party also uploads global 0.
# train: evaluate the received global adapter on the local eval split, then train and upload.
# eval: evaluate the final global adapter only. exit: stop the pod.
# keys, shares, unmask: a round's exchanges with secure aggregation besides train (fedtune.api.secagg).
TicketKind = Literal["init", "keys", "shares", "train", "unmask", "eval", "exit"]
# Whose failure an ok=False receipt reports. "storage": the object store could not be reached, or kept
# answering 5xx, after every retry; the control plane blames no party for it and the round waits for
# the storage. "pod" (or none, as older pods write): anything else, the party's own failure.
Fault = Literal["pod", "storage"]


class Download(ApiModel):
    """A presigned GET URL for one object, with the sha256 it must have (when known)."""

    url: str
    sha256: str | None = None


class Multipart(ApiModel):
    """An S3 multipart upload the control plane started: a presigned URL per part, one to complete it.

    The pod PUTs part n (1-based) of its data to part_urls[n-1], collects the ETags and POSTs them
    to complete_url. Parts are part_size bytes, the last shorter; a pod with more data than
    part_size × len(part_urls) uses larger parts (presigned part URLs do not sign the body size).
    """

    upload_id: str = Field(description="The upload's id (already in every URL; for logs and errors).")
    part_size: int = Field(ge=5 * 1024 * 1024, description="Bytes per part; S3 refuses smaller parts but the last.")
    part_urls: list[str] = Field(min_length=1, max_length=10_000, description="Presigned UploadPart URLs, part 1 on.")
    complete_url: str = Field(description="Presigned CompleteMultipartUpload URL (POST).")


class Upload(ApiModel):
    """Where a pod uploads one object: a single presigned PUT, or a multipart upload for large ones.

    A single PUT travels as a plain URL string, as tickets always carried it, so old and new
    tickets read the same; a multipart upload travels as {"multipart": {...}}.
    """

    url: str | None = Field(None, description="Presigned PUT URL (single request).")
    multipart: Multipart | None = None

    @model_validator(mode="before")
    @classmethod
    def _from_url(cls, data: object) -> object:
        return {"url": data} if isinstance(data, str) else data

    @model_validator(mode="after")
    def _one_way(self) -> Upload:
        if (self.url is None) == (self.multipart is None):
            raise ValueError("an upload has either a url or a multipart upload, not both or neither")
        return self

    @model_serializer(mode="wrap")
    def _as_url(self, handler: SerializerFunctionWrapHandler) -> object:
        return self.url if self.multipart is None else handler(self)


class TrainerConfig(ApiModel):
    """Everything a trainer needs to build its model and train; constant for a job."""

    model: ModelSpec
    peft: PeftSpec
    data: DataSchema
    training: TrainingSpec
    deepspeed: DeepSpeedSpec
    world_size: int = 1
    prox_mu: float = Field(0.0, ge=0, description="FedProx proximal weight (0 = off).")
    dp: DifferentialPrivacySpec | None = Field(
        None, description="Local differential privacy: clip the update and add noise before uploading it."
    )
    dp_sgd: SampleDpSpec | None = Field(
        None, description="Sample-level DP-SGD in local training (Opacus): per-example clipping and noise."
    )
    model_files: dict[str, str] = Field(
        default_factory=dict, description="For s3:// model sources: relative file path -> presigned GET URL."
    )
    personalization: PersonalizationSpec | None = Field(
        None, description="Which part of the adapter stays with the party (fedtune_trainer.personal)."
    )


class TrainerTicket(ApiModel):
    """Work for one party trainer (see TicketKind)."""

    kind: TicketKind
    job: str = Field(description="Job uid; every object key of the job lives under it.")
    party: str
    round: int
    attempt: int = 0
    deadline: datetime
    config: TrainerConfig
    train_data: Download | None = None
    eval_data: Download | None = None
    global_in: Download | None = Field(None, description="Global adapter of the previous round.")
    update_out: Upload | None = Field(None, description="Where this party's update goes (or global 0 on init).")
    adapter_config_out: str | None = Field(None, description="PUT URL for adapter_config.json (init only).")
    model_files_out: str | None = Field(
        None,
        description="Full fine-tuning: PUT URL for the final model's config and tokenizer files, as one JSON bundle "
        "(fedtune.api.full_export; init only, in place of adapter_config.json).",
    )
    receipt_out: str | None = Field(None, description="PUT URL for a copy of the receipt in the party bucket.")
    personal_in: Download | None = Field(
        None,
        description="Personalization: GET URL of this party's personal part in its own bucket (the last one it "
        "reported); without it the party starts from its initial personal part.",
    )
    personal_out: str | None = Field(
        None, description="Personalization: PUT URL in the party's own bucket for its personal part after training."
    )
    secure: SecureTicket | None = Field(None, description="Secure aggregation's part (kinds keys to unmask).")

    @property
    def ticket_id(self) -> str:
        return f"{self.kind}-r{self.round}-a{self.attempt}"


class Timings(ApiModel):
    load_seconds: float = 0.0
    download_seconds: float = 0.0
    train_seconds: float = 0.0
    eval_seconds: float = 0.0
    upload_seconds: float = 0.0
    replay_seconds: float = 0.0  # FedKSeed: rebuilding the global model from the base weights and the seeds


def _fault_only_on_failure(receipt: TrainerReceipt | AggregatorReceipt) -> TrainerReceipt | AggregatorReceipt:
    if receipt.ok and receipt.fault is not None:
        raise ValueError("fault: only a failed receipt (ok: false) says whose fault the failure was")
    return receipt


class TrainerReceipt(ApiModel):
    """A trainer's answer to one ticket."""

    kind: TicketKind
    job: str
    party: str
    round: int
    attempt: int = 0
    ok: bool
    error: str | None = None
    fault: Fault | None = Field(
        None, description="Whose failure an ok=False receipt reports: storage (the object store's) or pod."
    )
    num_samples: Count = 0
    num_eval_samples: Count = 0
    metrics: Metrics = Field(
        default_factory=Metrics,
        description="eval* of the received global adapter (before local training); trainLoss of local training.",
    )
    sha256: str | None = Field(None, description="sha256 of the uploaded update (or of global 0 on init).")
    update_bytes: Count | None = Field(None, description="Size of the uploaded update (or of global 0 on init).")
    bytes_up: Count = 0
    bytes_down: Count = 0
    base_model_fingerprint: str | None = None
    replayed_sha256: str | None = Field(
        None,
        description="FedKSeed: sha256 of the weights the party replayed from the global (the same at every party).",
    )
    public_keys: PublicKeys | None = Field(None, description="keys: the party's public keys for this round.")
    personal_sha256: str | None = Field(
        None,
        description="Personalization: sha256 of the personal part the party wrote to its own bucket (personalOut); "
        "the part itself never travels to the control plane.",
    )
    sample_epsilon: float | None = Field(
        None,
        ge=0,
        description="privacy.dpSgd: ε the party's examples have spent over every round it trained so far (its "
        "Opacus RDP accountant, at privacy.dpSgd.delta).",
    )
    timings: Timings = Field(default_factory=Timings)
    finished_at: datetime | None = None

    @model_validator(mode="after")
    def _fault_of_a_failure(self) -> TrainerReceipt:
        return _fault_only_on_failure(self)

    @property
    def storage_failed(self) -> bool:
        """Whether this is a failure of the storage, not of the pod."""
        return not self.ok and self.fault == "storage"

    def answers(self, ticket: TrainerTicket) -> bool:
        return (self.kind, self.job, self.round, self.attempt) == (
            ticket.kind,
            ticket.job,
            ticket.round,
            ticket.attempt,
        )


class UpdateIn(ApiModel):
    """One party's update offered to the aggregator."""

    party: str
    url: str
    sha256: str
    num_samples: int = Field(ge=1)


class AggregatorTicket(ApiModel):
    """Work for the aggregator: combine this round's updates into the next global adapter."""

    kind: Literal["aggregate", "exit"]
    job: str
    round: int
    attempt: int = 0
    deadline: datetime
    strategy: str = "fedavg"
    strategy_params: dict[str, float] = Field(default_factory=dict)
    lora_mode: Literal["average", "exact"] = "average"
    robust: RobustSpec | None = Field(None, description="Byzantine-robust rule and norm bound, if any.")
    min_updates: int = 1
    dp: DifferentialPrivacySpec | None = Field(
        None,
        description="Differential privacy: central mode clips each update and adds noise to their sum; either mode "
        "takes the unweighted mean.",
    )
    secure: SecureAggregation | None = Field(
        None, description="Secure aggregation: the updates are masked; what removing the masks from their sum needs."
    )
    global_in: Download | None = None
    state_in: Download | None = Field(None, description="Server optimiser state of the previous round.")
    updates: list[UpdateIn] = Field(default_factory=list)
    global_out: Upload | None = None
    state_out: Upload | None = None
    receipt_out: str | None = None

    @property
    def ticket_id(self) -> str:
        return f"{self.kind}-r{self.round}-a{self.attempt}"


class AggregatorReceipt(ApiModel):
    """The aggregator's answer to one ticket."""

    kind: Literal["aggregate", "exit"] = "aggregate"
    job: str
    round: int
    attempt: int = 0
    ok: bool
    error: str | None = None
    fault: Fault | None = Field(
        None, description="Whose failure an ok=False receipt reports: storage (the object store's) or pod."
    )
    accepted: list[str] = Field(default_factory=list)
    rejected: dict[str, str] = Field(default_factory=dict, description="party -> why its update was refused.")
    sha256: str | None = Field(None, description="sha256 of the new global adapter.")
    bytes_up: Count = 0
    bytes_down: Count = 0
    state_sha256: str | None = None
    lora_residual: float | None = Field(None, description="Relative Frobenius residual of exact LoRA re-factoring.")
    duration_seconds: float = 0.0
    finished_at: datetime | None = None

    @model_validator(mode="after")
    def _fault_of_a_failure(self) -> AggregatorReceipt:
        return _fault_only_on_failure(self)

    @property
    def storage_failed(self) -> bool:
        """Whether this is a failure of the storage, not of the pod."""
        return not self.ok and self.fault == "storage"

    def answers(self, ticket: AggregatorTicket) -> bool:
        return (self.kind, self.job, self.round, self.attempt) == (
            ticket.kind,
            ticket.job,
            ticket.round,
            ticket.attempt,
        )

    def answers_round(self, job: str | None, rnd: int, attempt: int) -> bool:
        """Whether this receipt is the aggregation of round `rnd`, attempt `attempt` of `job`."""
        return (self.kind, self.job, self.round, self.attempt) == ("aggregate", job, rnd, attempt)
