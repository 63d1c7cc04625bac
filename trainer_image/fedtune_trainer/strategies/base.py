"""The server-side strategy contract and the weighted mean every strategy starts from.

A strategy sees two name -> tensor dicts per round: the previous global adapter and the
combined (averaged) client updates, and returns the next global adapter. Anything it must
remember between rounds (optimiser moments) lives in `state_dict()`, a flat name -> tensor
dict the aggregator stores as safetensors, so a restarted aggregator resumes exactly.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import ClassVar

import torch
from fedtune.api.methods import strategy_params

Tensors = dict[str, torch.Tensor]


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype arithmetic runs in: at least float32, so bf16/fp16 updates do not lose the sum."""
    return torch.promote_types(dtype, torch.float32)


def normalise_weights(weights: Sequence[float], count: int) -> list[float]:
    """`count` weights scaled to sum to 1; ValueError for negative, non-finite or all-zero weights."""
    if len(weights) != count:
        raise ValueError(f"{count} update(s) but {len(weights)} weight(s)")
    values = [float(w) for w in weights]
    if any(not math.isfinite(w) or w < 0 for w in values):
        raise ValueError(f"weights must be finite and >= 0 (got {values})")
    total = sum(values)
    if total <= 0:
        raise ValueError("weights sum to 0: at least one update must carry weight")
    return [w / total for w in values]


def check_same_keys(expected: Mapping[str, torch.Tensor], got: Mapping[str, torch.Tensor], what: str) -> None:
    """Raise ValueError naming a few missing/extra tensor names when two dicts disagree."""
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:3])}" + (" …" if len(missing) > 3 else ""))
        if extra:
            parts.append(f"unexpected {', '.join(extra[:3])}" + (" …" if len(extra) > 3 else ""))
        raise ValueError(f"{what} has other tensors than expected: {'; '.join(parts)}")


def weighted_mean(
    updates: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float], names: Iterable[str] | None = None
) -> Tensors:
    """Weighted average of name -> tensor dicts (weights are normalised to sum to 1).

    Floating tensors are accumulated in at least float32 and returned in their own dtype.
    Non-floating tensors (counters and the like) cannot be averaged: they must agree across
    updates and are passed through. Tensors are read key by key and party by party, so updates
    that load lazily from disk (`tensorfile.TensorFile`) cost one tensor and the running sum
    in memory, not every update at once. `names` limits the average to those tensors (all by
    default); every update must still hold the same names as the first.
    """
    if not updates:
        raise ValueError("no updates to average")
    norm = normalise_weights(weights, len(updates))
    first = updates[0]
    for i, upd in enumerate(updates[1:], start=1):
        check_same_keys(first, upd, f"update #{i}")
    return {name: _mean_of(name, updates, norm) for name in (first if names is None else names)}


def _mean_of(name: str, updates: Sequence[Mapping[str, torch.Tensor]], norm: Sequence[float]) -> torch.Tensor:
    ref = updates[0][name]
    if not ref.is_floating_point():
        for upd in updates[1:]:
            t = upd[name]
            if t.shape != ref.shape:
                raise ValueError(f"tensor {name} has different shapes across updates")
            if not torch.equal(t, ref):
                raise ValueError(f"tensor {name} ({ref.dtype}) differs across updates and cannot be averaged")
        return ref.clone()
    acc = torch.zeros(ref.shape, dtype=work_dtype(ref.dtype))
    acc += ref.to(acc.dtype) * norm[0]
    for upd, w in zip(updates[1:], norm[1:]):
        t = upd[name]
        if t.shape != ref.shape:
            raise ValueError(f"tensor {name} has different shapes across updates")
        acc += t.to(acc.dtype) * w
    return acc.to(ref.dtype)


class Strategy:
    """Base of all server strategies: one `step` per floating tensor, plus saved state.

    Subclasses set `name` (a key of `fedtune.api.methods.STRATEGIES`, which supplies the
    parameter names, defaults and bounds), `state_prefixes` (the kinds of state they keep)
    and override `step`. Parameters are copied, never written back to the caller's dict.
    """

    name: ClassVar[str] = ""
    state_prefixes: ClassVar[tuple[str, ...]] = ()

    def __init__(self, params: Mapping[str, float] | None = None):
        self.params: dict[str, float] = strategy_params(self.name, dict(params or {}))
        self._state: Tensors = {}

    def aggregate(self, global_prev: Mapping[str, torch.Tensor], averaged: Mapping[str, torch.Tensor]) -> Tensors:
        """Apply the server update: the next global adapter from the previous one and the average.

        Either the whole round is applied to the state or, on error, none of it.
        """
        check_same_keys(global_prev, averaged, "the combined update")
        stale = sorted({k.split("/", 1)[1] for k in self._state} - set(global_prev))
        if stale:
            raise ValueError(
                f"server state has tensors the adapter lacks ({', '.join(stale[:3])}): "
                "was the adapter or strategy changed mid-job?"
            )
        before = dict(self._state)
        try:
            out: Tensors = {}
            for name, prev in global_prev.items():
                avg = averaged[name]
                if prev.shape != avg.shape:
                    raise ValueError(f"tensor {name}: update shape {tuple(avg.shape)} != global {tuple(prev.shape)}")
                if not prev.is_floating_point():
                    out[name] = avg.clone()  # no gradient to take on integers: follow the clients
                    continue
                dtype = work_dtype(prev.dtype)
                out[name] = self.step(name, prev.to(dtype), avg.to(dtype)).to(prev.dtype)
            return out
        except Exception:
            self._state = before
            raise

    def step(self, name: str, prev: torch.Tensor, avg: torch.Tensor) -> torch.Tensor:
        """Hook: the new value of tensor `name` (inputs in a float32+ dtype)."""
        raise NotImplementedError

    # -- state ---------------------------------------------------------------------------

    def state_dict(self) -> Tensors:
        """The strategy's state as flat `<kind>/<tensor name>` -> tensor (empty if stateless)."""
        return {k: v.clone() for k, v in self._state.items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Resume from `state_dict()` output; refuses state written by another kind of strategy."""
        foreign = sorted(k for k in state if k.split("/", 1)[0] not in self.state_prefixes or "/" not in k)
        if foreign:
            kinds = ", ".join(self.state_prefixes) or "none"
            raise ValueError(
                f"{self.name} cannot resume from this server state: unexpected entries "
                f"{', '.join(foreign[:3])} (it keeps: {kinds}); was the strategy changed mid-job?"
            )
        self._state = {k: v.detach().clone() for k, v in state.items()}

    def _get(self, kind: str, name: str, like: torch.Tensor) -> torch.Tensor:
        """State tensor `kind/name`, zeros on first use; its shape must match the adapter's."""
        value = self._state.get(f"{kind}/{name}")
        if value is None:
            return torch.zeros_like(like)
        if value.shape != like.shape:
            raise ValueError(
                f"server state {kind}/{name} has shape {tuple(value.shape)}, adapter has {tuple(like.shape)}"
            )
        return value.to(like.dtype)

    def _set(self, kind: str, name: str, value: torch.Tensor) -> None:
        # Replace, never update in place: `aggregate` restores the old dict on failure.
        self._state[f"{kind}/{name}"] = value
