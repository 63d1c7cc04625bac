"""Differential privacy (issue 13, item 1): ε from the accountant, validation, the budget stop, clipping, noise.

Pure tests: the accountant against dp-accounting called here on its own, the round machine driven by
tests/test_round_machine.py's simulator, and the trainer's clipping and noise on random tensors.
"""

from __future__ import annotations

import math

import dp_accounting
import numpy as np
import pytest
import torch
from dp_accounting.rdp import RdpAccountant
from fedtune.api import privacy
from fedtune.api.job import FederatedJobSpec
from fedtune.api.protocol import AggregatorTicket
from fedtune.rounds import conditions as cond
from fedtune.rounds.intents import trainer_config
from fedtune.rounds.machine import last_round
from fedtune_trainer.privacy import delta_norm, noise_generator, private_mean, privatise_update
from pydantic import ValidationError
from scipy import stats
from test_round_machine import Sim, make_job


def dp_spec(**over) -> dict:
    dp = {"mode": "central", "clipNorm": 0.5, "noiseMultiplier": 1.0, "budget": {"epsilon": 10.0, "delta": 1e-5}}
    return dp | over


def spec_with(dp: dict, **over) -> FederatedJobSpec:
    base = {
        "model": {"source": "/m", "task": "sequence-classification"},
        "data": {"labels": ["a", "b"]},
        "parties": [{"name": "a"}, {"name": "b"}],
        "rounds": 5,
        "privacy": {"dp": dp},
    }
    return FederatedJobSpec.model_validate(base | over)


def library_epsilon(sigma: float, rounds: int, delta: float) -> float:
    """dp-accounting's own RDP computation: `rounds` Gaussian mechanisms with every party sampled (q = 1)."""
    acc = RdpAccountant()
    for _ in range(rounds):  # composed one round at a time, not as the self-composition fedtune asks for
        acc.compose(dp_accounting.PoissonSampledDpEvent(1.0, dp_accounting.GaussianDpEvent(sigma)))
    return float(acc.get_epsilon(delta))


# --- the accountant -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sigma", "rounds", "delta"), [(0.8, 1, 1e-5), (1.0, 3, 1e-5), (2.5, 40, 1e-6), (5, 200, 1e-3)]
)
def test_reported_epsilon_is_the_accountants_own(sigma, rounds, delta):
    assert privacy.epsilon(sigma, rounds, delta) == pytest.approx(library_epsilon(sigma, rounds, delta), rel=1e-9)


def test_epsilon_grows_with_rounds_and_shrinks_with_noise():
    assert privacy.epsilon(1.0, 0, 1e-5) == 0
    assert math.isinf(privacy.epsilon(0.0, 1, 1e-5))
    eps = [privacy.epsilon(1.0, r, 1e-5) for r in range(1, 8)]
    assert eps == sorted(eps) and len(set(eps)) == len(eps)
    assert privacy.epsilon(2.0, 5, 1e-5) < privacy.epsilon(1.0, 5, 1e-5)


def test_rounds_allowed_is_the_last_round_within_budget():
    spec = spec_with(dp_spec(budget={"epsilon": 12.0, "delta": 1e-5}), rounds=20)
    k = last_round(spec)
    assert 1 <= k < 20
    assert library_epsilon(1.0, k, 1e-5) <= 12.0 < library_epsilon(1.0, k + 1, 1e-5)
    assert last_round(spec_with(dp_spec(budget={"epsilon": 1000.0, "delta": 1e-5}), rounds=20)) == 20


# --- validation -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dp", "over", "says"),
    [
        (dp_spec(clipNorm=0), {}, "privacy.dp.clipNorm"),
        (dp_spec(noiseMultiplier=-1), {}, "privacy.dp.noiseMultiplier"),
        (dp_spec(mode="secure"), {}, "privacy.dp.mode"),
        (dp_spec(budget={"epsilon": 5, "delta": 1}), {}, "privacy.dp.budget.delta"),
        (dp_spec(budget={"epsilon": 5, "delta": 0}), {}, "privacy.dp.budget.delta"),
        (dp_spec(budget={"epsilon": 0, "delta": 1e-5}), {}, "privacy.dp.budget.epsilon"),
        (
            dp_spec(budget={"epsilon": 1.0, "delta": 1e-5}),
            {},
            "privacy.dp.budget.epsilon (1) is below the ε of a single",
        ),
        (dp_spec(noiseMultiplier=0), {}, "privacy.dp.noiseMultiplier is 0"),
        (dp_spec(), {"aggregator": {"loraMode": "exact"}}, "privacy.dp needs aggregator.loraMode: average"),
        (
            dp_spec(),
            {"aggregator": {"robust": {"rule": "median"}}},
            "privacy.dp mode central cannot be combined with aggregator.robust (rule median)",
        ),
    ],
)
def test_validation_names_the_field_and_the_fix(dp, over, says):
    with pytest.raises(ValidationError) as err:
        spec_with(dp, **over)
    assert says in str(err.value)


def test_local_noise_combines_with_a_robust_rule():
    """Local noise is added before the aggregator sees an update, so a robust rule after it is post-processing."""
    spec = spec_with(dp_spec(mode="local"), aggregator={"robust": {"rule": "median"}})
    assert spec.privacy.dp.mode == "local" and spec.aggregator.robust.rule == "median"


def test_tickets_carry_dp_where_the_noise_is_added():
    from fedtune.api.party import Party

    party = Party.model_validate({"metadata": {"name": "a"}, "spec": {"storage": {"bucket": "bucket-a"}}})

    def job(mode):
        j = make_job(rounds=2)
        return j.model_copy(update={"spec": spec_with(dp_spec(mode=mode), rounds=2)})

    assert trainer_config(job("central"), party).dp is None
    assert trainer_config(job("local"), party).dp.noise_multiplier == 1.0
    assert (
        AggregatorTicket.model_validate(
            {"kind": "aggregate", "job": "u", "round": 1, "deadline": "2026-01-01T00:00:00Z", "dp": dp_spec()}
        ).dp.clip_norm
        == 0.5
    )


# --- the budget stops the job ---------------------------------------------------------------


def dp_job(rounds: int, budget: float):
    job = make_job(n=3, rounds=rounds, min_parties=2)
    spec = job.spec.model_dump(by_alias=True) | {"privacy": {"dp": dp_spec(budget={"epsilon": budget, "delta": 1e-5})}}
    return job.model_copy(update={"spec": FederatedJobSpec.model_validate(spec)})


def test_budget_exhaustion_stops_before_the_round_that_would_exceed_it():
    budget = (library_epsilon(1.0, 3, 1e-5) + library_epsilon(1.0, 4, 1e-5)) / 2  # room for 3 rounds, not 4
    sim = Sim(dp_job(rounds=6, budget=budget), roundtrip=True)
    st = sim.run()
    assert st.phase == "Succeeded"
    assert len(sim.aggregated) == 3, "round 4 must never start"
    assert st.current_round == 3
    assert [h.round for h in st.history] == [0, 1, 2, 3]
    for h in st.history[1:]:
        assert h.epsilon == pytest.approx(library_epsilon(1.0, h.round, 1e-5), rel=1e-9)
    assert st.privacy.epsilon == pytest.approx(library_epsilon(1.0, 3, 1e-5), rel=1e-9)
    assert st.privacy.epsilon <= budget
    assert st.privacy.rounds_allowed == 3 and st.privacy.budget_epsilon == budget and st.privacy.delta == 1e-5
    c = st.condition(cond.PRIVACY_BUDGET_EXHAUSTED)
    assert c is not None and c.status == "True" and c.reason == "PrivacyBudgetExhausted"
    assert "stopped after round 3 of 6: round 4 would spend" in c.message
    assert "budget exhausted" in st.condition(cond.READY).message
    assert any(e.reason == cond.PRIVACY_BUDGET_EXHAUSTED for e in sim.events)
    assert not any("round 4/6 started" in e.message for e in sim.events)


def test_a_budget_that_covers_every_round_runs_them_all_without_the_condition():
    sim = Sim(dp_job(rounds=3, budget=50.0))
    st = sim.run()
    assert st.phase == "Succeeded" and len(sim.aggregated) == 3
    assert st.condition(cond.PRIVACY_BUDGET_EXHAUSTED) is None
    assert st.privacy.epsilon == pytest.approx(library_epsilon(1.0, 3, 1e-5), rel=1e-9)


def test_no_dp_no_privacy_status():
    st = Sim(make_job(rounds=2)).run()
    assert st.privacy is None and all(h.epsilon is None for h in st.history)


# --- clipping and noise in the trainer ------------------------------------------------------


def tensors(seed: int, scale: float) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "lora_A": torch.randn(8, 64, generator=g) * scale,
        "lora_B": torch.randn(64, 8, generator=g) * scale,
        "head": torch.randn(3, generator=g) * scale,
    }


def test_clipping_bounds_every_update_norm():
    glob = tensors(0, 1.0)
    updates = [{k: glob[k] + v for k, v in tensors(i, s).items()} for i, s in enumerate([0.001, 0.1, 1.0, 100.0], 1)]
    clip = 0.5
    for upd in updates:
        out, norm = privatise_update(glob, upd, clip, 0.0, noise_generator(1))
        assert norm == pytest.approx(delta_norm(glob, upd))
        assert delta_norm(glob, out) <= clip * (1 + 1e-5)
        if norm <= clip:  # within the bound: untouched
            assert delta_norm(glob, out) == pytest.approx(norm, rel=1e-5)
    # The aggregator's path: with no noise, the mean of the clipped deltas; each clipped to C.
    mean, clipped = private_mean(glob, updates, clip, 0.0, noise_generator(1))
    assert clipped == sum(delta_norm(glob, u) > clip for u in updates) == 3
    assert delta_norm(glob, mean) <= clip * (1 + 1e-5)
    expected = {
        k: glob[k] + sum((u[k] - glob[k]) * min(1.0, clip / delta_norm(glob, u)) for u in updates) / len(updates)
        for k in glob
    }
    for k in glob:
        torch.testing.assert_close(mean[k], expected[k])


def noise_of(out: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> np.ndarray:
    return torch.cat([(out[k].double() - ref[k].double()).flatten() for k in ref]).numpy()


def assert_normal_with_std(sample: np.ndarray, std: float) -> None:
    """Kolmogorov-Smirnov against N(0, std²) and a chi-square interval for the variance, both at 1e-4."""
    assert stats.kstest(sample / std, "norm").pvalue > 1e-4
    n = sample.size
    ratio = float(np.sum(sample**2)) / std**2  # ~ chi2(n) when the std is right
    assert stats.chi2.ppf(1e-4, n) < ratio < stats.chi2.isf(1e-4, n), f"sample std {math.sqrt(ratio / n) * std}"


def test_central_noise_has_standard_deviation_sigma_c_over_n():
    glob = tensors(0, 1.0)
    updates = [{k: glob[k] + v for k, v in tensors(i, 0.01).items()} for i in range(1, 5)]
    clip, sigma = 0.5, 1.3
    noiseless, _ = private_mean(glob, updates, clip, 0.0, noise_generator(7))
    noisy, _ = private_mean(glob, updates, clip, sigma, noise_generator(7))
    sample = noise_of(noisy, noiseless)  # noise on the sum is σ·C, on the mean of n updates σ·C / n
    assert_normal_with_std(sample, sigma * clip / len(updates))
    for wrong in (0.5, 2.0):  # the test can fail: a std off by a factor is caught
        with pytest.raises(AssertionError):
            assert_normal_with_std(sample, wrong * sigma * clip / len(updates))


def test_local_noise_has_standard_deviation_sigma_c():
    glob = tensors(0, 1.0)
    update = {k: glob[k] + v for k, v in tensors(3, 0.01).items()}
    clip, sigma = 0.2, 0.7
    clean, _ = privatise_update(glob, update, clip, 0.0, noise_generator(11))
    sample = np.concatenate(
        [noise_of(privatise_update(glob, update, clip, sigma, noise_generator(s))[0], clean) for s in range(4)]
    )
    assert_normal_with_std(sample, sigma * clip)
    with pytest.raises(AssertionError):
        assert_normal_with_std(sample, 2 * sigma * clip)
    with pytest.raises(AssertionError):
        assert_normal_with_std(sample + np.random.default_rng(0).normal(0, sigma * clip, sample.size), sigma * clip)
