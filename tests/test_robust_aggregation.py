"""Byzantine-robust aggregation: one attacking party keeps the global adapter near the honest mean.

Honest parties move the global by the same delta plus small noise (1 % of it per element); the
attacker sends the delta scaled by 100, sign-flipped, or 1e30 in every element (finite in float32,
so verification lets it through). Errors are measured relative to the honest mean's delta.
"""

from __future__ import annotations

import pytest
import torch
from fedtune.api.protocol import AggregatorTicket
from fedtune.api.robust import RobustSpec
from fedtune.api.status import utcnow
from fedtune_trainer.strategies import aggregate_round, combine, make_strategy, robust_combine
from fedtune_trainer.strategies.robust import coordinate_wise, krum_scores, krum_select
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

QUERY = "base_model.model.encoder.layer.0.attention.query"
A, B = f"{QUERY}.lora_A.weight", f"{QUERY}.lora_B.weight"
HEAD, STEP = "base_model.model.classifier.weight", "base_model.model.counter"
ROBUST = 0.05  # a robust aggregate's distance from the honest mean, relative to the honest delta
FAR = 0.4  # FedAvg's at least (the sign flip, the mildest attack, moves it by half the delta)


def make_global(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        A: torch.randn(4, 16, generator=g),
        B: torch.randn(32, 4, generator=g),
        HEAD: torch.randn(2, 8, generator=g),
        STEP: torch.tensor([7]),  # not floating: must agree and pass through
    }


def floating(tensors):
    return {k: v for k, v in tensors.items() if v.is_floating_point()}


class Scene:
    """A global adapter, `honest` parties near one delta, and updates built from them."""

    def __init__(self, honest: int, seed: int = 0):
        self.g = make_global(seed)
        gen = torch.Generator().manual_seed(seed + 1)
        self.delta = {k: 0.1 * torch.randn(v.shape, generator=gen) for k, v in floating(self.g).items()}
        self.honest = [self.moved(1.0, noise=0.001, gen=gen) for _ in range(honest)]
        self.honest_mean, _ = combine(self.honest, [1.0] * honest)

    def moved(self, scale: float, noise: float = 0.0, gen=None) -> dict[str, torch.Tensor]:
        out = {k: v.clone() for k, v in self.g.items()}
        for k, d in self.delta.items():
            out[k] = self.g[k] + scale * d + noise * torch.randn(d.shape, generator=gen)
        return out

    def attacker(self, attack: str) -> dict[str, torch.Tensor]:
        if attack == "scaled":
            return self.moved(100.0)
        if attack == "signflip":
            return self.moved(-1.0)
        assert attack == "huge"
        return {k: torch.full_like(v, 1e30) if v.is_floating_point() else v.clone() for k, v in self.g.items()}

    def relative_error(self, tensors) -> float:
        """‖aggregate − honest mean‖ / ‖honest mean − global‖ over the floating tensors."""
        err = sum((tensors[k].double() - self.honest_mean[k].double()).square().sum() for k in self.delta)
        ref = sum((self.honest_mean[k].double() - self.g[k].double()).square().sum() for k in self.delta)
        return float((err / ref).sqrt())


ATTACKS = ["scaled", "signflip", "huge"]
# (spec, honest parties): median and trimmed mean hold with one attacker of four; Krum's guarantee
# needs n > 2f + 2, so f = 1 takes five parties (with f = 0, four, it still drops a lone outlier).
RULES = [
    (dict(rule="median"), 3),
    (dict(rule="trimmedMean", trimFraction=0.25), 3),
    (dict(rule="krum", byzantine=1), 4),
    (dict(rule="krum", byzantine=0), 3),
    (dict(rule="multiKrum", byzantine=1), 4),
    (dict(rule="multiKrum", byzantine=0, multiKrumSelect=2), 3),
    (dict(rule="median", normBound=10.0), 3),  # above every honest norm (~1.4)
]


@pytest.mark.parametrize("attack", ATTACKS)
@pytest.mark.parametrize("params, honest", RULES, ids=lambda p: str(p))
def test_one_attacker_leaves_robust_rules_near_the_honest_mean_and_fedavg_far(params, honest, attack):
    scene = Scene(honest)
    updates = [*scene.honest, scene.attacker(attack)]
    weights = [10.0] * honest + [1000.0]  # the attacker also claims many samples; robust rules ignore it
    fedavg, _ = aggregate_round(scene.g, updates, weights, make_strategy("fedavg"))
    robust, _ = aggregate_round(scene.g, updates, weights, make_strategy("fedavg"), robust=RobustSpec(**params))
    assert scene.relative_error(fedavg) > FAR
    assert scene.relative_error(robust) < ROBUST
    assert torch.equal(robust[STEP], scene.g[STEP])
    assert all(torch.isfinite(v).all() for v in robust.values())


@pytest.mark.parametrize("rule", ["krum", "multiKrum"])
@pytest.mark.parametrize("attack", ATTACKS)
def test_krum_never_keeps_the_attacker(rule, attack):
    scene = Scene(4)
    updates = [scene.attacker(attack), *scene.honest]  # first: ties must not favour it either
    kept = krum_select(scene.g, updates, byzantine=1, keep=1 if rule == "krum" else 4)
    assert 0 not in kept and len(kept) == (1 if rule == "krum" else 4)


@pytest.mark.parametrize("attack", ["scaled", "huge"])
def test_norm_bounding_limits_an_attacker_to_its_share_of_the_bound(attack):
    """With the weighted mean, a clipped attacker of weight w moves the aggregate by at most w·(bound + ‖h‖)."""
    scene = Scene(3)
    honest_norm = scene.relative_error({k: scene.g[k] for k in scene.delta})  # = 1 by construction
    assert honest_norm == pytest.approx(1.0)
    norm = float(sum((scene.honest_mean[k] - scene.g[k]).double().square().sum() for k in scene.delta).sqrt())
    bound = 1.5 * norm
    updates = [*scene.honest, scene.attacker(attack)]
    spec = RobustSpec(normBound=bound)
    combined, _, report = robust_combine(scene.g, updates, [1.0] * 4, spec)
    fedavg, _ = combine(updates, [1.0] * 4)
    assert report.clipped == [3]
    assert scene.relative_error(combined) <= 0.25 * (bound + norm) / norm + 0.01
    assert scene.relative_error(fedavg) > 20


def test_without_an_attacker_the_rules_are_the_mean_or_near_it():
    scene = Scene(4)
    weights = [1.0, 2.0, 3.0, 4.0]
    weighted, _ = combine(scene.honest, weights)
    unweighted = scene.honest_mean

    def run(**params):
        return robust_combine(scene.g, scene.honest, weights, RobustSpec(**params))[0]

    def same(x, y):
        return all(torch.allclose(x[k], y[k], atol=1e-6) for k in x)

    assert same(run(), weighted)  # rule mean is the sample-weighted mean
    assert same(run(normBound=1e6), weighted)  # a bound no update reaches changes nothing
    assert same(run(rule="multiKrum", byzantine=0, multiKrumSelect=4), unweighted)  # everyone kept
    for params in (dict(rule="median"), dict(rule="trimmedMean"), dict(rule="krum", byzantine=0)):
        assert scene.relative_error(run(**params)) < ROBUST, params


def test_median_and_trimmed_mean_by_hand():
    g = {"w": torch.zeros(2)}
    ups = [{"w": torch.tensor([v, -v])} for v in (1.0, 2.0, 3.0, 100.0)]
    assert coordinate_wise(g, ups, "median")["w"].tolist() == [2.5, -2.5]  # the mean of the middle two
    five = [*ups, {"w": torch.tensor([4.0, -4.0])}]
    assert coordinate_wise(g, five, "median")["w"].tolist() == [3.0, -3.0]
    assert coordinate_wise(g, five, "trimmedMean", 0.2)["w"].tolist() == [3.0, -3.0]  # mean of 2, 3, 4
    assert coordinate_wise(g, five, "trimmedMean", 0.39)["w"].tolist() == [3.0, -3.0]  # ⌊1.95⌋ = 1 per end
    # a shifted global shifts the deltas, not the result
    moved = {"w": torch.tensor([50.0, 50.0])}
    assert coordinate_wise(moved, five, "median")["w"].tolist() == [3.0, -3.0]


def test_krum_scores_by_hand():
    g = {"w": torch.zeros(1)}
    ups = [{"w": torch.tensor([v])} for v in (0.0, 1.0, 3.0, 10.0, 11.0)]
    # f = 1, n = 5: each score sums the squared distances to the 2 nearest others
    assert krum_scores(g, ups, 1).tolist() == [1 + 9, 1 + 4, 4 + 9, 1 + 49, 1 + 64]
    assert krum_select(g, ups, 1, 1) == [1]
    assert krum_select(g, ups, 1, 3) == [0, 1, 2]


def test_dtype_is_kept_and_huge_distances_do_not_overflow():
    scene = Scene(4)
    bf16 = [{k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in u.items()} for u in scene.honest]
    attacker = {k: torch.full_like(v, 3e38) if v.is_floating_point() else v for k, v in bf16[0].items()}
    g = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in scene.g.items()}
    for spec in (RobustSpec(rule="median"), RobustSpec(rule="krum"), RobustSpec(normBound=1.0)):
        out, _, _ = robust_combine(g, [*bf16, attacker], [1.0] * 5, spec)
        assert out[A].dtype == torch.bfloat16 and all(torch.isfinite(v).all() for v in out.values()), spec
    assert torch.isfinite(krum_scores(g, [*bf16, attacker], 1)).all()


def test_exact_lora_mode_takes_krum_and_norm_bounds_and_refuses_coordinate_rules():
    scene = Scene(4)
    updates = [*scene.honest, scene.attacker("scaled")]

    def product(t):
        return t[B].double() @ t[A].double()

    honest_product = sum(product(u) for u in scene.honest) / 4
    for spec in (RobustSpec(rule="krum"), RobustSpec(rule="multiKrum")):
        out, residual, report = robust_combine(scene.g, updates, [1.0] * 5, spec, "exact")
        assert 4 not in report.selected and residual is not None
        err = (product(out) - honest_product).norm() / (honest_product - product(scene.g)).norm()
        assert err < ROBUST, spec
    for rule in ("median", "trimmedMean"):
        with pytest.raises(ValueError, match=f"rule {rule} with loraMode exact is not supported.*loraMode average"):
            robust_combine(scene.g, updates, [1.0] * 5, RobustSpec(rule=rule), "exact")


@pytest.mark.parametrize(
    "params, n, message",
    [
        (dict(rule="krum", byzantine=1), 4, r"krum with byzantine 1 needs more than 2\*1\+2 = 4 updates .* have 4"),
        (dict(rule="multiKrum", byzantine=2), 6, r"needs more than 2\*2\+2 = 6 updates"),
        (dict(rule="trimmedMean", trimFraction=0.25), 3, r"trims nothing of 3 updates"),
        (dict(rule="multiKrum", byzantine=0, multiKrumSelect=4), 3, r"multiKrumSelect \(4\) is more than"),
    ],
)
def test_too_few_updates_this_round_fail_with_the_spec_words(params, n, message):
    """Parties dropped or were rejected: the round fails clearly instead of aggregating unguarded."""
    scene = Scene(n)
    with pytest.raises(ValueError, match="aggregator.robust: .*" + message):
        robust_combine(scene.g, scene.honest, [1.0] * n, RobustSpec(**params))


def test_robust_rules_check_the_update_keys_and_non_floating_tensors():
    scene = Scene(3)
    missing = {k: v for k, v in scene.honest[0].items() if k != HEAD}
    with pytest.raises(ValueError, match="update #1 has other tensors than expected: missing"):
        robust_combine(scene.g, [scene.honest[0], missing, scene.honest[1]], [1.0] * 3, RobustSpec(rule="median"))
    other = {**scene.honest[2], STEP: torch.tensor([8])}
    with pytest.raises(ValueError, match="counter .* differs across updates"):
        robust_combine(scene.g, [*scene.honest[:2], other], [1.0] * 3, RobustSpec(rule="median"))


def test_server_optimisers_step_on_the_robust_combination_and_their_state_survives_a_restart():
    scene = Scene(3)
    spec = RobustSpec(rule="median")
    rounds = [[*scene.honest, scene.attacker("scaled")], [*scene.honest, scene.attacker("huge")]]
    # FedAdam on top: its first step is exactly FedAdam's step on the median
    robust_adam = make_strategy("fedadam")
    first, _ = aggregate_round(scene.g, rounds[0], [1.0] * 4, robust_adam, robust=spec)
    expected = make_strategy("fedadam").aggregate(scene.g, coordinate_wise(scene.g, rounds[0], "median"))
    assert all(torch.equal(first[k], expected[k]) for k in first)
    # a restart between rounds (state through safetensors bytes) continues exactly
    resumed = make_strategy("fedadam")
    resumed.load_state_dict(st_load(st_save(robust_adam.state_dict())))
    again, _ = aggregate_round(first, rounds[1], [1.0] * 4, resumed, robust=spec)
    straight, _ = aggregate_round(first, rounds[1], [1.0] * 4, robust_adam, robust=spec)
    assert all(torch.equal(again[k], straight[k]) for k in again)
    # and the attacker moved FedAdam's global no further than the honest parties would have
    honest_only = make_strategy("fedadam")
    clean, _ = aggregate_round(scene.g, scene.honest, [1.0] * 3, honest_only)
    assert max((first[k] - clean[k]).abs().max().item() for k in scene.delta) < 1e-3


def test_the_robust_settings_travel_in_the_ticket():
    spec = RobustSpec(rule="multiKrum", byzantine=1, multiKrumSelect=3, normBound=2.5)
    ticket = AggregatorTicket(kind="aggregate", job="j", round=1, deadline=utcnow(), robust=spec)
    wire = ticket.to_wire()
    assert wire["robust"] == {"rule": "multiKrum", "byzantine": 1, "multiKrumSelect": 3, "normBound": 2.5}
    assert AggregatorTicket.model_validate(wire).robust == spec
    plain = AggregatorTicket(kind="aggregate", job="j", round=1, deadline=utcnow())
    assert "robust" not in plain.to_wire() and AggregatorTicket.model_validate(plain.to_wire()).robust is None
