"""Differential privacy through the real pieces: the aggregator against SeaweedFS, and `fedtune run` end to end.

The aggregator path shows central mode clips every update and adds noise of the stated std to the sum,
taking the unweighted mean; the local run shows ε per round in the status, the budget stopping the job
before the round that would exceed it, and the parties adding their noise (local mode).
"""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from fedtune.api.privacy import DifferentialPrivacySpec
from fedtune.rounds import conditions as cond
from fedtune_trainer.aggregator import handle
from fedtune_trainer.privacy import delta_norm
from test_aggregator import Round, job_id
from test_local_run import job_yaml, run_local, tiny_seq_cls, toy_data  # noqa: F401 (fixtures)
from test_privacy import assert_normal_with_std, library_epsilon

PARTIES = ("alice", "bob", "carol")
NAME = "base_model.model.classifier.weight"


def dp(mode="central", clip=0.5, sigma=0.0, epsilon=50.0) -> DifferentialPrivacySpec:
    return DifferentialPrivacySpec.model_validate(
        {"mode": mode, "clipNorm": clip, "noiseMultiplier": sigma, "budget": {"epsilon": epsilon, "delta": 1e-5}}
    )


def adapter(seed: int, scale: float) -> dict[str, torch.Tensor]:
    return {NAME: torch.randn(32, 64, generator=torch.Generator().manual_seed(seed)) * scale}


def round_of(s3world, updates: list[dict[str, torch.Tensor]], glob: dict[str, torch.Tensor]) -> tuple[Round, object]:
    rnd = Round(s3world, job_id(), 1)
    for i, u in enumerate(updates):  # the fixture's identities; a party's updates go under its own job id
        rnd.add_update(PARTIES[i % len(PARTIES)], u, num_samples=10 * (i + 1))  # unequal weights: DP ignores them
    return rnd, rnd.put_global(glob)


def test_central_aggregation_clips_every_update_and_takes_the_unweighted_mean(s3world):
    glob = adapter(0, 1.0)
    updates = [{NAME: glob[NAME] + adapter(i, s)[NAME]} for i, s in enumerate([0.001, 1.0, 10.0], 1)]
    rnd, global_in = round_of(s3world, updates, glob)
    receipt = handle(rnd.ticket(global_in, dp=dp(clip=0.5)))
    assert receipt.ok, receipt.error
    new = rnd.new_global()
    scales = [min(1.0, 0.5 / delta_norm(glob, u)) for u in updates]
    expected = glob[NAME] + sum((u[NAME] - glob[NAME]) * s for u, s in zip(updates, scales)) / 3
    torch.testing.assert_close(new[NAME], expected)
    assert delta_norm(glob, new) <= 0.5 * (1 + 1e-5)
    # without DP the same round is the sample-weighted mean, far outside the clipping bound
    plain, plain_in = round_of(s3world, updates, glob)
    assert handle(plain.ticket(plain_in)).ok
    assert delta_norm(glob, plain.new_global()) > 1.0


def test_central_aggregation_adds_noise_of_sigma_c_to_the_sum(s3world):
    glob = adapter(0, 1.0)
    updates = [dict(glob) for _ in range(3)]  # zero deltas: the new global minus the old is the noise / n
    rnd, global_in = round_of(s3world, updates, glob)
    receipt = handle(rnd.ticket(global_in, dp=dp(clip=0.25, sigma=2.0)))
    assert receipt.ok, receipt.error
    noise = (rnd.new_global()[NAME].double() - glob[NAME].double()).flatten().numpy()
    assert_normal_with_std(noise, 2.0 * 0.25 / 3)
    with pytest.raises(AssertionError):
        assert_normal_with_std(noise, 2 * 2.0 * 0.25 / 3)


def test_local_mode_aggregator_takes_the_unweighted_mean_without_clipping_again(s3world):
    glob = adapter(0, 1.0)
    updates = [{NAME: glob[NAME] + adapter(i, 1.0)[NAME]} for i in (1, 2)]
    rnd, global_in = round_of(s3world, updates, glob)
    assert handle(rnd.ticket(global_in, dp=dp(mode="local", clip=0.1, sigma=1.0))).ok
    torch.testing.assert_close(rnd.new_global()[NAME], (updates[0][NAME] + updates[1][NAME]) / 2)


def dp_job(model, data, rounds: int, mode: str, budget: float) -> str:
    docs = list(yaml.safe_load_all(job_yaml(model, data, rounds=rounds)))
    docs[0]["spec"]["privacy"] = {
        "dp": {"mode": mode, "clipNorm": 0.1, "noiseMultiplier": 1.0, "budget": {"epsilon": budget, "delta": 1e-5}}
    }
    return yaml.safe_dump_all(docs)


def test_local_run_reports_epsilon_per_round_and_stops_at_the_budget(tiny_seq_cls, toy_data, tmp_path):  # noqa: F811
    budget = (library_epsilon(1.0, 2, 1e-5) + library_epsilon(1.0, 3, 1e-5)) / 2  # two rounds fit, not three
    st, out = run_local(dp_job(tiny_seq_cls, toy_data, rounds=4, mode="local", budget=budget), tmp_path / "run")
    assert st.phase == "Succeeded", out
    assert [h.round for h in st.history] == [0, 1, 2], out
    for h in st.history[1:]:
        assert h.epsilon == pytest.approx(library_epsilon(1.0, h.round, 1e-5), rel=1e-9)
    assert st.privacy.epsilon == pytest.approx(library_epsilon(1.0, 2, 1e-5), rel=1e-9)
    assert st.privacy.mode == "local" and st.privacy.rounds_allowed == 2
    c = st.condition(cond.PRIVACY_BUDGET_EXHAUSTED)
    assert c is not None and c.status == "True" and "stopped after round 2 of 4" in c.message
    for text in ("ε spent", "privacy budget exhausted", "differential privacy (local", "round 2 aggregated"):
        assert text in out, out
    assert "round 3 aggregated" not in out
    metrics = json.loads((tmp_path / "run" / "final" / "metrics.json").read_text())
    assert metrics["privacy"]["epsilon"] == pytest.approx(st.privacy.epsilon)
    # local mode: each party clipped and noised its own update, every round it trained
    logs = "".join(p.read_text(errors="replace") for p in (tmp_path / "run" / "logs").glob("*.log"))
    assert logs.count("clipped to 0.1, noise added") == 2 * 2, logs[-3000:]


def test_dp_run_refused_before_anything_starts_when_one_round_exceeds_the_budget(
    tiny_seq_cls,  # noqa: F811
    toy_data,  # noqa: F811
    tmp_path,
):
    from fedtune.api.errors import SpecError
    from fedtune.documents import parse_documents

    with pytest.raises(SpecError, match="privacy.dp.budget.epsilon"):
        parse_documents(dp_job(tiny_seq_cls, toy_data, rounds=2, mode="central", budget=0.5), "job.yaml")
    assert not (tmp_path / "run").exists()
