"""Adapter state in and out of a PeftModel, and its wire form (safetensors only, never pickle)."""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import torch


def adapter_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors under peft's saved names, as contiguous CPU copies (safe to keep)."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in get_peft_model_state_dict(model).items()}


def load_adapter_state(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Overwrite the adapter with `tensors`; any missing, unexpected or mis-shaped key is an error.

    A silent partial load would train from a mix of global and stale local weights.
    """
    from peft import set_peft_model_state_dict

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
    with torch.no_grad():
        set_peft_model_state_dict(model, tensors)


def adapter_state_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the adapter state this model saves and accepts."""
    from peft import get_peft_model_state_dict

    return {k: tuple(v.shape) for k, v in get_peft_model_state_dict(model).items()}


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
