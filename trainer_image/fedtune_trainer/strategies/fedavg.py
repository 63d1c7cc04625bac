"""FedAvg (McMahan et al. 2017) and FedProx (Li et al. 2020) on the server side.

FedProx differs from FedAvg only on the clients, which add (mu/2)·‖w − w_global‖² to their
loss; the server simply takes the sample-weighted average. `mu` lives in the strategy's
parameters so the control plane can hand it to the parties.
"""

from __future__ import annotations

import torch

from fedtune_trainer.strategies.base import Strategy


class FedAvg(Strategy):
    """The new global adapter is the (sample-weighted) average of the updates."""

    name = "fedavg"

    def step(self, name: str, prev: torch.Tensor, avg: torch.Tensor) -> torch.Tensor:
        return avg


class FedProx(FedAvg):
    """FedAvg on the server; the proximal weight `mu` is applied by each party's trainer."""

    name = "fedprox"
