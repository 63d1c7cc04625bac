"""Server-side aggregation strategies over name -> tensor dicts (no I/O, no peft import).

One round: `combine` the accepted client updates (sample-weighted; LoRA pairs averaged or
re-factored exactly, see `lora`) — or, with `aggregator.robust`, combine them by a
Byzantine-robust rule (see `robust`) — then let the strategy step from the previous global
adapter towards that combination (`Strategy.aggregate`).

With loraMode "exact" and a server optimiser (fedadam, fedyogi, fedadagrad, fedavgm) the
pseudo-gradient is taken on the re-factored factors, delta = (A', B') − (A, B)_prev, not on
the products. That is well defined (same keys and shapes every round) but the SVD picks a
new basis for the factors each round, so the moments mix bases; with fedavg/fedprox the new
global's products are exactly the re-factored mean products. The residual returned by
`aggregate_round` is that of the re-factoring, before the server step.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from fedtune.api.methods import STRATEGIES, strategy_params
from fedtune.api.robust import RobustSpec

from fedtune_trainer.strategies.base import Strategy, Tensors, weighted_mean
from fedtune_trainer.strategies.fedavg import FedAvg, FedProx
from fedtune_trainer.strategies.fedavgm import FedAvgM
from fedtune_trainer.strategies.fedopt import FedAdagrad, FedAdam, FedYogi
from fedtune_trainer.strategies.lora import LORA_MODES, combine
from fedtune_trainer.strategies.robust import robust_combine

# Explicit registry: the names (and parameters) come from fedtune.api.methods.STRATEGIES,
# which the operator validates specs against; a test keeps the two in step.
REGISTRY: dict[str, type[Strategy]] = {
    cls.name: cls for cls in (FedAvg, FedProx, FedAdam, FedYogi, FedAdagrad, FedAvgM)
}


def make_strategy(name: str, params: Mapping[str, float] | None = None) -> Strategy:
    """A fresh strategy `name` with `params` checked against (and completed from) methods.py.

    Raises ValueError with methods.py's message for an unknown strategy or parameter.
    """
    strategy_params(name, dict(params or {}))  # the operator's own checks and messages
    if name not in REGISTRY:
        raise ValueError(f"strategy {name!r} is declared in fedtune.api.methods but not implemented by the trainer")
    return REGISTRY[name](params)


def aggregate_round(
    global_prev: Mapping[str, torch.Tensor],
    updates: Sequence[Mapping[str, torch.Tensor]],
    weights: Sequence[float],
    strategy: Strategy,
    lora_mode: str = "average",
    robust: RobustSpec | None = None,
) -> tuple[Tensors, float | None]:
    """The next global adapter from the previous one and the round's accepted updates.

    With `robust`, its rule (and norm bound) replaces the weighted mean of the updates and the
    strategy steps on that (`robust.robust_combine`).
    Returns (new_global, residual): residual is the largest relative Frobenius residual of
    the exact LoRA re-factoring over modules, or None when nothing was re-factored.
    Updates the strategy's state (its moments) as a side effect.
    """
    if robust is None:
        combined, residual = combine(updates, weights, lora_mode)
    else:
        combined, residual, _ = robust_combine(global_prev, updates, weights, robust, lora_mode)
    return strategy.aggregate(global_prev, combined), residual


__all__ = [
    "LORA_MODES",
    "REGISTRY",
    "STRATEGIES",
    "FedAdagrad",
    "FedAdam",
    "FedAvg",
    "FedAvgM",
    "FedProx",
    "FedYogi",
    "Strategy",
    "Tensors",
    "aggregate_round",
    "combine",
    "make_strategy",
    "robust_combine",
    "weighted_mean",
]
