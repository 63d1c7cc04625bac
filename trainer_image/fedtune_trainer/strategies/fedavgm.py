"""FedAvgM (Hsu et al. 2019): FedAvg with server momentum.

The pseudo-gradient g = global_prev − average is accumulated in a momentum buffer,
buf ← momentum·buf + g (buf starts at 0, so round 1 uses g), and the server steps
new = global_prev − serverLearningRate·buf. With momentum 0 and rate 1 this is FedAvg.
"""

from __future__ import annotations

import torch

from fedtune_trainer.strategies.fedavg import FedAvg


class FedAvgM(FedAvg):
    """Server momentum on top of FedAvg; the buffer is saved as `momentum/<tensor>`."""

    name = "fedavgm"
    state_prefixes = ("momentum",)

    def step(self, name: str, prev: torch.Tensor, avg: torch.Tensor) -> torch.Tensor:
        grad = prev - avg
        buf = self.params["momentum"] * self._get("momentum", name, prev) + grad
        self._set("momentum", name, buf)
        return prev - self.params["serverLearningRate"] * buf
