"""Adapter state in and out of a PeftModel, and its wire form (safetensors only, never pickle).

Under full fine-tuning (peft.method full) the model is no PeftModel and its "adapter" is every
parameter, under the names `named_parameters` gives: a weight tied to another (a causal LM's
output embeddings) appears once, under its first name, as transformers' own saving does. Under
offsite tuning it is the emulator's parameters that train (its adapter layers and head).

Under DeepSpeed ZeRO-3 the adapter's parameters may be partitioned across the pod's ranks
(fedtune_trainer.engines): reading and loading then gather them, and every rank must call.
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import torch

from fedtune_trainer.engines import gathered


def is_full(model: torch.nn.Module) -> bool:
    """Whether `model` is fully fine-tuned (no PEFT wrapping): all of its parameters are the adapter."""
    return not hasattr(model, "peft_config")


def _adapter_parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """peft's saved names -> the model's own tensors (the parameters themselves, ZeRO-3's marks included).

    Unwrapped (full fine-tuning, FedKSeed, offsite tuning): every parameter that trains, each tied one once
    (named_parameters removes duplicates): all of them, or offsite's adapter layers and head."""
    if is_full(model):
        return {name: p for name, p in model.named_parameters() if p.requires_grad}
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(model, state_dict=model.state_dict(keep_vars=True))


def adapter_state(model: torch.nn.Module, like: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The adapter's tensors under peft's saved names, as contiguous CPU copies (safe to keep).

    With `like` (the global adapter) each tensor comes in its dtype there: an update keeps the
    wire format, which ZeRO-3 with bf16 does not (it partitions every weight in bf16, the
    adapter's too). Every rank calls this when the adapter may be ZeRO-3-partitioned: the tensors
    are gathered.
    """
    own = _adapter_parameters(model)
    with gathered(own.values()):
        return {
            k: v.detach().to("cpu", like[k].dtype if like else v.dtype, copy=True).contiguous() for k, v in own.items()
        }


def check_adapter_state(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """ValueError unless `tensors` has exactly this model's adapter keys and shapes.

    A silent partial load would train from a mix of global and stale local weights.
    """
    expected = adapter_state_shapes(model)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(
            "adapter does not match this model: "
            + (f"missing {len(missing)} key(s) e.g. {missing[:3]}; " if missing else "")
            + (f"unexpected {len(unexpected)} key(s) e.g. {unexpected[:3]}" if unexpected else "")
        )
    bad = [
        f"{k}: {tuple(tensors[k].shape)} != {shape}"
        for k, shape in expected.items()
        if tuple(tensors[k].shape) != shape
    ]
    if bad:
        raise ValueError(f"adapter shapes do not match this model: {'; '.join(bad[:3])}")


def load_adapter_state(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Overwrite the adapter with `tensors`; any missing, unexpected or mis-shaped key is an error.

    Every rank calls this with the same tensors when the adapter may be ZeRO-3-partitioned: the
    parameters are gathered, written, and re-partitioned (a write to a partitioned parameter
    outside that would miss the slices the next engine's optimiser starts from). The check comes
    first, so every rank fails it alike before any collective.
    """
    check_adapter_state(model, tensors)
    own = _adapter_parameters(model)
    with gathered(own.values(), modify=True), torch.no_grad():
        if is_full(model):
            for name, param in own.items():
                param.copy_(tensors[name])  # into the parameter itself: what is tied to it follows
        else:
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(model, tensors)


def adapter_state_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the adapter state this model saves and accepts (a partitioned tensor's whole shape)."""
    return {k: tuple(getattr(v, "ds_shape", v.shape)) for k, v in _adapter_parameters(model).items()}


def to_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    """Serialise a name -> tensor dict as safetensors."""
    from safetensors.torch import save

    return save({k: v.detach().cpu().contiguous() for k, v in tensors.items()})


def from_bytes(data: bytes) -> dict[str, torch.Tensor]:
    """Parse safetensors bytes (refuses anything else, including pickles)."""
    from safetensors.torch import load

    try:
        return load(data)
    except Exception as exc:  # safetensors raises its own error types; give one readable message
        raise ValueError(f"not a valid safetensors adapter ({len(data)} bytes): {exc}") from None


def adapter_config_json(model: torch.nn.Module, base_model: str | None = None, adapter_name: str = "default") -> bytes:
    """adapter_config.json as PeftModel.save_pretrained writes it, so PeftModel.from_pretrained loads it.

    `base_model` replaces base_model_name_or_path, which peft fills with the directory this process
    loaded the model from: meaningless on any other machine (ModelSpec.portable_name).
    """
    config = copy.deepcopy(model.peft_config[adapter_name])
    config.inference_mode = True  # save_pretrained stores the config for loading, not training
    if base_model is not None:
        config.base_model_name_or_path = base_model
    with tempfile.TemporaryDirectory() as tmp:
        # peft's own writer keeps the format (sets, enums, version fields) exactly as peft reads it back.
        config.save_pretrained(tmp)
        return (Path(tmp) / "adapter_config.json").read_bytes()


def model_files_bundle(model: torch.nn.Module, tokenizer: object) -> bytes:
    """Full fine-tuning: the bundle of the final model's files but its weights (fedtune.api.full_export).

    config.json (and generation_config.json) as save_pretrained writes them, and the tokenizer's
    files as the party loaded it (its pad token included), so that the final directory, with the
    last global as model.safetensors, loads with from_pretrained like any transformers model.
    """
    from fedtune.api.full_export import pack

    with tempfile.TemporaryDirectory() as tmp:
        model.config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None and model.can_generate():
            model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        return pack({p.name: p.read_bytes() for p in sorted(Path(tmp).iterdir()) if p.is_file()})
