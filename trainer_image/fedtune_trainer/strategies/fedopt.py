"""Adaptive server optimisers of Reddi et al., "Adaptive Federated Optimization" (ICLR 2021).

With delta = average − global_prev (a pseudo-gradient pointing where the clients went):
    m ← β1·m + (1 − β1)·delta
    v ← Adam:    β2·v + (1 − β2)·delta²
        Yogi:    v − (1 − β2)·delta²·sign(v − delta²)
        Adagrad: v + delta²
    new = global_prev + η·m / (√v + τ)
m and v start at zero and, as in the paper, there is no bias correction. fedadagrad has no
beta1 in `fedtune.api.methods` and so runs with β1 = 0 (m = delta), as Flower does; its m is
then not stored. Moments are kept in float32 (or float64 for float64 adapters) whatever the
adapter's dtype: v underflows in bf16.
"""

from __future__ import annotations

import torch

from fedtune_trainer.strategies.fedavg import FedAvg


class FedOpt(FedAvg):
    """Shared skeleton of FedAdam/FedYogi/FedAdagrad; subclasses define `second_moment`."""

    state_prefixes = ("m", "v")

    @property
    def beta1(self) -> float:
        return self.params.get("beta1", 0.0)

    def second_moment(self, v: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """The new v from the old one and this round's delta."""
        raise NotImplementedError

    def step(self, name: str, prev: torch.Tensor, avg: torch.Tensor) -> torch.Tensor:
        delta = avg - prev
        if self.beta1 > 0:
            m = self.beta1 * self._get("m", name, prev) + (1 - self.beta1) * delta
            self._set("m", name, m)
        else:
            m = delta
        v = self.second_moment(self._get("v", name, prev), delta)
        self._set("v", name, v)
        return prev + self.params["serverLearningRate"] * m / (v.sqrt() + self.params["tau"])


class FedAdam(FedOpt):
    """Adam on the server: v is an exponential average of delta²."""

    name = "fedadam"

    def second_moment(self, v: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        beta2 = self.params["beta2"]
        return beta2 * v + (1 - beta2) * delta.square()


class FedYogi(FedOpt):
    """Yogi on the server: v moves additively towards delta², so it cannot collapse quickly."""

    name = "fedyogi"

    def second_moment(self, v: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        sq = delta.square()
        return v - (1 - self.params["beta2"]) * sq * torch.sign(v - sq)


class FedAdagrad(FedOpt):
    """Adagrad on the server: v sums every delta²."""

    name = "fedadagrad"
    state_prefixes = ("v",)  # beta1 = 0: no first moment to keep

    def second_moment(self, v: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        return v + delta.square()
