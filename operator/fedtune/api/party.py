"""The Party resource: one organisation's storage, compute, data location and consent."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from fedtune.api.base import GROUP_VERSION, ApiModel, ObjectMeta
from fedtune.api.status import Condition

BUCKET_PATTERN = r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$"


class SecretRef(ApiModel):
    """A Secret in the Party's namespace holding S3 credentials."""

    name: str = Field(description="Secret name, in the Party's namespace.")
    access_key_field: str = Field("accessKeyId", description="Key of the access key id in the Secret.")
    secret_key_field: str = Field("secretAccessKey", description="Key of the secret access key in the Secret.")


class StorageSpec(ApiModel):
    """An S3 bucket and how to reach it. Only the operator ever holds its credentials."""

    endpoint: str | None = Field(
        None, description="S3 endpoint URL (MinIO, Ceph RGW, SeaweedFS…); empty means AWS S3. Filled in by local mode."
    )
    bucket: str = Field(pattern=BUCKET_PATTERN, description="Bucket name (3-63 lowercase letters, digits, '.', '-').")
    region: str = Field("us-east-1", description="Bucket region.")
    credentials_secret: SecretRef | None = Field(
        None, description="Secret with the S3 credentials. Required on Kubernetes; local mode generates its own."
    )


class PartyData(ApiModel):
    """Where the party's training data lives inside its own bucket (never leaves it)."""

    train_key: str = Field("data/train.jsonl", description="Object key of the training split (JSON lines).")
    eval_key: str = Field("data/eval.jsonl", description="Object key of the local evaluation split (JSON lines).")
    train_path: str | None = Field(
        None,
        description="Local mode (`fedtune run`) only: this organisation's training split on this machine, a JSON-lines "
        "file or a directory of *.jsonl files (relative to the job file). Checked, then uploaded to trainKey in its "
        "own bucket with its own credentials. The operator ignores it: on Kubernetes the data is in the bucket.",
    )
    eval_path: str | None = Field(
        None,
        description="Local mode only: the local evaluation split, as trainPath (uploaded to evalKey); for the "
        "job's evaluator (spec.evaluator), the held-out test set, alone.",
    )

    @field_validator("train_key", "eval_key")
    @classmethod
    def _relative(cls, v: str) -> str:
        if v.startswith("/") or ".." in v.split("/"):
            raise ValueError(f"{v!r} must be a plain object key such as 'data/train.jsonl'")
        return v

    @model_validator(mode="after")
    def _both_paths(self) -> PartyData:
        if self.train_path is not None and self.eval_path is None:
            raise ValueError("set evalPath too (a party trains on one split and evaluates on the other)")
        return self


class ComputeSpec(ApiModel):
    """The compute this party offers to each trainer pod."""

    gpus_per_pod: int = Field(
        0, ge=0, le=16, description="GPUs per trainer pod (0 = CPU); the pod runs one training process (rank) per GPU."
    )
    gpu_product: str | None = Field(None, description="Required GPU product label (nvidia.com/gpu.product).")
    node_selector: dict[str, str] = Field(default_factory=dict, description="Extra node labels trainer pods require.")
    tolerations: list[dict[str, Any]] = Field(default_factory=list, description="Tolerations for trainer pods.")
    cpu: str = Field("2", description="CPU request per trainer pod.")
    memory: str = Field("8Gi", description="Memory request per trainer pod.")


class ConsentSpec(ApiModel):
    """Which coordinators may run jobs on this party's data."""

    allowed_namespaces: list[str] = Field(
        default_factory=list,
        description="Coordinator namespaces whose FederatedJobs may use this Party. Empty: only its own namespace.",
    )

    def allows(self, party_namespace: str, job_namespace: str) -> bool:
        """Whether a job in `job_namespace` may use a Party living in `party_namespace`."""
        return (
            job_namespace == party_namespace
            or job_namespace in self.allowed_namespaces
            or "*" in self.allowed_namespaces
        )


class PartySpec(ApiModel):
    """One organisation taking part in federated jobs."""

    display_name: str | None = Field(None, description="Human-readable organisation name.")
    storage: StorageSpec
    data: PartyData = Field(default_factory=PartyData)
    compute: ComputeSpec = Field(default_factory=ComputeSpec)
    consent: ConsentSpec = Field(default_factory=ConsentSpec)


class PartyStatus(ApiModel):
    """Observed state of a Party."""

    observed_generation: int | None = Field(None, description="metadata.generation this status reflects.")
    phase: Literal["Pending", "Ready", "Error"] = Field("Pending", description="Pending, Ready or Error.")
    conditions: list[Condition] = Field(default_factory=list, description="Latest observations of the Party.")


class Party(ApiModel):
    """The Party custom resource."""

    api_version: Literal["fedtune.io/v1alpha1"] = GROUP_VERSION
    kind: Literal["Party"] = "Party"
    metadata: ObjectMeta
    spec: PartySpec
    status: PartyStatus | None = None

    @property
    def key(self) -> str:
        """namespace/name, unique across the cluster."""
        return f"{self.metadata.namespace}/{self.metadata.name}"
