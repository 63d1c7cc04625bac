"""FedKSeed (peft.method fedkseed): zeroth-order steps on K shared seeds; only (seed, scalar) pairs travel."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import pytest
import torch
from fedtune.api.job import FederatedJobSpec
from fedtune.api.methods import check_peft_config, fedkseed_params
from fedtune_trainer import fedkseed
from test_local_run import job_yaml, run_local, tiny_seq_cls, toy_data  # noqa: F401 - fixtures

KSEED = {"method": "fedkseed"}


def _spec(**overrides) -> dict:
    spec = {
        "model": {"source": "/m", "task": "sequence-classification"},
        "peft": KSEED,
        "data": {"labels": ["a", "b"]},
        "parties": [{"name": "alice"}, {"name": "bob"}],
    }
    spec.update(overrides)
    return spec


def _reference_z(job_seed: int, k: int, shapes) -> list[torch.Tensor]:
    """The documented derivation, written out independently: sha256("fedkseed/<job seed>/<k>"), 63 bits."""
    value = int.from_bytes(hashlib.sha256(f"fedkseed/{job_seed}/{k}".encode()).digest()[:8], "little") & (2**63 - 1)
    gen = torch.Generator().manual_seed(value)
    return [torch.randn(s, generator=gen, dtype=torch.float32) for s in shapes]


def _toy_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Linear(4, 3))


def test_seed_replay_equals_the_aggregate():
    """Replaying the aggregated accumulator onto the base weights gives the weights of every party's steps applied
    directly, sample-weighted, with z drawn by the documented seed derivation."""
    model, job_seed, k, lr = _toy_model(), 11, 64, 0.05
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    shapes = [p.shape for p in model.parameters()]
    alice = (torch.tensor([3, 7, 3, 60], dtype=torch.int16), torch.tensor([0.5, -1.25, 2.0, 0.75]))
    bob = (torch.tensor([7, 1], dtype=torch.int16), torch.tensor([-0.5, 3.0]))
    weights = [30.0, 10.0]
    round1 = fedkseed.aggregate(torch.zeros(k), [alice], [1.0])  # a first round, alice alone
    accum = fedkseed.aggregate(round1, [alice, bob], weights)  # round 2 adds to it
    fedkseed.replay(model, base, accum, job_seed, lr)

    expected = [base[n].double().clone() for n in base]
    steps = [(alice, 1.0)] + [(u, w / sum(weights)) for u, w in zip((alice, bob), weights)]
    for (seeds, grads), w in steps:
        for i, g in zip(seeds.tolist(), grads.tolist()):
            for e, z in zip(expected, _reference_z(job_seed, i, shapes)):
                e -= lr * w * g * z.double()
    for p, e in zip(model.parameters(), expected):
        assert torch.allclose(p.detach().double(), e, atol=1e-6), (p, e)
    # The accumulator is the per-seed sum: 3 collects alice's two steps in each of the rounds.
    assert accum[3].item() == pytest.approx(2.5 + 0.75 * 2.5)
    assert accum[7].item() == pytest.approx(-1.25 + 0.75 * -1.25 + 0.25 * -0.5)

    # A neighbouring seed's direction is a different model: a wrong derivation cannot pass the check above.
    other = [p.detach().clone() for p in model.parameters()]
    fedkseed.replay(model, base, accum, job_seed + 1, lr)
    assert not all(torch.equal(a, p) for a, p in zip(other, model.parameters()))


def test_directions_are_the_same_in_another_process():
    """z regenerated from a seed is bit-identical across calls and processes (the parties are processes)."""
    model = _toy_model()
    params = list(model.parameters())
    here = torch.cat([z.flatten() for z in fedkseed.direction(params, fedkseed.seed_value(5, 42))])
    again = torch.cat([z.flatten() for z in fedkseed.direction(params, fedkseed.seed_value(5, 42))])
    assert torch.equal(here, again)
    code = (
        "import torch, sys; from fedtune_trainer import fedkseed; "
        "ps=[torch.empty(4,5), torch.empty(4), torch.empty(3,4), torch.empty(3)]; "
        "z=torch.cat([t.flatten() for t in fedkseed.direction(ps, fedkseed.seed_value(5, 42))]); "
        "sys.stdout.write(z.numpy().tobytes().hex())"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert out == here.numpy().tobytes().hex()
    assert fedkseed.step_seeds(1, 2, "alice", 50, 4096) == fedkseed.step_seeds(1, 2, "alice", 50, 4096)
    assert fedkseed.step_seeds(1, 2, "alice", 50, 4096) != fedkseed.step_seeds(1, 2, "bob", 50, 4096)


def test_projected_gradient_on_a_quadratic():
    """On L(θ) = ½‖θ − c‖² the two-point estimate is zᵀ∇L (exact for a quadratic), sign and scale."""
    theta = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))
    c = torch.tensor([0.25, 1.0, -1.0])
    seed = fedkseed.seed_value(0, 3)
    (z,) = fedkseed.direction([theta], seed)
    eps = 1e-3

    def loss() -> float:
        return float(0.5 * ((theta.detach().double() - c.double()) ** 2).sum())

    fedkseed.move([theta], seed, eps)
    plus = loss()
    fedkseed.move([theta], seed, -2 * eps)
    minus = loss()
    fedkseed.move([theta], seed, eps)
    g = (plus - minus) / (2 * eps)
    true = float(z.double() @ (torch.tensor([1.0, -2.0, 0.5]).double() - c.double()))
    assert g == pytest.approx(true, rel=1e-3)
    before = loss()
    fedkseed.move([theta], seed, -0.01 * g)
    assert loss() < before  # a step against the estimate goes downhill


def test_fedkseed_spec_validation():
    assert fedkseed_params({}) == {"seeds": 4096, "steps": 200, "learningRate": 3e-7, "epsilon": 5e-4}
    check_peft_config("fedkseed", {"seeds": 1024, "steps": 10}, "sequence-classification")
    for config, field in (
        ({"seed": 3}, "no parameter(s) seed"),
        ({"seeds": 0}, "peft.config.seeds"),
        ({"seeds": 40000}, "peft.config.seeds"),
        ({"steps": 1.5}, "peft.config.steps"),
        ({"epsilon": 0}, "peft.config.epsilon"),
        ({"learningRate": "x"}, "peft.config.learningRate"),
    ):
        with pytest.raises(ValueError, match=field.replace("(", r"\(").replace(")", r"\)")):
            check_peft_config("fedkseed", config, "sequence-classification")
    assert FederatedJobSpec.model_validate(_spec()).problems() == []
    with pytest.raises(ValueError) as caught:
        FederatedJobSpec.model_validate(
            _spec(
                deepspeed={"enabled": True},
                strategy={"name": "fedadam"},
                aggregator={"robust": {"rule": "median"}},
                privacy={"secureAggregation": {}},
            )
        )
    text = str(caught.value)
    for field in ("deepspeed.enabled", "strategy fedadam", "aggregator.robust", "privacy.secureAggregation"):
        assert f"{field} cannot be used with peft.method fedkseed" in text, text


def test_fedkseed_refuses_a_model_dtype_other_than_float32():
    # Why: a step of lr·g·z (3e-7 x a gradient of order 1) vanishes in a bfloat16 weight, not in a float32 one.
    step = 3e-7 * 2.0
    w = torch.tensor([0.05])
    assert (w.to(torch.bfloat16) + step).eq(w.to(torch.bfloat16)).all() and not (w + step).eq(w).all()
    assert FederatedJobSpec.model_validate(_spec(model={**_spec()["model"], "dtype": "float32"})).problems() == []
    with pytest.raises(ValueError) as caught:
        FederatedJobSpec.model_validate(_spec(model={**_spec()["model"], "dtype": "bfloat16"}))
    text = str(caught.value)
    assert "model.dtype bfloat16 cannot be used with peft.method fedkseed" in text, text
    assert "set model.dtype: float32" in text, text


def test_aggregator_refuses_a_bad_update():
    k = 8
    good = fedkseed.update_tensors([1, 7], [0.5, -0.5])
    fedkseed.check_update(good, k, "update from alice")
    with pytest.raises(ValueError, match="outside 0..7"):
        fedkseed.check_update(fedkseed.update_tensors([8], [1.0]), k, "update from alice")
    with pytest.raises(ValueError, match="NaN or Inf"):
        fedkseed.check_update(fedkseed.update_tensors([1], [float("nan")]), k, "update from alice")
    with pytest.raises(ValueError, match="holds fedkseed.seeds"):
        fedkseed.check_update({fedkseed.ACCUM: torch.zeros(k)}, k, "update from alice")


def _party_log(run, party: str, pattern: str) -> list:
    import re

    text = (run / "logs" / f"default--{party}.log").read_text()
    return re.findall(pattern, text)


def test_fedkseed_end_to_end(tiny_seq_cls, toy_data, tmp_path):  # noqa: F811
    """Two parties, two rounds at the default K and steps: every party replays the same model, a party's traffic
    per round (global down + update up) stays under 18 KB, and final/ replays into that same model."""
    from transformers import AutoModelForSequenceClassification

    peft = {"method": "fedkseed", "config": {"learningRate": 1e-3, "epsilon": 1e-3}}
    run = tmp_path / "run"
    st, out = run_local(job_yaml(tiny_seq_cls, toy_data, peft=peft), run)
    assert st.phase == "Succeeded", out
    assert [h.round for h in st.history] == [0, 1, 2]
    assert all(h.metrics.eval_loss is not None for h in st.history)
    assert all(h.metrics.train_loss is not None for h in st.history[1:])
    assert "python -m fedtune_trainer.fedkseed" in out

    final = run / "final"
    global_bytes = (final / "fedkseed.safetensors").stat().st_size
    replays = {}
    for party in ("alice", "bob"):
        sent = [int(n) for n in _party_log(run, party, r"round \d+: .* update (\d+) bytes")]
        assert len(sent) == 2, sent
        for update_bytes in sent:  # one global down, one update up
            assert global_bytes + update_bytes < 18_000, (global_bytes, update_bytes)
        replays[party] = _party_log(
            run, party, r"round (\d+): replayed (\d+) of 4096 seeds .* in ([\d.]+)s \(weights (\w+)\)"
        )
        print(f"{party}: {global_bytes} bytes down + {sent} bytes up per round; replays {replays[party]}")
    # globals 0 and 1 (train tickets), then the final evaluation of global 2: the same weights at every party
    assert [r[3] for r in replays["alice"]] == [r[3] for r in replays["bob"]]
    assert len({r[3] for r in replays["alice"]}) == 3  # each round's steps moved the model
    assert [int(r[1]) for r in replays["alice"]][0] == 0 and int(replays["alice"][-1][1]) > 0

    # final/ replays, outside any party, into the model the parties evaluated last
    fedkseed.export(str(final), str(tmp_path / "model"))
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "model")
    assert fedkseed.weights_digest(model).startswith(replays["alice"][-1][3])
