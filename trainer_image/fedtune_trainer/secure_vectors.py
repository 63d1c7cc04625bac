"""An adapter as the one vector secure aggregation masks, and back (pure: torch and numpy, no I/O).

A party's delta is its adapter minus the global it started from, every floating tensor flattened in
the global's sorted name order and concatenated (float64). The masked upload is a safetensors file
holding one uint64 tensor, MASKED, of that length; the aggregator reads it back against the global
it holds, so names, shapes and dtypes come from the global and never travel again.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from safetensors.numpy import load as load_numpy
from safetensors.numpy import save as save_numpy

MASKED = "secure_aggregation.masked"


def layout(global_prev: Mapping[str, torch.Tensor]) -> list[str]:
    """The names in vector order; an adapter with a non-floating tensor cannot be masked (it would not average)."""
    names = sorted(global_prev)
    fixed = [n for n in names if not global_prev[n].is_floating_point()]
    if fixed:
        raise ValueError(f"secure aggregation masks floating tensors only; the adapter holds {fixed[0]!r} and more")
    return names


def delta_vector(global_prev: Mapping[str, torch.Tensor], update: Mapping[str, torch.Tensor]) -> np.ndarray:
    """update − global over every tensor, as one float64 vector in `layout` order."""
    parts = [
        (update[n].detach().to("cpu", torch.float64) - global_prev[n].to("cpu", torch.float64)).reshape(-1).numpy()
        for n in layout(global_prev)
    ]
    return np.concatenate(parts) if parts else np.zeros(0)


def length(global_prev: Mapping[str, torch.Tensor]) -> int:
    return sum(global_prev[n].numel() for n in layout(global_prev))


def add_delta(global_prev: Mapping[str, torch.Tensor], delta: np.ndarray) -> dict[str, torch.Tensor]:
    """global + delta (a vector in `layout` order), each tensor back in the global's shape and dtype."""
    out, at = {}, 0
    for n in layout(global_prev):
        g = global_prev[n]
        piece = torch.from_numpy(np.ascontiguousarray(delta[at : at + g.numel()])).reshape(g.shape)
        out[n] = (g.to(torch.float64) + piece).to(g.dtype)
        at += g.numel()
    if at != delta.size:
        raise ValueError(f"the unmasked sum has {delta.size} values, the global adapter {at}")
    return out


def to_bytes(masked: np.ndarray) -> bytes:
    return save_numpy({MASKED: np.ascontiguousarray(masked, dtype=np.uint64)})


def from_bytes(raw: bytes, expected: int, source: str) -> np.ndarray:
    """The masked vector of an upload: one uint64 tensor of the expected length, or ValueError naming `source`."""
    try:
        tensors = load_numpy(raw)
    except Exception as exc:  # safetensors raises its own errors for anything that is not its format
        raise ValueError(f"{source}: not a safetensors file ({exc})") from None
    vec = tensors.get(MASKED)
    if set(tensors) != {MASKED} or vec is None or vec.dtype != np.uint64 or vec.shape != (expected,):
        got = {k: (str(v.dtype), v.shape) for k, v in list(tensors.items())[:3]}
        raise ValueError(
            f"{source}: a masked update holds one uint64 tensor {MASKED!r} of {expected} values, not {got}"
        )
    return vec
