"""Compressed adapter updates: what a party may upload instead of full-precision tensors.

Modes (`training.updateCompression`):

- `none`: the adapter as it is (safetensors, no metadata): byte-identical to uncompressed uploads.
- `bf16`: every floating tensor cast to bfloat16 (half the bytes of float32; relative rounding
  error at most 2⁻⁸ ≈ 3.9e-3).
- `int8`: symmetric int8 quantisation with float32 scales. A tensor `name` is stored as int8
  `name` plus float32 `name.__scale__`, whose shape broadcasts against it: one scale per row or
  per column of a matrix, whichever needs fewer (for LoRA, one per rank component of both A
  and B), and a single scale for vectors and scalars. value ≈ int8 × scale, error at most
  scale/2 = max|slice|/254 (about a quarter of the float32 bytes).

Updates are self-describing: compressed files carry the safetensors metadata
`{"fedtune.compression": "<mode>"}`, so the aggregator needs no ticket field to decode them.
Decoding restores the reference (global adapter) dtypes; the caller then verifies names,
shapes, dtypes and finite values on the decoded tensors, so strategies only ever see
full-precision tensors. Everything is safetensors (a JSON header and raw buffers), never pickle.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Container, Iterable, Mapping

import torch
from safetensors.torch import save as save_safetensors

MODES = ("none", "bf16", "int8")
METADATA_KEY = "fedtune.compression"
SCALE_SUFFIX = ".__scale__"
_QMAX = 127  # symmetric: -127..127, so 0 is exact and the range is the same on both sides


class CompressionError(ValueError):
    """Bytes that claim a compression this module cannot decode, or decode inconsistently."""


def encode(tensors: Mapping[str, torch.Tensor], mode: str = "none") -> bytes:
    """safetensors bytes of `tensors` compressed with `mode` (see the module docstring)."""
    if mode not in MODES:
        raise ValueError(f"unknown update compression {mode!r}; choose one of: {', '.join(MODES)}")
    clashing = sorted(k for k in tensors if k.endswith(SCALE_SUFFIX))
    if clashing and mode == "int8":
        raise ValueError(f"tensor name {clashing[0]} ends with {SCALE_SUFFIX}, which int8 compression reserves")
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        t = t.detach().cpu()
        if mode == "bf16" and t.is_floating_point():
            t = t.to(torch.bfloat16)
        elif mode == "int8" and t.is_floating_point():
            t, out[name + SCALE_SUFFIX] = quantize_int8(t)
        out[name] = t.contiguous()
    return save_safetensors(out, metadata=None if mode == "none" else {METADATA_KEY: mode})


def quantize_int8(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 values, float32 scales broadcastable to t) with t ≈ values × scales."""
    x = t.to(torch.float32)
    if x.numel() == 0:
        return x.to(torch.int8), torch.zeros(())
    if x.dim() >= 2:
        # Reduce over every dimension but the first or the last, whichever is shorter: one scale
        # per row or per column, the fewer scales the better for narrow (LoRA) matrices.
        keep = 0 if x.shape[0] <= x.shape[-1] else x.dim() - 1
        dims = tuple(d for d in range(x.dim()) if d != keep)
        amax = x.abs().amax(dim=dims, keepdim=True)
    else:
        amax = x.abs().amax()
    scale = amax / _QMAX
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))  # all-zero slices stay exactly zero
    q = torch.round(x / safe).clamp_(-_QMAX, _QMAX).to(torch.int8)
    return q, scale.to(torch.float32).contiguous()


def read_metadata(data: bytes) -> dict[str, str]:
    """The `__metadata__` of safetensors bytes (empty when absent); CompressionError if unreadable."""
    try:
        (size,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + size])
        meta = header.get("__metadata__") or {}
    except (struct.error, ValueError, AttributeError) as exc:
        raise CompressionError(f"unreadable safetensors header ({exc})") from None
    if not isinstance(meta, dict):
        raise CompressionError("safetensors __metadata__ is not a mapping")
    return {str(k): str(v) for k, v in meta.items()}


def mode_of(metadata: Mapping[str, str]) -> str:
    """The compression a file's metadata declares ("none" when it declares none)."""
    mode = metadata.get(METADATA_KEY, "none")
    if mode not in MODES:
        raise CompressionError(f"unknown compression {mode!r} in its metadata (known: {', '.join(MODES)})")
    return mode


def payload_names(names: Iterable[str], mode: str) -> list[str]:
    """The tensor names a file compressed with `mode` decodes to: int8 scales fold into their tensors.

    Raises CompressionError for a scale without its quantised tensor.
    """
    names = list(names)
    if mode != "int8":
        return names
    scaled = {n[: -len(SCALE_SUFFIX)] for n in names if n.endswith(SCALE_SUFFIX)}
    orphans = sorted(scaled - set(names))
    if orphans:
        raise CompressionError(f"int8 scale {orphans[0]}{SCALE_SUFFIX} has no quantised tensor {orphans[0]}")
    return [n for n in names if not n.endswith(SCALE_SUFFIX)]


def _target(name: str, dtypes: Mapping[str, torch.dtype] | None) -> torch.dtype:
    # The global adapter's dtype; float32 for names it lacks (which verification then refuses anyway).
    want = (dtypes or {}).get(name, torch.float32)
    return want if want.is_floating_point else torch.float32


def decoded_dtype(
    name: str, stored: torch.dtype, names: Container[str], mode: str, dtypes: Mapping[str, torch.dtype] | None
) -> torch.dtype:
    """The dtype `decode_tensor` gives tensor `name`, stored as `stored` among `names` (no data read)."""
    if mode == "none":
        return stored
    if stored.is_floating_point or (mode == "int8" and name + SCALE_SUFFIX in names):
        return _target(name, dtypes)
    return stored


def decode_tensor(
    name: str, stored: Mapping[str, torch.Tensor], mode: str, dtypes: Mapping[str, torch.dtype] | None = None
) -> torch.Tensor:
    """Full-precision tensor `name` of a file compressed with `mode`, whose tensors `stored` holds.

    Reads `name` (and its int8 scale) only, so a lazily loaded file is decoded one tensor at a time.
    """
    t = stored[name]
    if mode == "none":
        return t
    if mode == "int8" and name + SCALE_SUFFIX in stored:
        return _dequantize(name, t, stored[name + SCALE_SUFFIX]).to(_target(name, dtypes))
    if t.is_floating_point():
        return t.to(_target(name, dtypes))
    return t  # integer tensors travel as they are


def decode(
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str],
    dtypes: Mapping[str, torch.dtype] | None = None,
) -> dict[str, torch.Tensor]:
    """Full-precision tensors from parsed safetensors `tensors` and their file's `metadata`.

    Floating tensors of a compressed file are cast to `dtypes[name]` (the global adapter's dtype;
    float32 for names it lacks, which verification then refuses anyway). Uncompressed files
    are returned unchanged. Raises CompressionError for an inconsistent int8 encoding.
    """
    mode = mode_of(metadata)
    return {name: decode_tensor(name, tensors, mode, dtypes) for name in payload_names(tensors, mode)}


def _dequantize(name: str, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    if q.dtype != torch.int8:
        raise CompressionError(f"tensor {name} has an int8 scale but dtype {str(q.dtype).removeprefix('torch.')}")
    if scale.dtype != torch.float32:
        raise CompressionError(f"int8 scale of {name} has dtype {str(scale.dtype).removeprefix('torch.')}, not float32")
    lead = q.dim() - scale.dim()
    fits = lead >= 0 and all(s in (1, n) for s, n in zip(scale.shape, q.shape[lead:]))
    if not fits:  # the product must keep the values' shape
        raise CompressionError(
            f"int8 scale of {name} has shape {tuple(scale.shape)}, which does not fit values of shape {tuple(q.shape)}"
        )
    return q.to(torch.float32) * scale
