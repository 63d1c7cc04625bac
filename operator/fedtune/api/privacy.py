"""Client-level differential privacy (DP-FedAvg): the spec, and ε from a maintained accountant.

What is protected: one party's whole contribution to a round. Each party's update (its adapter
minus the global it started from, every trainable tensor as one vector) is clipped to L2 norm
`clipNorm` (C), and Gaussian noise of standard deviation `noiseMultiplier`·C (σ·C) per coordinate
is added to the sum of the clipped updates, by the aggregator (central) or by each party to its
own update (local). The global adapter is then the sum divided by the number of updates, a public
count, so dividing is post-processing. Neighbouring jobs differ in one party's contribution
replaced by a zero update ("zero-out" adjacency, Kairouz et al. 2021): the sum's L2 sensitivity is
C, so every round is a Gaussian mechanism with noise multiplier σ, and R rounds in which every
party takes part (sampling rate q = 1) compose to R-fold self-composition of it.

ε is computed here, in the control plane, so that the job can be refused (or stopped) *before* a
round that would spend more than its budget, from the spec and the round count alone. The
accountant is Google's `dp-accounting` (its RDP accountant, the same analysis as Opacus'
default). Opacus itself needs torch, which the operator image must not have (DESIGN §1);
dp-accounting needs only numpy and scipy. It is imported on first use, so only jobs with
`privacy.dp` pay for loading scipy.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Literal

from pydantic import Field

from fedtune.api.base import ApiModel
from fedtune.api.secagg import SecureAggregationSpec

ACCOUNTANT = "rdp (dp-accounting)"


class PrivacyBudget(ApiModel):
    """The (ε, δ) the job may spend in all: it stops before the round that would exceed ε."""

    epsilon: float = Field(gt=0, description="The most ε the job may spend over all its rounds.")
    delta: float = Field(
        gt=0,
        lt=1,
        description="δ of the (ε, δ) guarantee; ε is reported for it. Choose it well below 1 / (number of parties).",
    )


class DifferentialPrivacySpec(ApiModel):
    """Client-level DP-FedAvg: clip each party's update to clipNorm, add Gaussian noise of σ·clipNorm."""

    mode: Literal["central", "local"] = Field(
        "central",
        description="central: the aggregator clips every update and adds N(0, (σ·C)²) to their sum (it sees the "
        "updates in clear). local: each party clips its own update and adds N(0, (σ·C)²) before uploading, so "
        "the aggregator never sees an update without noise.",
    )
    clip_norm: float = Field(
        gt=0, description="C: every update (adapter minus the global it started from) is scaled to L2 norm <= C."
    )
    noise_multiplier: float = Field(
        ge=0, description="σ: the Gaussian noise added to the sum of clipped updates has standard deviation σ·C."
    )
    budget: PrivacyBudget = Field(description="The (ε, δ) the job refuses to exceed.")


class SampleDpSpec(ApiModel):
    """Sample-level DP-SGD in every party's local training (Opacus): per-example clipping and Gaussian noise.

    What is protected: one training example of a party. Each optimizer step Poisson-samples the
    party's examples (rate batchSize / examples), clips every example's gradient to L2 norm
    maxGradNorm (C), and adds N(0, (σ·C)²) to their sum. The party's own Opacus RDP accountant
    composes every step of every round it trained, and reports ε for delta in each train receipt.
    """

    noise_multiplier: float = Field(
        gt=0,
        description="σ: the Gaussian noise added to the sum of clipped per-example gradients has std σ·maxGradNorm.",
    )
    max_grad_norm: float = Field(gt=0, description="C: every example's gradient is scaled to L2 norm <= C.")
    delta: float = Field(
        1e-5, gt=0, lt=1, description="δ the parties report ε for; choose it well below 1 / (examples per party)."
    )


class PrivacySpec(ApiModel):
    """Privacy options of a job (DESIGN §8)."""

    dp: DifferentialPrivacySpec | None = Field(
        None, description="Client-level differential privacy (DP-FedAvg) with an (ε, δ) budget."
    )
    dp_sgd: SampleDpSpec | None = Field(
        None,
        description="Sample-level differential privacy: DP-SGD (Opacus) in every party's local training, each "
        "party reporting the ε its examples have spent. Combines with dp and secureAggregation.",
    )
    secure_aggregation: SecureAggregationSpec | None = Field(
        None,
        description="Secure aggregation: parties mask their updates so that the aggregator learns only their sum "
        "(a threshold of parties recovers it when others drop).",
    )


class PrivacyStatus(ApiModel):
    """The privacy a job has spent, per the accountant."""

    mode: Literal["central", "local"] = Field(description="Where the noise is added.")
    epsilon: float = Field(0.0, description="ε spent by the rounds aggregated so far, for delta.")
    delta: float = Field(description="δ the ε is for (the budget's).")
    budget_epsilon: float = Field(description="The ε the job may spend.")
    rounds_allowed: int = Field(description="Rounds the budget allows, at most spec.rounds.")
    accountant: str = Field(ACCOUNTANT, description="The accountant ε comes from.")


@lru_cache(maxsize=4096)
def epsilon(noise_multiplier: float, rounds: int, delta: float) -> float:
    """ε after `rounds` rounds of the Gaussian mechanism with `noise_multiplier`, every party in every
    round (q = 1), for `delta`: dp-accounting's RDP accountant. 0 for no round, ∞ without noise."""
    if rounds <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    import dp_accounting  # scipy: loaded only for jobs with privacy.dp
    from dp_accounting.rdp import RdpAccountant

    accountant = RdpAccountant()
    accountant.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(noise_multiplier), rounds))
    return float(accountant.get_epsilon(delta))


def spent(dp: DifferentialPrivacySpec, rounds: int) -> float:
    """ε of the job's δ after `rounds` aggregated rounds."""
    return epsilon(dp.noise_multiplier, rounds, dp.budget.delta)


def rounds_allowed(dp: DifferentialPrivacySpec, rounds: int) -> int:
    """The most rounds, up to `rounds`, whose ε stays within the budget (0 when not even one does)."""
    lo, hi = 0, rounds  # ε grows with the rounds: the largest k with spent(k) <= budget, by bisection
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if spent(dp, mid) <= dp.budget.epsilon:
            lo = mid
        else:
            hi = mid - 1
    return lo


def budget_problem(dp: DifferentialPrivacySpec) -> str | None:
    """Why the budget cannot pay for even one round, with the fix; None when it can."""
    first = spent(dp, 1)
    if first <= dp.budget.epsilon:
        return None
    if math.isinf(first):
        return (
            "privacy.dp.noiseMultiplier is 0: without noise ε is infinite and no round fits "
            f"privacy.dp.budget.epsilon ({dp.budget.epsilon:g}); set noiseMultiplier > 0"
        )
    return (
        f"privacy.dp.budget.epsilon ({dp.budget.epsilon:g}) is below the ε of a single round "
        f"({first:.3f} at δ={dp.budget.delta:g} with noiseMultiplier {dp.noise_multiplier:g}): raise "
        "budget.epsilon or noiseMultiplier"
    )
