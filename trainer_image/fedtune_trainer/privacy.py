"""Client-level DP-FedAvg's two operations: clip an update, add Gaussian noise (pure, over name -> tensor dicts).

An update's *delta* is the party's adapter minus the global adapter it started from, all floating
tensors taken as one vector. Clipping scales the delta to L2 norm <= C. Noise is N(0, (σ·C)²) per
coordinate, added once to the sum of the clipped deltas: by the aggregator (`private_mean`, central
mode) or by each party to its own delta before uploading (`privatise_update`, local mode: the sum
then holds n times that variance, at least what the accounting assumes). Either way the new global
is the previous one plus the noisy sum divided by the number of updates, an unweighted mean: a
sample-weighted mean would let a party's weight scale its influence past C. What ε this buys is
`fedtune.api.privacy`'s business (the control plane computes it).

Noise comes from torch's generator seeded from the operating system's entropy, as Opacus does
outside its secure mode: it is not a cryptographically secure generator.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping, Sequence

import torch

from fedtune_trainer.strategies.base import Tensors, check_same_keys, work_dtype


def noise_generator(seed: int | None = None) -> torch.Generator:
    """A CPU generator for the noise: `seed` in tests, fresh OS entropy otherwise."""
    return torch.Generator().manual_seed(secrets.randbits(63) if seed is None else seed)


def delta_norm(global_prev: Mapping[str, torch.Tensor], update: Mapping[str, torch.Tensor]) -> float:
    """L2 norm of update − global over every floating tensor, as one vector (read a tensor at a time)."""
    total = 0.0
    for name, prev in global_prev.items():
        if prev.is_floating_point():
            diff = update[name].to(torch.float64) - prev.to(torch.float64)
            total += float(diff.square().sum())
    return math.sqrt(total)


def clip_scale(norm: float, clip_norm: float) -> float:
    """The factor that brings a delta of L2 norm `norm` to at most `clip_norm` (1 when it is within)."""
    return 1.0 if norm <= clip_norm else clip_norm / norm


def _noise(like: torch.Tensor, std: float, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(like.shape, generator=generator, dtype=torch.float64).mul_(std)


def private_mean(
    global_prev: Mapping[str, torch.Tensor],
    updates: Sequence[Mapping[str, torch.Tensor]],
    clip_norm: float,
    noise_multiplier: float,
    generator: torch.Generator,
) -> tuple[Tensors, int]:
    """Central DP-FedAvg: global + (Σ clip(update − global) + N(0, (σ·C)²)) / n.

    Returns (the combined adapter, for a strategy's `aggregate`; how many updates were clipped).
    Non-floating tensors keep the global's values. Updates are read a tensor at a time.
    """
    if not updates:
        raise ValueError("no updates to average")
    for i, upd in enumerate(updates):
        check_same_keys(global_prev, upd, f"update #{i}")
    scales = [clip_scale(delta_norm(global_prev, upd), clip_norm) for upd in updates]
    std = noise_multiplier * clip_norm
    out: Tensors = {}
    for name, prev in global_prev.items():
        if not prev.is_floating_point():
            out[name] = prev.clone()
            continue
        base = prev.to(torch.float64)
        total = _noise(prev, std, generator)
        for upd, scale in zip(updates, scales):
            total += (upd[name].to(torch.float64) - base) * scale
        out[name] = (base + total / len(updates)).to(work_dtype(prev.dtype)).to(prev.dtype)
    return out, sum(s < 1.0 for s in scales)


def privatise_update(
    global_prev: Mapping[str, torch.Tensor],
    update: Mapping[str, torch.Tensor],
    clip_norm: float,
    noise_multiplier: float,
    generator: torch.Generator,
) -> tuple[Tensors, float]:
    """Local DP-FedAvg, on a party: global + clip(update − global) + N(0, (σ·C)²) per coordinate.

    Returns (the update to upload, in the update's dtypes; the delta's norm before clipping).
    """
    check_same_keys(global_prev, update, "the update")
    norm = delta_norm(global_prev, update)
    scale, std = clip_scale(norm, clip_norm), noise_multiplier * clip_norm
    out: Tensors = {}
    for name, prev in global_prev.items():
        mine = update[name]
        if not prev.is_floating_point():
            out[name] = mine.clone()
            continue
        base = prev.to(torch.float64)
        noisy = base + (mine.to(torch.float64) - base) * scale + _noise(prev, std, generator)
        out[name] = noisy.to(mine.dtype).contiguous()
    return out, norm
