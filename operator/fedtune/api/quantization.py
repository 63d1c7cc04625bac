"""Quantised base models (QLoRA): the spec, what it asks of bitsandbytes, and whether it can run here.

The base model's linear layers are stored in 4 or 8 bits by bitsandbytes and stay frozen; only the
adapter trains, in float32, and only the adapter travels. Every party quantises the same checkpoint
with the same settings, so their base-model fingerprints still agree.

This module imports nothing heavy: the control plane validates the spec, the trainer builds the
transformers config from `bnb_kwargs` and asks `cannot_run` before loading.
"""

from __future__ import annotations

import importlib.util
from typing import Any, Literal

from pydantic import Field, model_validator

from fedtune.api.base import ApiModel

# Bytes a stored weight takes: 4-bit keeps one absmax per 64 weights (float32, or 8 bits plus a
# second-level float32 per 256 blocks with double quantisation); 8-bit one float32 scale per row.
_WEIGHT_BYTES = {"float32": 4.0, "bfloat16": 2.0, 8: 1.0 + 4 / 4096, 4: 0.5 + 4 / 64}
_DOUBLE_QUANT_4BIT = 0.5 + 1 / 64 + 4 / (64 * 256)


class QuantizationSpec(ApiModel):
    """bitsandbytes quantisation of the frozen base model (QLoRA with bits: 4)."""

    bits: Literal[4, 8] = Field(description="4 (QLoRA: NF4/FP4 blocks) or 8 (LLM.int8()).")
    quant_type: Literal["nf4", "fp4"] | None = Field(
        None, description="4-bit data type: nf4 (default; normal-float, the QLoRA paper's) or fp4. 4-bit only."
    )
    double_quant: bool | None = Field(
        None, description="Quantise the 4-bit block scales too (about 0.4 bits per weight saved; default true)."
    )
    compute_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "bfloat16", description="dtype the quantised layers compute in (weights are dequantised to it)."
    )

    @model_validator(mode="after")
    def _four_bit_only(self) -> QuantizationSpec:
        if self.bits == 8:
            extra = [name for name, v in (("quantType", self.quant_type), ("doubleQuant", self.double_quant)) if v]
            if extra:
                raise ValueError(
                    f"model.quantization.{extra[0]} applies to 4-bit quantisation only: remove it or set bits: 4"
                )
        return self

    def bnb_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of transformers.BitsAndBytesConfig (compute dtype by name)."""
        if self.bits == 8:
            return {"load_in_8bit": True}
        return {
            "load_in_4bit": True,
            "bnb_4bit_quant_type": self.quant_type or "nf4",
            "bnb_4bit_use_double_quant": True if self.double_quant is None else self.double_quant,
            "bnb_4bit_compute_dtype": self.compute_dtype,
        }

    def weight_bytes(self) -> float:
        """Bytes one quantised weight takes in memory, scales included."""
        if self.bits == 4 and self.double_quant is not False:
            return _DOUBLE_QUANT_4BIT
        return _WEIGHT_BYTES[self.bits]


def weight_bytes(dtype: str, quantization: QuantizationSpec | None) -> float:
    """Bytes per base-model weight: the quantised size when quantised, else the dtype's."""
    return quantization.weight_bytes() if quantization else _WEIGHT_BYTES[dtype]


def cannot_run(device_type: str) -> str | None:
    """Why bitsandbytes cannot quantise on `device_type` ("cuda" or "cpu") here, or None when it can.

    Not only "is it installed": a CPU-only machine needs a bitsandbytes with its CPU backend (0.46+),
    so one small tensor is quantised and dequantised on the device to find out.
    """
    fix = "remove model.quantization, or give the party a GPU"
    if importlib.util.find_spec("bitsandbytes") is None:
        return f"model.quantization needs bitsandbytes, not installed here: pip install 'fedtune[qlora]' or {fix}"
    try:
        import bitsandbytes.functional as bnbf
        import torch

        probe = torch.linspace(-1, 1, 128, device=device_type)
        packed, state = bnbf.quantize_4bit(probe, quant_type="nf4")
        back = bnbf.dequantize_4bit(packed, state)
    except Exception as exc:  # noqa: BLE001 - any failure means: it cannot run here
        why = f"{type(exc).__name__}: {exc}"
        return f"model.quantization: bitsandbytes cannot quantise on {device_type} here ({why}); {fix}"
    if not torch.allclose(back.float(), probe, atol=0.2):
        return f"model.quantization: bitsandbytes' 4-bit round trip on {device_type} is wrong here; {fix}"
    return None


def cannot_run_here() -> str | None:
    """`cannot_run` for the device a trainer on this machine would use (CUDA when there is one)."""
    if importlib.util.find_spec("torch") is None:
        return "model.quantization needs torch and bitsandbytes, which are not installed here"
    import torch

    return cannot_run("cuda" if torch.cuda.is_available() else "cpu")
