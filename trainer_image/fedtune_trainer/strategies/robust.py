"""Byzantine-robust combination of client updates: norm bounding, median, trimmed mean, Krum.

Every rule works on deltas, dᵢ = updateᵢ − previous global, and replaces the weighted mean of
`lora.combine`; the job's strategy (FedAvg, FedAdam, …) then steps from the previous global
towards global + robust(d). Deltas are formed in float64: a finite float32 update minus a finite
global cannot overflow there, and neither can the squared distances of Krum.

- Norm bounding (Sun et al. 2019, "Can you really backdoor federated learning?"): each dᵢ is
  scaled by min(1, bound/‖dᵢ‖), its norm taken over every floating tensor together. It runs
  first and composes with every rule, the weighted mean included.
- Coordinate-wise median and trimmed mean (Yin et al. 2018): per tensor element, the median of
  the n values (the mean of the two middle ones for even n), or the mean after dropping the
  ⌊β·n⌋ largest and smallest.
- Krum and Multi-Krum (Blanchard et al. 2017): each update's score is the sum of its squared
  distances (over the concatenated delta vector) to its n − f − 2 nearest others; Krum keeps the
  lowest-scored update, Multi-Krum the m lowest (m ≤ n − f, default n − f) and averages them.
  Selection composes with both LoRA modes: the kept updates go through `combine`.

Robust rules weigh parties equally (sample counts are self-reported; an attacker could claim any);
the plain mean keeps the sample weights. Non-floating tensors must agree across updates, as in
`weighted_mean`. Tensors are read key by key, so memory holds n copies of one tensor, not n adapters.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from fedtune.api.robust import COORDINATE_RULES, KRUM_RULES, RobustSpec, trimmed_count

from fedtune_trainer.strategies.base import Tensors, check_same_keys, weighted_mean
from fedtune_trainer.strategies.lora import combine
from fedtune_trainer.tensorfile import specs_of

log = logging.getLogger(__name__)


@dataclass
class RobustReport:
    """What a robust combination did, by update index: which were clipped, which Krum kept."""

    clipped: list[int] = field(default_factory=list)
    selected: list[int] | None = None


def _floating(global_prev: Mapping[str, torch.Tensor]) -> list[str]:
    return [name for name, spec in specs_of(global_prev).items() if spec.dtype.is_floating_point]


def _deltas(name: str, global_prev: Mapping[str, torch.Tensor], updates: Sequence[Mapping[str, torch.Tensor]]):
    """(n, *shape) float64 deltas of tensor `name`, and the previous global's value in float64."""
    prev = global_prev[name].to(torch.float64)
    rows = []
    for i, update in enumerate(updates):
        value = update[name]
        if value.shape != prev.shape:
            raise ValueError(f"tensor {name} of update #{i} has shape {tuple(value.shape)}, global {tuple(prev.shape)}")
        rows.append(value.to(torch.float64) - prev)
    return torch.stack(rows), prev


class _Bounded(Mapping[str, torch.Tensor]):
    """An update whose delta from the global is scaled by `scale`, read lazily tensor by tensor."""

    def __init__(self, update: Mapping[str, torch.Tensor], global_prev: Mapping[str, torch.Tensor], scale: float):
        self._update, self._global, self._scale = update, global_prev, scale

    def __getitem__(self, name: str) -> torch.Tensor:
        value = self._update[name]
        if not value.is_floating_point():
            return value
        prev = self._global[name].to(torch.float64)
        return (prev + (value.to(torch.float64) - prev) * self._scale).to(value.dtype)

    def __iter__(self) -> Iterator[str]:
        return iter(self._update)

    def __len__(self) -> int:
        return len(self._update)


def delta_norms(global_prev: Mapping[str, torch.Tensor], updates: Sequence[Mapping[str, torch.Tensor]]) -> torch.Tensor:
    """‖updateᵢ − global‖₂ over every floating tensor together, (n,) float64."""
    squares = torch.zeros(len(updates), dtype=torch.float64)
    for name in _floating(global_prev):
        deltas, _ = _deltas(name, global_prev, updates)
        squares += deltas.flatten(1).square().sum(1)
    return squares.sqrt()


def bound_norms(
    global_prev: Mapping[str, torch.Tensor], updates: Sequence[Mapping[str, torch.Tensor]], bound: float
) -> tuple[list[Mapping[str, torch.Tensor]], list[int]]:
    """Updates whose deltas are clipped to L2 norm `bound`, and the indices of those that were clipped."""
    norms = delta_norms(global_prev, updates)
    out: list[Mapping[str, torch.Tensor]] = []
    clipped = []
    for i, (update, norm) in enumerate(zip(updates, norms.tolist())):
        if norm > bound:
            out.append(_Bounded(update, global_prev, bound / norm))
            clipped.append(i)
        else:
            out.append(update)
    return out, clipped


def coordinate_wise(
    global_prev: Mapping[str, torch.Tensor], updates: Sequence[Mapping[str, torch.Tensor]], rule: str, trim: float = 0.0
) -> Tensors:
    """global + the coordinate-wise median ("median") or trimmed mean ("trimmedMean") of the deltas."""
    n = len(updates)
    floating = _floating(global_prev)
    rest = [name for name in global_prev if name not in set(floating)]
    out = weighted_mean(updates, [1.0] * n, rest)  # checks every update's names; non-floats must agree
    cut = trimmed_count(trim, n) if rule == "trimmedMean" else 0
    for name in floating:
        deltas, prev = _deltas(name, global_prev, updates)
        ordered = deltas.sort(dim=0).values
        if rule == "median":
            middle = (ordered[(n - 1) // 2] + ordered[n // 2]) / 2
        else:
            middle = ordered[cut : n - cut].mean(dim=0)
        out[name] = (prev + middle).to(global_prev[name].dtype)
    return {name: out[name] for name in global_prev}


def krum_scores(
    global_prev: Mapping[str, torch.Tensor], updates: Sequence[Mapping[str, torch.Tensor]], byzantine: int
) -> torch.Tensor:
    """Each update's Krum score: its summed squared distances to its n − f − 2 nearest others, (n,) float64."""
    n = len(updates)
    neighbours = n - byzantine - 2
    if neighbours < 1:
        raise ValueError(f"krum scores need n - byzantine - 2 >= 1 (n = {n}, byzantine = {byzantine})")
    squared = torch.zeros(n, n, dtype=torch.float64)
    for name in _floating(global_prev):
        deltas, _ = _deltas(name, global_prev, updates)
        flat = deltas.flatten(1)
        squared += torch.cdist(flat, flat, compute_mode="donot_use_mm_for_euclid_dist").square()
    squared.fill_diagonal_(float("inf"))
    return squared.topk(neighbours, dim=1, largest=False).values.sum(dim=1)


def krum_select(
    global_prev: Mapping[str, torch.Tensor], updates: Sequence[Mapping[str, torch.Tensor]], byzantine: int, keep: int
) -> list[int]:
    """Indices (ascending) of the `keep` lowest-scored updates; ties go to the earlier update."""
    scores = krum_scores(global_prev, updates, byzantine)
    return sorted(torch.argsort(scores, stable=True)[:keep].tolist())


def robust_combine(
    global_prev: Mapping[str, torch.Tensor],
    updates: Sequence[Mapping[str, torch.Tensor]],
    weights: Sequence[float],
    spec: RobustSpec,
    lora_mode: str = "average",
) -> tuple[Tensors, float | None, RobustReport]:
    """Combine client updates robustly: norm bounding, then `spec.rule` in place of the weighted mean.

    Returns the combined tensors (to hand to a strategy's `aggregate`), the exact-mode LoRA residual
    (or None) and a report. Raises ValueError, in the spec's own words, when this round's number of
    updates or the LoRA mode does not allow the rule.
    """
    if not updates:
        raise ValueError("no updates to combine")
    for i, update in enumerate(updates):
        check_same_keys(global_prev, update, f"update #{i}")
    n = len(updates)
    problems = spec.count_problems(n, n)
    if (mode_problem := spec.lora_mode_problem(lora_mode)) is not None:
        problems.append(mode_problem)
    if problems:
        raise ValueError(f"aggregator.robust: {'; '.join(problems)}")
    report = RobustReport()
    if spec.norm_bound is not None:
        updates, report.clipped = bound_norms(global_prev, updates, spec.norm_bound)
        log.info("norm bound %g clipped update(s) %s of %d", spec.norm_bound, report.clipped, n)
    if spec.rule in COORDINATE_RULES:
        return coordinate_wise(global_prev, updates, spec.rule, spec.trim), None, report
    if spec.rule in KRUM_RULES:
        keep = 1 if spec.rule == "krum" else min(spec.multi_krum_select or n - spec.f, n - spec.f)
        report.selected = krum_select(global_prev, updates, spec.f, keep)
        log.info("%s kept update(s) %s of %d", spec.rule, report.selected, n)
        combined, residual = combine([updates[i] for i in report.selected], [1.0] * keep, lora_mode)
        return combined, residual, report
    combined, residual = combine(updates, weights, lora_mode)
    return combined, residual, report
