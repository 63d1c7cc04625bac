"""Fixed-point quantisation of weighted updates into Z_2^64, where masks cancel exactly."""

from __future__ import annotations

import numpy as np

from .context import SecAggError

FRACTION_BITS = 24
_SCALE = float(2**FRACTION_BITS)
# The sum of `parties` quantised values must stay inside (-2**63, 2**63) to be read back as int64;
# 2**62 leaves a factor of two of headroom for the rounding of each term.
_LIMIT = float(2**62)


def quantise(values: np.ndarray, weight: float, parties: int) -> np.ndarray:
    """round(weight * values * 2**FRACTION_BITS) mod 2**64 as uint64, refusing anything the sum could wrap."""
    if isinstance(parties, bool) or not isinstance(parties, int) or parties < 1:
        raise SecAggError(f"quantise: parties must be a positive integer, not {parties!r}")
    weight = float(weight)
    if not np.isfinite(weight):
        raise SecAggError(f"quantise: the weight {weight} is not finite")
    scaled = np.asarray(values, dtype=np.float64) * weight
    if scaled.size:
        finite = np.isfinite(scaled)
        if not finite.all():
            bad = int(np.flatnonzero(~finite.ravel())[0])
            raise SecAggError(
                f"quantise: the update holds a non-finite value ({scaled.ravel()[bad]} at element {bad}, "
                "after weighting); it cannot be aggregated: fix the training step that produced it"
            )
        largest = float(np.max(np.abs(scaled)))
        limit = _LIMIT / _SCALE / parties
        if largest >= limit:
            raise SecAggError(
                f"quantise: the largest weighted value {largest:.6g} reaches the limit {limit:.6g} for {parties} "
                f"parties at 2**{FRACTION_BITS} fixed point (the masked sum could wrap around 2**64); "
                "clip the update or scale the weights down"
            )
    return np.rint(scaled * _SCALE).astype(np.int64).view(np.uint64)


def dequantise(total: np.ndarray, weight_sum: float) -> np.ndarray:
    """The uint64 sum read as two's complement, back to float64 and divided by the sum of the weights."""
    weight_sum = float(weight_sum)
    if not np.isfinite(weight_sum) or weight_sum <= 0:
        raise SecAggError(f"dequantise: the sum of the weights must be positive and finite, not {weight_sum}")
    total = np.asarray(total)
    if total.dtype != np.uint64:
        raise SecAggError(f"dequantise: expected the uint64 sum from unmask(), got {total.dtype}")
    return total.view(np.int64).astype(np.float64) / _SCALE / weight_sum
