"""Base model loading, base-model fingerprints and PEFT wrapping for party trainers.

Every party must start from bit-identical weights: the base checkpoint is the same file, and
anything initialised at random (a new classification head, the adapter) is drawn from the job's
seed. `fingerprint` lets the control plane check that parties really agree.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from fedtune.api.job import DataSchema, ModelSpec, PeftSpec
from fedtune.api.methods import FEDKSEED, FULL, OFFSITE, PEFT_METHODS, TASK_TYPES
from fedtune.api.support import UNSUPPORTED, cannot_train, first_forward, local_model_dir

from fedtune_trainer import transfer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Classification heads stay unquantised: they are new, trained and federated (peft's modules_to_save);
# transformers would quantise some (BERT's classifier) like any other linear layer.
HEADS = ("classifier", "score", "pre_classifier")
_SAMPLE_ELEMENTS = 1024  # per tensor: enough to tell checkpoints apart, cheap on billions of weights


def cache_root() -> Path:
    """Where downloaded models live: $FEDTUNE_CACHE or ~/.cache/fedtune."""
    return Path(os.environ.get("FEDTUNE_CACHE") or Path.home() / ".cache" / "fedtune")


def resolve_source(model: ModelSpec, model_files: dict[str, str] | None = None) -> Path | str:
    """A local directory holding the model, or (hf:// only) a hub repo id for from_pretrained.

    s3:// sources are read through the presigned URLs in `model_files` (relative path -> URL),
    downloaded once into the cache.
    """
    src = model.source
    if src.startswith("hf://"):
        return src[len("hf://") :]
    if src.startswith("s3://"):
        return _download_model(src, model_files or {})
    return local_model_dir(src)


def _download_model(src: str, files: dict[str, str]) -> Path:
    if not files:
        raise ValueError(f"model source {src}: the ticket carries no modelFiles URLs to read it with")
    target = cache_root() / "models" / hashlib.sha256(src.encode()).hexdigest()[:16]
    for rel, url in sorted(files.items()):
        parts = PurePosixPath(rel).parts
        # The file list comes from the control plane, but a path must never escape the cache.
        if not parts or rel.startswith("/") or ".." in parts:
            raise ValueError(f"model source {src}: refusing file path {rel!r}")
        dest = target.joinpath(*parts)
        if dest.exists():
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".part")
        tmp.write_bytes(transfer.get(url))
        os.replace(tmp, dest)  # a crash mid-download must not leave a truncated file that looks complete
    return target


def load_base_model(
    model: ModelSpec,
    data: DataSchema,
    seed: int,
    model_files: dict[str, str] | None = None,
    dtype: str | None = None,
    device: torch.device | None = None,
) -> tuple[torch.nn.Module, Any]:
    """Load (model, tokenizer) for the job's task; `dtype` overrides model.dtype (e.g. DeepSpeed bf16).

    With a CUDA `device` a causal LM loads straight onto it, so host memory holds one shard at a
    time rather than the whole model. A quantised model (model.quantization) is quantised while it
    loads, onto `device` (default: CPU), and must not move afterwards."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    where = resolve_source(model, model_files)
    kwargs: dict[str, Any] = {"dtype": DTYPES[dtype or model.dtype]}
    if model.gguf_file:
        kwargs["gguf_file"] = model.gguf_file
    if model.quantization is not None:
        kwargs.update(_quantized(model, device or torch.device("cpu")))
    elif device is not None and device.type == "cuda" and model.task == "causal-lm":
        # Not for classifiers: their new head is drawn where it is built, and the CPU's seeded draw
        # is what lets a GPU party and a CPU party agree on it (the base-model fingerprint).
        kwargs["device_map"] = {"": device}
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, **({"gguf_file": model.gguf_file} if model.gguf_file else {}))
        # Seed before building: a freshly initialised head must be the same on every party.
        torch.manual_seed(seed)
        if model.task == "sequence-classification":
            labels = list(data.labels)
            # id2label fixes the label count; a checkpoint whose head has another count gets a
            # new (seeded) head instead of an error: the head is trained and federated anyway.
            net = AutoModelForSequenceClassification.from_pretrained(
                where,
                id2label=dict(enumerate(labels)),
                label2id={name: i for i, name in enumerate(labels)},
                ignore_mismatched_sizes=True,
                **kwargs,
            )
        else:
            net = AutoModelForCausalLM.from_pretrained(where, **kwargs)
    except OSError as exc:
        if isinstance(where, str):
            raise OSError(
                f"cannot load {model.source}: hf:// needs a reachable Hugging Face hub or a filled HF cache "
                f"({exc}); ship the model with pkg://, file:// or s3:// instead"
            ) from None
        raise
    if tokenizer.pad_token is None:
        # Decoder-only tokenizers often have no pad token; padding is masked out anyway.
        if tokenizer.eos_token is None:
            raise ValueError(f"tokenizer of {model.source} has neither a pad nor an eos token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    net.config.pad_token_id = tokenizer.pad_token_id
    if model.quantization is not None:
        _keep_cpu_4bit_unpacked(net)
    return net, tokenizer


def _keep_cpu_4bit_unpacked(net: torch.nn.Module) -> None:
    """Turn off bitsandbytes' repacking of 4-bit weights for its AVX512-BF16 CPU kernel.

    On CPUs with AVX512-BF16 a Linear4bit evaluated without gradients rewrites its stored weight into
    another packing for an optimised kernel. That breaks what fedtune relies on: the frozen base's
    bytes stay as loaded (its fingerprint, a party's evaluation between training rounds), and it fails
    outright on a layer narrower than one quantisation block (absmax reshaped to (out, in // 64)).
    Every other CPU takes the generic path; with this, these CPUs do too. GPUs are unaffected.
    """
    for module in net.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def _quantized(model: ModelSpec, device: torch.device) -> dict[str, Any]:
    """from_pretrained arguments that quantise the base model onto `device` (refused where bitsandbytes cannot)."""
    from fedtune.api.quantization import cannot_run
    from transformers import BitsAndBytesConfig

    problem = cannot_run(device.type)
    if problem:
        raise ValueError(problem)
    options = model.quantization.bnb_kwargs()
    if "bnb_4bit_compute_dtype" in options:
        options["bnb_4bit_compute_dtype"] = DTYPES[options["bnb_4bit_compute_dtype"]]
    if model.task == "sequence-classification":
        # Only for classifiers: the list replaces transformers' own, which keeps a causal LM's
        # (often tied) output embeddings unquantised.
        options["llm_int8_skip_modules"] = list(HEADS)
    config = BitsAndBytesConfig(**options)
    return {"quantization_config": config, "device_map": {"": device}}


def is_quantized(model: torch.nn.Module) -> bool:
    """Whether bitsandbytes holds the (base) model's weights: it must not be moved or cast."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return bool(getattr(base, "is_quantized", False) or getattr(base, "quantization_method", None))


def fingerprint(model: torch.nn.Module) -> str:
    """sha256 over the config, every tensor's (name, shape, dtype) and a strided sample of its values.

    Call it on the base model before PEFT wraps it. Parties with a different checkpoint, head
    initialisation or dtype get different fingerprints; a single edited element may go unseen.
    """
    h = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None:
        doc = config.to_dict()
        for volatile in ("_name_or_path", "transformers_version", "_commit_hash"):
            doc.pop(volatile, None)  # where it was loaded from is not what it is
        h.update(json.dumps(doc, sort_keys=True, default=str).encode())
    state = model.state_dict()
    for name in sorted(state):
        tensor = state[name].detach()
        h.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}\n".encode())
        flat = tensor.reshape(-1)
        if flat.numel() > _SAMPLE_ELEMENTS:
            # Integer strides: a float32 linspace rounds past the end on tensors of ~10M+ elements.
            flat = flat[
                torch.arange(_SAMPLE_ELEMENTS, dtype=torch.int64) * (flat.numel() - 1) // (_SAMPLE_ELEMENTS - 1)
            ]
        h.update(flat.contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def apply_peft(
    model: torch.nn.Module, peft: PeftSpec, task: str, seed: int, device: torch.device | None = None
) -> torch.nn.Module:
    """Wrap the base model with the job's PEFT method; the adapter init is drawn from `seed`.

    With `device` the wrapped model moves there before its one-batch check runs (on the GPU, not the CPU)."""
    if peft.method in (FULL, FEDKSEED):  # FedKSeed tunes every weight too (by zeroth-order steps)
        return _full(model, peft.method, task, device)
    if peft.method == OFFSITE:
        return _offsite(model, peft, task, device)
    from peft import get_peft_model
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    if peft.method not in PEFT_METHODS:
        raise ValueError(f"unknown PEFT method {peft.method!r}; choose one of: {', '.join(sorted(PEFT_METHODS))}")
    config = PEFT_TYPE_TO_CONFIG_MAPPING[PEFT_METHODS[peft.method]](task_type=TASK_TYPES[task], **peft.config)
    quantized = is_quantized(model)
    if quantized:
        from peft import prepare_model_for_kbit_training

        # Freezes the base and casts its unquantised weights (norms, embeddings) to float32 for stable
        # training. Checkpointing is switched on (non-reentrant, which needs no gradient on the
        # inputs) by enable_gradient_checkpointing when the job asks for it.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    torch.manual_seed(seed)
    wrapped = get_peft_model(model, config)
    if device is not None and not quantized:  # a quantised model was loaded onto its device
        wrapped.to(device)
    _check_state_covers_trainable(wrapped, peft.method)
    _check_forward(wrapped, peft.method, task)
    return wrapped


def _full(model: torch.nn.Module, method: str, task: str, device: torch.device | None) -> torch.nn.Module:
    """Full fine-tuning: the model itself, every parameter trainable (its whole state is the "adapter")."""
    if is_quantized(model):
        raise ValueError("peft.method full cannot train a quantised model: remove model.quantization")
    for p in model.parameters():
        p.requires_grad_(True)
    if device is not None:
        model.to(device)
    _check_forward(model, method, task)
    return model


def _offsite(model: torch.nn.Module, peft: PeftSpec, task: str, device: torch.device | None) -> torch.nn.Module:
    """Offsite tuning: the emulator itself, its adapter layers (and a classifier's head) trainable, the rest frozen."""
    from fedtune.api.offsite import offsite_params

    from fedtune_trainer.offsite import mark_trainable

    if is_quantized(model):
        raise ValueError("peft.method offsite cannot train a quantised model: remove model.quantization")
    mark_trainable(model, offsite_params(peft.config))
    if device is not None:
        model.to(device)
    _check_forward(model, peft.method, task)
    return model


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Recompute activations in the backward pass (training.gradientCheckpointing).

    Non-reentrant checkpointing: it needs no gradient on the inputs (the frozen embeddings of a
    PEFT model have none) and restores the RNG state, so dropout masks, the loss and the gradients
    are those of a plain backward pass.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not getattr(base, "supports_gradient_checkpointing", False):
        raise ValueError(
            f"training.gradientCheckpointing: {type(base).__name__} does not support gradient checkpointing; "
            "set it to false"
        )
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if getattr(base.config, "use_cache", None):
        base.config.use_cache = False  # a cache is of no use when training, and conflicts with recomputation


def _check_forward(model: torch.nn.Module, method: str, task: str) -> None:
    """One forward pass on a dummy batch: a method the libraries cannot run on this model fails at init.

    (Prefix tuning, for one, fails only once a batch goes through the model; without this check
    that would be round 1, after every party loaded the model and the initial adapter was shared.)
    """
    training = model.training
    model.eval()  # no dropout: the check must not draw from the seeded generator training uses
    try:
        first_forward(model)
    except UNSUPPORTED as exc:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        raise ValueError(cannot_train(method, type(base).__name__, task, exc)) from None
    finally:
        model.train(training)


def _check_state_covers_trainable(model: torch.nn.Module, method: str) -> None:
    """Refuse methods whose trained weights peft does not save: they cannot be federated.

    (p_tuning trains a prompt encoder but saves only its output, so parties would average
    something they do not train from.)
    """
    from peft import get_peft_model_state_dict

    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    saved = sum(t.numel() for t in get_peft_model_state_dict(model).values())
    if trained != saved:
        raise ValueError(
            f"PEFT method {method!r} trains {trained} values but its saved adapter holds {saved}: "
            "what parties train would not be what they exchange; choose another method (e.g. prompt_tuning)"
        )
