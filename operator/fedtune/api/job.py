"""The FederatedJob resource: what to fine-tune, how, with whom, for how many rounds."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from fedtune.api.base import GROUP_VERSION, ApiModel, ObjectMeta
from fedtune.api.methods import (
    FEDKSEED,
    FULL,
    OFFSITE,
    PROMPT_LEARNING,
    TASK_TYPES,
    check_peft_config,
    strategy_params,
)
from fedtune.api.party import StorageSpec
from fedtune.api.privacy import PrivacySpec, budget_problem
from fedtune.api.quantization import QuantizationSpec
from fedtune.api.robust import RobustSpec
from fedtune.api.secagg import MAX_PARTIES
from fedtune.api.status import FederatedJobStatus

Task = Literal["sequence-classification", "causal-lm"]
MODEL_SCHEMES = ("file://", "pkg://", "hf://", "s3://")


class ModelSpec(ApiModel):
    """The shared base model. It is loaded once per trainer pod and never leaves it."""

    source: str = Field(
        description="file:///path or /path (local dir), pkg://<python package>/<sub dir> (shipped in a package), "
        "hf://<repo id> (needs a reachable hub), s3://<bucket>/<prefix> (read through presigned URLs)."
    )
    task: Task = Field(description="sequence-classification or causal-lm.")
    gguf_file: str | None = Field(None, description="GGUF file name inside the source, for GGUF-packed models.")
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="Base model weight dtype.")
    parameters: int | None = Field(
        None,
        ge=1,
        description="The base model's parameter count (e.g. 7241732096), when known. It sizes trainer pods' "
        "memory where the model lives in host memory: CPU parties (with peft.method full or fedkseed, the "
        "training state of every weight too), and DeepSpeed parameter offload. Left out, compute.memory must "
        "hold it.",
    )
    quantization: QuantizationSpec | None = Field(
        None,
        description="Load the frozen base model quantised by bitsandbytes (4-bit: QLoRA). Only the adapter "
        "trains and travels. Needs a GPU, or bitsandbytes' CPU backend.",
    )
    emulator: str | None = Field(
        None,
        description="peft.method offsite only: the emulator of the model (what `fedtune emulator` derives from "
        "source: its middle layers compressed), as a model source like `source`. Parties load this and never "
        "the full model; only the coordinator reads `source`, to build the emulator and plug the result back.",
    )

    @field_validator("source", "emulator")
    @classmethod
    def _scheme(cls, v: str | None) -> str | None:
        if v is not None and "://" in v and not v.startswith(MODEL_SCHEMES):
            raise ValueError(f"unsupported scheme in {v!r}; use one of {', '.join(MODEL_SCHEMES)} or a local path")
        return v

    @property
    def portable_name(self) -> str:
        """What a final adapter records as its base model: the hub id for hf://, else the source as written.

        Never the path a trainer happened to load it from (a virtualenv's site-packages, a cache).
        """
        return self.source.removeprefix("hf://")


class PeftSpec(ApiModel):
    """The parameter-efficient method; `config` goes to peft as written (peft's snake_case keys).

    `full` is no PEFT at all: every parameter of the model trains and is exchanged each round.
    """

    method: str = Field(
        "lora",
        description="lora, ia3, prompt_tuning, prefix_tuning, loha, lokr, … (any peft method), or full: full "
        "fine-tuning, where every weight trains and travels each round (no config); or fedkseed: full-parameter "
        "zeroth-order tuning on K shared seeds where only (seed, scalar) pairs travel (config: seeds, steps, "
        "learningRate, epsilon); or offsite: offsite tuning, where parties train the first and last layers of an "
        "emulator (model.emulator, the model with its middle compressed) and never hold the full model (config: "
        "adapterLayers, dropRatio).",
    )
    config: dict[str, Any] = Field(default_factory=dict, description="peft config keyword arguments, e.g. {r: 8}.")


class DataSchema(ApiModel):
    """The shape of every party's JSON-lines data."""

    format: Literal["jsonl"] = Field("jsonl", description="Data file format: JSON lines, one example per line.")
    text_field: str = Field("text", description="Input text field (sequence classification).")
    label_field: str = Field("label", description="Label field (sequence classification).")
    labels: list[str] = Field(default_factory=list, description="Class names, in label-id order (classification).")
    prompt_field: str = Field("prompt", description="Prompt field (causal LM).")
    response_field: str = Field("response", description="Response field (causal LM); the loss covers it only.")
    max_length: int = Field(128, ge=8, le=32768, description="Tokens per example after truncation.")

    @field_validator("labels")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        dup = sorted({x for x in v if v.count(x) > 1})
        if dup:
            raise ValueError(f"duplicate label(s) {', '.join(dup)}: list each class once")
        return v


class DistillationSpec(ApiModel):
    """Knowledge distillation (FedKD-LoRA): a fine-tuned teacher's soft labels guide every party's student.

    The coordinator fine-tunes the teacher on a public share of the data (`fedtune teacher`) and
    publishes the checkpoint; each party loads it read-only next to its student and runs it forward
    on its own batches. Party data never reaches the teacher's weights, and the teacher never leaves
    its model source. Each batch's loss is (1-alpha)·CE(student, labels) + alpha·T²·KL(softmax(teacher/T)
    ‖ softmax(student/T)) (Hinton et al., 2015).
    """

    teacher: str = Field(
        description="The fine-tuned teacher checkpoint (a transformers directory, e.g. what `fedtune teacher` "
        "wrote), as a model source: file:///path, pkg://<package>/<dir> or hf://<repo id>. It must share the "
        "student's tokenizer and have one output per data.labels entry."
    )
    alpha: float = Field(
        0.5, gt=0, le=1, description="Weight of the distillation term; the cross-entropy on labels gets 1 - alpha."
    )
    temperature: float = Field(
        2.0, gt=0, le=100, description="Softmax temperature T of teacher and student in the distillation term."
    )

    @field_validator("teacher")
    @classmethod
    def _scheme(cls, v: str) -> str:
        if "://" in v and not v.startswith(MODEL_SCHEMES):
            raise ValueError(f"unsupported scheme in {v!r}; use one of {', '.join(MODEL_SCHEMES)} or a local path")
        return v


class TrainingSpec(ApiModel):
    """Local training each party runs per round."""

    local_epochs: float | None = Field(None, gt=0, description="Passes over the local data per round (default 1).")
    local_steps: int | None = Field(None, ge=1, description="Optimizer steps per round; instead of localEpochs.")
    batch_size: int = Field(8, ge=1, description="Micro-batch size per device.")
    gradient_accumulation: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    learning_rate: float = Field(5e-4, gt=0, lt=1, description="Local optimizer learning rate (AdamW).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    eval_batch_size: int = Field(32, ge=1, description="Batch size of local evaluation.")
    max_train_samples: int | None = Field(None, ge=1, description="Cap on local training examples per round.")
    max_eval_samples: int | None = Field(None, ge=1, description="Cap on local evaluation examples.")
    seed: int = Field(0, description="Seeds the adapter initialisation and data order.")
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32",
        description="Mixed precision of the plain PyTorch path: fp32 (none), bf16 (autocast) or fp16 (autocast "
        "with loss scaling). The adapter is kept, trained and exchanged in its own dtype (float32) either way. "
        "With deepspeed.enabled use deepspeed.bf16 instead.",
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in the backward pass: less memory, about a third more compute."
    )
    update_compression: Literal["none", "bf16", "int8"] = Field(
        "none",
        description="How parties upload their update: none (as trained), bf16 (floats cast to bfloat16, half the "
        "bytes) or int8 (per-row/column symmetric int8 with float32 scales, about a quarter). The aggregator "
        "decodes to full precision before verifying; the global adapter always travels uncompressed.",
    )
    distillation: DistillationSpec | None = Field(
        None,
        description="Knowledge distillation from a fine-tuned teacher model (FedKD-LoRA): each party's loss "
        "adds a temperature-scaled KL term towards the teacher's soft labels. Sequence classification only.",
    )

    @model_validator(mode="after")
    def _one_budget(self) -> TrainingSpec:
        if self.local_epochs is not None and self.local_steps is not None:
            raise ValueError("set either training.localEpochs or training.localSteps, not both")
        return self


class DeepSpeedSpec(ApiModel):
    """DeepSpeed engine settings; the operator turns them into pod resources."""

    enabled: bool = Field(False, description="Train with the DeepSpeed engine (otherwise plain PyTorch).")
    zero_stage: int = Field(0, ge=0, le=3, description="ZeRO stage 0-3.")
    bf16: bool = Field(False, description="bf16 mixed precision.")
    offload_optimizer: bool = Field(False, description="ZeRO-Offload optimizer state to CPU (stage >= 1).")
    offload_params: bool = Field(False, description="Offload parameters to CPU (stage 3 only).")
    train_batch_size: int | None = Field(
        None, ge=1, description="Global batch; must equal batchSize x gradientAccumulation x GPUs per pod."
    )

    @model_validator(mode="after")
    def _offload(self) -> DeepSpeedSpec:
        if self.offload_params and self.zero_stage != 3:
            raise ValueError("deepspeed.offloadParams needs deepspeed.zeroStage: 3")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("deepspeed.offloadOptimizer needs deepspeed.zeroStage >= 1")
        return self


class StrategySpec(ApiModel):
    """Server-side aggregation strategy and its parameters."""

    name: str = Field(
        "fedavg",
        description="fedavg, fedprox, fedadam, fedyogi, fedadagrad or fedavgm (robust rules: aggregator.robust).",
    )
    params: dict[str, float] = Field(default_factory=dict, description="Strategy parameters (see docs).")

    @model_validator(mode="after")
    def _known(self) -> StrategySpec:
        strategy_params(self.name, self.params)
        return self

    def resolved(self) -> dict[str, float]:
        """Parameters with defaults filled in."""
        return strategy_params(self.name, self.params)


class AggregatorSpec(ApiModel):
    """How the aggregator combines updates."""

    lora_mode: Literal["average", "exact"] = Field(
        "average", description="average: A and B separately; exact: mean of B·A re-factored by truncated SVD."
    )
    robust: RobustSpec | None = Field(
        None,
        description="Byzantine-robust aggregation: a rule over the parties' deltas in place of the weighted "
        "mean (median, trimmedMean, krum, multiKrum) and/or norm bounding; the strategy steps on the result.",
    )
    cpu: str = Field("1", description="CPU request of the aggregator pod.")
    memory: str = Field("4Gi", description="Memory request of the aggregator pod.")


class PersonalizationSpec(ApiModel):
    """Personalised adapters (FedPer / FedRep): a part of the adapter that each party keeps to itself.

    The personal part trains with the rest each round but never leaves the party: its updates
    carry the shared part only, the global adapter holds the shared part only, and each party
    keeps its personal part in memory and in its own bucket between rounds.
    """

    mode: Literal["head", "keep"] = Field(
        "head",
        description="head: the classification head (peft's modules_to_save, e.g. classifier or score) is personal; "
        "keep: the adapter tensors whose names match personalization.keep are personal.",
    )
    keep: list[str] = Field(
        default_factory=list,
        description="mode keep: adapter tensor-name patterns (a substring, or a glob with * ? [...]) of the "
        "personal part. Each must match at least one tensor, and some tensor must stay shared.",
    )

    @model_validator(mode="after")
    def _patterns(self) -> PersonalizationSpec:
        if self.mode == "keep" and not self.keep:
            raise ValueError(
                "personalization.keep: mode keep needs at least one tensor-name pattern (e.g. [classifier]); "
                "or use mode: head"
            )
        if self.mode == "head" and self.keep:
            raise ValueError("personalization.keep is for mode: keep; drop it, or set personalization.mode: keep")
        if any(not p.strip() for p in self.keep):
            raise ValueError("personalization.keep: an empty pattern would match every tensor; remove it")
        return self


class PartyRef(ApiModel):
    """A Party taking part in the job."""

    name: str = Field(description="Party name.")
    namespace: str | None = Field(None, description="Party namespace; defaults to the job's.")


class FederatedJobSpec(ApiModel):
    """Desired state of a federated fine-tuning job."""

    model: ModelSpec
    peft: PeftSpec = Field(default_factory=PeftSpec)
    data: DataSchema = Field(default_factory=DataSchema)
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    deepspeed: DeepSpeedSpec = Field(default_factory=DeepSpeedSpec)
    strategy: StrategySpec = Field(default_factory=StrategySpec)
    aggregator: AggregatorSpec = Field(default_factory=AggregatorSpec)
    privacy: PrivacySpec = Field(default_factory=PrivacySpec)
    personalization: PersonalizationSpec | None = Field(
        None,
        description="Personalised adapters: a per-party part (the classification head, or tensors named by "
        "patterns) that trains locally and never leaves the party; only the rest is aggregated.",
    )
    storage: StorageSpec | None = Field(None, description="Coordinator bucket (global and final adapters).")
    rounds: int = Field(3, description="Federated rounds (at least 1).")
    min_parties: int = Field(1, description="Fewest updates a round may aggregate.")
    round_timeout_seconds: int = Field(1800, ge=5, description="Deadline for a round's updates (and its aggregation).")
    max_round_retries: int = Field(2, ge=0, description="Retries of a round that missed quorum before the job fails.")
    max_party_failures: int = Field(3, ge=1, description="Consecutive missed rounds before a party is dropped.")
    storage_outage_timeout_seconds: int = Field(
        600,
        ge=1,
        description="How long the object store may stay unreachable before the job fails. While it is, rounds "
        "pause: no retry is counted, no deadline runs and no party is blamed.",
    )
    parties: list[PartyRef] = Field(min_length=1, description="Parties that train; each must consent.")
    evaluator: PartyRef | None = Field(
        None,
        description="A Party holding a held-out test set (its eval split) that no party trains on: it evaluates "
        "every round's global adapter and never trains. Like any party it keeps the data in its own bucket and "
        "must consent.",
    )
    trainer_image: str = Field("ghcr.io/fedtune/trainer:0.1.0", description="Image of trainer and aggregator pods.")

    @model_validator(mode="after")
    def _consistent(self) -> FederatedJobSpec:
        problems = self.problems()
        if problems:
            # One line per problem: fedtune.api.errors.describe prints each under the document's name.
            raise ValueError("\n".join(problems))
        return self

    def problems(self) -> list[str]:
        """Every way the fields contradict each other or the installed libraries, each with its fix."""
        out, n = [], len(self.parties)
        if self.rounds < 1:
            out.append(f"rounds: must be at least 1 (got {self.rounds})")
        if self.min_parties < 1:
            out.append(f"minParties: must be at least 1 (got {self.min_parties})")
        elif self.min_parties > n:
            out.append(
                f"minParties ({self.min_parties}) is larger than the number of parties ({n}): "
                f"lower minParties to at most {n} or add parties"
            )
        if self.model.task == "sequence-classification" and len(self.data.labels) < 2:
            out.append("data.labels must list at least two classes for sequence-classification")
        try:
            check_peft_config(self.peft.method, self.peft.config, self.model.task, self.model.source)
        except ValueError as exc:
            out.append(f"peft: {exc}")
        ds, tr = self.deepspeed, self.training
        if ds.train_batch_size is not None:
            per_device = tr.batch_size * tr.gradient_accumulation
            if ds.train_batch_size % per_device:
                out.append(
                    f"deepspeed.trainBatchSize ({ds.train_batch_size}) must be a multiple of training.batchSize x "
                    f"training.gradientAccumulation ({tr.batch_size} x {tr.gradient_accumulation} = {per_device}); "
                    "fix one of them or drop trainBatchSize to derive it"
                )
        if ds.bf16 and self.model.dtype == "float32" and not ds.enabled:
            out.append("deepspeed.bf16 needs deepspeed.enabled: true (or set model.dtype: bfloat16)")
        if self.deepspeed.enabled and self.training.precision != "fp32":
            out.append(
                f"training.precision ({self.training.precision}) is for the plain PyTorch path; with "
                "deepspeed.enabled set deepspeed.bf16 instead (and leave precision at fp32)"
            )
        if self.model.quantization is not None:
            if self.deepspeed.enabled:
                out.append(
                    "model.quantization trains on the plain PyTorch path (one rank per GPU), not through "
                    "DeepSpeed: set deepspeed.enabled: false, or remove model.quantization"
                )
            if self.model.gguf_file:
                out.append(
                    "model.quantization: a GGUF file is already quantised and is dequantised on loading; "
                    "remove model.ggufFile or model.quantization"
                )
        out.extend(self._full_problems())
        out.extend(self._fedkseed_problems())
        out.extend(self._offsite_problems())
        robust = self.aggregator.robust
        if robust is not None:
            fewest = min(max(self.min_parties, 1), n)
            out.extend(f"aggregator.robust: {p}" for p in robust.count_problems(fewest, n))
            if (p := robust.lora_mode_problem(self.aggregator.lora_mode)) is not None:
                out.append(f"aggregator.robust: {p}")
        if self.strategy.name == "fedprox" and self.deepspeed.enabled and self.deepspeed.zero_stage == 3:
            out.append("fedprox with deepspeed.zeroStage 3 is not supported (partitioned weights); use stage <= 2")
        zero3 = self.deepspeed.enabled and self.deepspeed.zero_stage == 3
        if zero3 and self.peft.method in PROMPT_LEARNING:
            # peft saves a prompt as a tensor it computes, not as the parameter ZeRO-3 partitions, so the
            # global prompt could not be written back into the partitions each rank trains from.
            out.append(
                f"peft.method {self.peft.method} with deepspeed.zeroStage 3 is not supported (the prompt "
                "parameters are partitioned, peft saves a computed copy of them); use zeroStage <= 2 or lora"
            )
        out.extend(self._distillation_problems())
        out.extend(self._privacy_problems())
        out.extend(self._dp_sgd_problems())
        out.extend(self._secure_aggregation_problems(n))
        out.extend(self._personalization_problems())
        return out

    def _personalization_problems(self) -> list[str]:
        """Which promises a personal part would break. Which tensors it names is checked at init, by the
        parties, against the adapter they built (fedtune_trainer.personal): each pattern must match, something
        must stay shared, and no LoRA pair may be split (exact mode re-factors the shared pairs only).
        Secure aggregation, DP and robust rules see the shared part only, which is all they need."""
        pz = self.personalization
        if pz is None:
            return []
        out = []
        if pz.mode == "head" and self.model.task != "sequence-classification":
            out.append(
                f"personalization.mode: head keeps the classification head personal and model.task "
                f"{self.model.task} has none; use personalization.mode: keep with tensor-name patterns"
            )
        if self.evaluator is not None:
            out.append(
                "spec.evaluator evaluates the global adapter, which under personalization holds no personal part "
                "(each party's stays with it): drop spec.evaluator or spec.personalization"
            )
        return out

    def _full_problems(self) -> list[str]:
        if self.peft.method != FULL:
            return []
        out = []
        if self.aggregator.lora_mode == "exact":
            out.append(
                "aggregator.loraMode: exact re-factors LoRA's B·A products and peft.method: full has none (the "
                "update is the whole model): set aggregator.loraMode: average, or choose peft.method: lora"
            )
        if self.model.quantization is not None:
            out.append(
                "model.quantization with peft.method: full: quantised weights cannot be trained or averaged; "
                "remove model.quantization, or choose a PEFT method such as lora (QLoRA)"
            )
        return out

    def _fedkseed_problems(self) -> list[str]:
        """What FedKSeed's scalar exchange cannot combine with: the aggregator sums (seed, scalar) pairs into K
        per-seed accumulators, and each party replays them onto the base model on the plain PyTorch path."""
        if self.peft.method != FEDKSEED:
            return []
        why = "peft.method fedkseed exchanges (seed, scalar) pairs, not weights"
        refused = [
            (self.deepspeed.enabled, "deepspeed.enabled", "it trains on the plain PyTorch path (set it false)"),
            (self.model.quantization is not None, "model.quantization", "quantised weights cannot be perturbed"),
            (self.strategy.name != "fedavg", f"strategy {self.strategy.name}", "the accumulator is a mean (fedavg)"),
            (self.aggregator.lora_mode == "exact", "aggregator.loraMode: exact", "there are no LoRA pairs"),
            (self.aggregator.robust is not None, "aggregator.robust", why),
            (self.privacy.dp is not None, "privacy.dp", why),
            (self.privacy.dp_sgd is not None, "privacy.dpSgd", "there are no per-example gradients"),
            (self.privacy.secure_aggregation is not None, "privacy.secureAggregation", why),
            (self.personalization is not None, "spec.personalization", "every party replays the same model"),
            (
                self.training.distillation is not None,
                "training.distillation",
                "the loss is estimated, not backpropagated",
            ),
            (self.training.update_compression != "none", "training.updateCompression", "the update is a few KB"),
            (self.evaluator is not None, "spec.evaluator", "the parties evaluate the replayed model themselves"),
            (
                self.model.dtype != "float32",
                f"model.dtype {self.model.dtype}",
                f"its steps (lr·g·z, about 1e-7 at the defaults) round to zero in {self.model.dtype} weights; set "
                "model.dtype: float32",
            ),
        ]
        return [f"{field} cannot be used with peft.method fedkseed: {reason}" for bad, field, reason in refused if bad]

    def _offsite_problems(self) -> list[str]:
        """Offsite tuning needs its emulator, and refuses what its frozen, layer-dropped model cannot combine with."""
        emulator = self.model.emulator
        if self.peft.method != OFFSITE:
            if emulator is None:
                return []
            return [
                f"model.emulator is for peft.method offsite (this job's method is {self.peft.method}): remove "
                "model.emulator, or set peft.method: offsite"
            ]
        if emulator is None:
            return [
                "peft.method offsite needs model.emulator: where the emulator parties train against lies (build it "
                "from model.source with `fedtune emulator JOB.yaml`), e.g. file:///models/emulator"
            ]
        out = []
        if emulator.removeprefix("file://") == self.model.source.removeprefix("file://"):
            out.append(
                "model.emulator is model.source itself: parties would download the full model; name the emulator "
                "`fedtune emulator` builds"
            )
        why = "the emulator's adapter layers train in full on the plain PyTorch path"
        refused = [
            (self.deepspeed.enabled, "deepspeed.enabled", f"{why} (set it false)"),
            (self.model.quantization is not None, "model.quantization", "the emulator is compressed by layer dropping"),
            (self.aggregator.lora_mode == "exact", "aggregator.loraMode: exact", "there are no LoRA pairs"),
            (self.personalization is not None, "spec.personalization", "the adapter layers are shared as a whole"),
            (self.training.distillation is not None, "training.distillation", "the teacher would be a full model"),
        ]
        out.extend(
            f"{field} cannot be used with peft.method offsite: {reason}" for bad, field, reason in refused if bad
        )
        return out

    @property
    def party_model(self) -> ModelSpec:
        """The model parties load: the emulator under offsite tuning (never the full model), else model itself."""
        if self.peft.method == OFFSITE and self.model.emulator is not None:
            return self.model.model_copy(update={"source": self.model.emulator, "emulator": None})
        return self.model

    def _distillation_problems(self) -> list[str]:
        kd = self.training.distillation
        if kd is None:
            return []
        out = []
        if self.model.task != "sequence-classification":
            out.append(
                f"training.distillation supports model.task sequence-classification only (this job is "
                f"{self.model.task}): remove training.distillation"
            )
        if self.deepspeed.enabled:
            out.append(
                "training.distillation runs the teacher on the plain PyTorch path, not through DeepSpeed: set "
                "deepspeed.enabled: false, or remove training.distillation"
            )
        if kd.teacher.startswith("s3://"):
            out.append(
                f"training.distillation.teacher {kd.teacher}: s3:// teachers are not supported; ship the teacher "
                "as file:///path (in the image or a mounted volume), pkg://<package>/<dir> or hf://<repo id>"
            )
        if kd.teacher.removeprefix("file://") == self.model.source.removeprefix("file://"):
            out.append(
                "training.distillation.teacher is the base model itself (model.source): name the fine-tuned "
                "teacher checkpoint (`fedtune teacher` writes one)"
            )
        return out

    def _secure_aggregation_problems(self, n: int) -> list[str]:
        sa = self.privacy.secure_aggregation
        if sa is None:
            return []
        out, t = [], sa.resolved_threshold(n)
        if n < 2:
            out.append("privacy.secureAggregation needs at least 2 parties (one party's sum is its update)")
        elif t > n:
            out.append(
                f"privacy.secureAggregation.threshold ({t}) is larger than the number of parties ({n}): no round "
                f"could recover its sum; set it to at most {n}"
            )
        if n > MAX_PARTIES:
            out.append(
                f"privacy.secureAggregation takes at most {MAX_PARTIES} parties (a Shamir share's index is one byte) "
                f"and this job has {n}: split them into jobs of at most {MAX_PARTIES}, or drop "
                "privacy.secureAggregation"
            )
        if self.peft.method == FULL:  # fedkseed is refused by _fedkseed_problems
            out.append(
                "privacy.secureAggregation cannot be combined with peft.method full: a masked update is the whole "
                "model at 8 bytes per parameter and the aggregator holds every survivor's twice (download and "
                "vector), which exhausts its memory; choose a PEFT method such as lora, or drop "
                "privacy.secureAggregation"
            )
        # The aggregator sees only the sum: whatever needs the updates one by one cannot run on it.
        if self.aggregator.lora_mode == "exact":
            out.append(
                "privacy.secureAggregation needs aggregator.loraMode: average (exact mode multiplies each party's "
                "B and A, which the aggregator never sees apart; only their sum)"
            )
        if (robust := self.aggregator.robust) is not None:
            out.append(
                f"privacy.secureAggregation cannot be combined with aggregator.robust (rule {robust.rule}): "
                "robust rules look at every update, the aggregator sees only their sum; drop one of them"
            )
        if self.privacy.dp is not None and self.privacy.dp.mode == "central":
            out.append(
                "privacy.secureAggregation needs privacy.dp.mode: local (central mode clips each update at the "
                "aggregator, which sees only their sum); set privacy.dp.mode: local"
            )
        if self.training.update_compression != "none":
            out.append(
                f"privacy.secureAggregation sends masked integers, which do not compress: set "
                f"training.updateCompression: none (it is {self.training.update_compression})"
            )
        return out

    def _privacy_problems(self) -> list[str]:
        dp = self.privacy.dp
        if dp is None:
            return []
        out = []
        if self.aggregator.lora_mode == "exact":
            # The exact mean of B·A is not linear in the updates: the clipped sum's sensitivity bound fails.
            out.append(
                "privacy.dp needs aggregator.loraMode: average (exact mode re-factors products of the updates, "
                "so the noise added to their sum would not bound what one party's update changes)"
            )
        robust = self.aggregator.robust
        if dp.mode == "central" and robust is not None:
            # The noise is calibrated to the clipped sum, which a robust rule replaces. Local noise is added before
            # the aggregator sees anything, so any rule after it is post-processing.
            out.append(
                f"privacy.dp mode central cannot be combined with aggregator.robust (rule {robust.rule}): the noise "
                "is calibrated to the clipped sum, which a robust rule replaces; use privacy.dp.mode: local, or drop "
                "aggregator.robust (privacy.dp.clipNorm already bounds every update's norm)"
            )
        problem = budget_problem(dp)
        if problem:
            out.append(problem)
        return out

    def _dp_sgd_problems(self) -> list[str]:
        """What Opacus' per-example gradients cannot train (the plain PyTorch path, one step per batch)."""
        if self.privacy.dp_sgd is None:
            return []
        out, tr = [], self.training
        if tr.distillation is not None:
            out.append(
                "privacy.dpSgd cannot be combined with training.distillation: DP-SGD's clipped per-example "
                "gradients take no teacher term; drop one of them"
            )
        if self.deepspeed.enabled:
            out.append(
                "privacy.dpSgd cannot be combined with deepspeed.enabled: Opacus wraps a plain PyTorch optimizer, "
                "not a DeepSpeed engine; set deepspeed.enabled: false or drop privacy.dpSgd"
            )
        if self.model.quantization is not None:
            out.append(
                "privacy.dpSgd cannot be combined with model.quantization: bitsandbytes layers have no per-example "
                "gradients; remove model.quantization or privacy.dpSgd"
            )
        if tr.gradient_accumulation != 1:
            out.append(
                f"privacy.dpSgd samples one Poisson batch per optimizer step: set training.gradientAccumulation: 1 "
                f"(it is {tr.gradient_accumulation}) and raise training.batchSize instead"
            )
        if tr.precision != "fp32":
            out.append(
                f"privacy.dpSgd needs training.precision: fp32 (it is {tr.precision}): the per-example gradients "
                "are clipped without loss scaling or autocast"
            )
        if tr.gradient_checkpointing:
            out.append(
                "privacy.dpSgd cannot be combined with training.gradientCheckpointing: recomputing the forward "
                "pass would record every layer's activations twice for the per-example gradients"
            )
        return out

    @property
    def peft_task_type(self) -> str:
        return TASK_TYPES[self.model.task]

    def world_size(self, gpus_per_pod: int) -> int:
        """Processes of a party's trainer pod: one per GPU (plain PyTorch or DeepSpeed alike), one for CPU parties."""
        return max(1, gpus_per_pod)

    def global_batch(self, gpus_per_pod: int) -> int:
        """micro x accumulation x world of a party with `gpus_per_pod` GPUs; ValueError when that party
        cannot train the job (deepspeed.trainBatchSize differs)."""
        world = self.world_size(gpus_per_pod)
        derived = self.training.batch_size * self.training.gradient_accumulation * world
        want = self.deepspeed.train_batch_size
        if want is not None and want != derived:
            raise ValueError(
                f"deepspeed.trainBatchSize ({want}) != batchSize x gradientAccumulation x world "
                f"({self.training.batch_size} x {self.training.gradient_accumulation} x {world} = {derived}) "
                f"for a party with {gpus_per_pod} GPU(s) per pod"
            )
        return derived


class FederatedJob(ApiModel):
    """The FederatedJob custom resource."""

    api_version: Literal["fedtune.io/v1alpha1"] = GROUP_VERSION
    kind: Literal["FederatedJob"] = "FederatedJob"
    metadata: ObjectMeta
    spec: FederatedJobSpec
    status: FederatedJobStatus | None = None

    @model_validator(mode="after")
    def _no_duplicate_parties(self) -> FederatedJob:
        seen: set[str] = set()
        for i, ref in enumerate(self.spec.parties):
            key = self.party_key(ref)
            if key in seen:
                raise ValueError(f"spec.parties[{i}]: party {key} is listed twice; list each party once")
            seen.add(key)
        if self.spec.evaluator is not None and self.evaluator_key in seen:
            raise ValueError(
                f"spec.evaluator: party {self.evaluator_key} also trains (spec.parties); the held-out test set "
                "must belong to a party that never trains: name another Party"
            )
        return self

    def party_key(self, ref: PartyRef) -> str:
        """namespace/name of a referenced Party."""
        return f"{ref.namespace or self.metadata.namespace}/{ref.name}"

    @property
    def party_keys(self) -> list[str]:
        """The parties that train."""
        return [self.party_key(r) for r in self.spec.parties]

    @property
    def evaluator_key(self) -> str | None:
        """The evaluation-only party holding the held-out test set, if the job has one."""
        return self.party_key(self.spec.evaluator) if self.spec.evaluator else None

    @property
    def member_keys(self) -> list[str]:
        """Every party with a pod and a mailbox in the job: the trainers, then the evaluator."""
        return self.party_keys + ([self.evaluator_key] if self.spec.evaluator else [])
