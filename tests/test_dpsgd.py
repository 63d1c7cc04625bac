"""Sample-level DP-SGD (spec.privacy.dpSgd) through Opacus: per-example clipping, ε from its accountant
composed over rounds, the plain peft model handed back, the spec's refusals, and `fedtune run` end to end."""

from __future__ import annotations

import math
import re

import pytest
import torch
from fedtune.api.errors import SpecError
from fedtune.api.privacy import SampleDpSpec
from fedtune.documents import parse_documents
from fedtune_trainer.adapters import adapter_state
from fedtune_trainer.data import collate
from fedtune_trainer.dpsgd import epsilon, example_losses, new_accountant
from fedtune_trainer.train import train_local
from opacus.optimizers import DPOptimizer
from test_local_run import job_yaml, run_local, tiny_seq_cls, toy_data  # noqa: F401 (fixtures)
from trainer_helpers import build, config, tiny_paths

CLS, LM = "sequence-classification", "causal-lm"
C = 1e-3  # far below the tiny model's per-example gradient norms


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_paths(tmp_path_factory)


def dp_config(path, task=CLS, sigma=1e-6, clip=C, **training):
    cfg = config(path, task, **training)
    return cfg.model_copy(update={"dp_sgd": SampleDpSpec(noise_multiplier=sigma, max_grad_norm=clip, delta=1e-5)})


def per_example_grads(model, examples, pad_id=0) -> list[torch.Tensor]:
    """Each example's gradient of its own loss, one backward pass per example, without Opacus."""
    params = [p for p in model.parameters() if p.requires_grad]
    out = []
    for e in examples:
        model.zero_grad(set_to_none=True)
        example_losses(model, collate([e], pad_id)).sum().backward()
        out.append(torch.cat([p.grad.reshape(-1) for p in params]))
    model.zero_grad(set_to_none=True)
    return out


def hooks(model) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) + len(m._backward_pre_hooks)
        for m in model.modules()
    )


@pytest.mark.parametrize("task", [CLS, LM])
def test_every_example_gradient_is_clipped_to_max_grad_norm(tiny, task, monkeypatch):
    cfg = dp_config(tiny[task], task, local_steps=1, batch_size=8)
    model, _, examples = build(cfg)
    for m in model.modules():  # no dropout: the per-example gradients below are the ones Opacus sees
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    seen: dict[str, object] = {}
    pre_step = DPOptimizer.pre_step

    def spy(self, closure=None):
        flat = [self._get_flat_grad_sample(p) for p in self.params]  # before clipping
        seen["raw"] = torch.cat([g.reshape(len(g), -1) for g in flat], dim=1)
        ok = pre_step(self, closure)
        seen["grad"] = torch.cat([p.grad.reshape(-1) for p in self.params])  # clipped, noised, scaled mean
        seen["expected"] = self.expected_batch_size
        return ok

    monkeypatch.setattr(DPOptimizer, "pre_step", spy)
    picked = per_example_grads(model, examples)  # before the step moves the weights
    train_local(model, examples, cfg, seed=0, rnd=1, accountant=new_accountant())
    raw = seen["raw"]
    assert len(raw) > 0
    norms = raw.norm(dim=1)
    # Without DP-SGD the step's per-example gradients (computed one by one) are far above C ...
    assert min(g.norm() for g in picked) > 10 * C
    assert float(norms.min()) > 10 * C
    # ... Opacus' per-example gradients are exactly those of some examples ...
    for row in raw:
        assert min(float((row - g).norm() / g.norm()) for g in picked) < 1e-3
    # ... and every one is clipped to C: the step's gradient is their clipped sum over the expected batch.
    clipped = raw * (C / (norms + 1e-6)).clamp(max=1.0)[:, None]
    assert float(clipped.norm(dim=1).max()) <= C * (1 + 1e-5)
    torch.testing.assert_close(seen["grad"], clipped.sum(0) / seen["expected"], rtol=1e-3, atol=1e-7)
    assert float(seen["grad"].norm()) <= C * len(raw) / seen["expected"] * (1 + 1e-3)


def test_epsilon_is_opacus_rdp_composed_over_both_rounds(tiny):
    from opacus.accountants import RDPAccountant

    sigma, batch, steps = 1.1, 8, 6
    cfg = dp_config(tiny[CLS], sigma=sigma, clip=1.0, local_steps=steps, batch_size=batch)
    model, _, examples = build(cfg)
    before = hooks(model)
    accountant = new_accountant()
    eps = []
    for rnd in (1, 2):
        result = train_local(model, examples, cfg, adapter_state(model), seed=0, rnd=rnd, accountant=accountant)
        assert math.isfinite(result.train_loss) and result.num_samples == len(examples)
        eps.append(epsilon(accountant, cfg.dp_sgd))
        # The plain peft model comes back: no Opacus wrapper, hook or per-example attribute is left behind.
        assert type(model).__name__.startswith("PeftModel") and hooks(model) == before
        assert not any(hasattr(p, "grad_sample") or hasattr(p, "summed_grad") for p in model.parameters())
    q = 1 / math.ceil(len(examples) / batch)  # Opacus' Poisson rate: one over the batches of an epoch
    for rounds, got in ((1, eps[0]), (2, eps[1])):
        independent = RDPAccountant()
        for _ in range(steps * rounds):
            independent.step(noise_multiplier=sigma, sample_rate=q)
        assert got == pytest.approx(independent.get_epsilon(1e-5), rel=1e-9)
    assert 0 < eps[0] < eps[1]
    # Google's dp-accounting (the control plane's library) agrees on the same mechanism.
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    google = RdpAccountant()
    event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
    google.compose(dp_accounting.SelfComposedDpEvent(event, 2 * steps))
    assert eps[1] == pytest.approx(google.get_epsilon(1e-5), rel=0.05)


def spec_with(model, data, **extra):
    import yaml

    docs = list(yaml.safe_load_all(job_yaml(model, data)))
    docs[0]["spec"].setdefault("privacy", {})["dpSgd"] = {"noiseMultiplier": 1.0, "maxGradNorm": 1.0}
    for path, value in extra.items():
        section, field = path.split(".")
        docs[0]["spec"].setdefault(section, {})[field] = value
    return yaml.safe_dump_all(docs)


@pytest.mark.parametrize(
    "extra, fields",
    [
        ({"deepspeed.enabled": True}, ["privacy.dpSgd", "deepspeed.enabled"]),
        ({"model.quantization": {"bits": 4}}, ["privacy.dpSgd", "model.quantization"]),
        ({"training.gradientAccumulation": 2}, ["privacy.dpSgd", "training.gradientAccumulation"]),
        ({"training.precision": "bf16"}, ["privacy.dpSgd", "training.precision"]),
        ({"training.gradientCheckpointing": True}, ["privacy.dpSgd", "training.gradientCheckpointing"]),
        ({"training.distillation": {"teacher": "file:///teacher"}}, ["privacy.dpSgd", "training.distillation"]),
    ],
)
def test_spec_refuses_what_opacus_cannot_train(tiny_seq_cls, toy_data, extra, fields):  # noqa: F811
    with pytest.raises(SpecError) as err:
        parse_documents(spec_with(tiny_seq_cls, toy_data, **extra), "job.yaml")
    line = next(x for x in str(err.value).splitlines() if "privacy.dpSgd" in x)
    assert all(f in line for f in fields), str(err.value)
    parse_documents(spec_with(tiny_seq_cls, toy_data), "job.yaml")  # dpSgd alone is a valid job


def test_spec_refuses_bad_values():
    for bad in ({"noiseMultiplier": 0, "maxGradNorm": 1.0}, {"noiseMultiplier": 1.0, "maxGradNorm": -1}):
        with pytest.raises(ValueError):
            SampleDpSpec.model_validate(bad)
    assert SampleDpSpec.model_validate({"noiseMultiplier": 1.0, "maxGradNorm": 1.0}).delta == 1e-5


def test_trainer_refuses_several_ranks(tiny):
    from fedtune_trainer.ranks import Ranks

    cfg = dp_config(tiny[CLS]).model_copy(update={"world_size": 2})
    model, _, examples = build(cfg)
    with pytest.raises(RuntimeError, match="privacy.dpSgd"):
        train_local(model, examples, cfg, ranks=Ranks(rank=0, world=2))


def test_run_reports_each_partys_sample_epsilon_growing_over_rounds(tiny_seq_cls, toy_data, tmp_path):  # noqa: F811
    st, out = run_local(spec_with(tiny_seq_cls, toy_data), tmp_path / "run")
    assert st.phase == "Succeeded", out
    rounds = [h for h in st.history if h.round > 0]
    assert [h.round for h in rounds] == [1, 2]
    assert all(h.sample_epsilon is not None and h.sample_epsilon > 0 for h in rounds), out
    assert rounds[0].sample_epsilon < rounds[1].sample_epsilon
    assert all(p.sample_epsilon == pytest.approx(rounds[1].sample_epsilon, rel=0.5) for p in st.parties), st.parties
    assert max(p.sample_epsilon for p in st.parties) == rounds[1].sample_epsilon
    assert "sample-level ε" in out
    # every party's receipts: its own ε, reported by its trainer each round, grows from round 1 to round 2
    for party in ("alice", "bob"):
        logs = "".join(f.read_text() for f in (tmp_path / "run" / "logs").glob(f"*{party}*.log"))
        eps = [float(x) for x in re.findall(rf"\[(?:\w+/)?{party}\] round \d: DP-SGD, sample-level ε=([0-9.]+)", logs)]
        assert len(eps) == 2 and 0 < eps[0] < eps[1], logs[-2000:]
        assert next(p for p in st.parties if p.name.endswith(party)).sample_epsilon == pytest.approx(eps[1], abs=1e-3)
    print(f"\nsample-level ε per round: {[h.sample_epsilon for h in rounds]}")
