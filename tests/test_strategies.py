"""Server strategies against numbers worked out by hand (no I/O)."""

from __future__ import annotations

import pytest
import torch
from fedtune.api.methods import SERVER_STATE_COPIES, STRATEGIES
from fedtune_trainer.strategies import REGISTRY, aggregate_round, make_strategy, weighted_mean
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save


def t(*values: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype)


def test_registry_matches_methods_table():
    assert set(REGISTRY) == set(STRATEGIES)
    for name, cls in REGISTRY.items():
        assert cls.name == name
        # the control plane sizes the server state's upload from this table
        assert SERVER_STATE_COPIES.get(name, 0) == len(cls.state_prefixes), name


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_defaults_come_from_methods_table(name):
    assert make_strategy(name, {}).params == {k: p.default for k, p in STRATEGIES[name].items()}


def test_weighted_mean_by_hand():
    a = {"w": t(1.0, 2.0), "b": t(0.0)}
    b = {"w": t(3.0, 6.0), "b": t(4.0)}
    # weights 1 and 3 (samples): w = (1·[1,2] + 3·[3,6]) / 4 = [2.5, 5.0]; b = 3·4/4 = 3
    out = weighted_mean([a, b], [1, 3])
    torch.testing.assert_close(out["w"], t(2.5, 5.0))
    torch.testing.assert_close(out["b"], t(3.0))


def test_weighted_mean_of_some_names_still_checks_all():
    a = {"w": t(1.0, 2.0), "b": t(0.0)}
    b = {"w": t(3.0, 6.0), "b": t(4.0)}
    assert list(weighted_mean([a, b], [1, 3], names=["w"])) == ["w"]
    with pytest.raises(ValueError, match="missing b"):
        weighted_mean([a, {"w": t(3.0, 6.0)}], [1, 3], names=["w"])


def test_weighted_mean_keeps_dtype_and_sums_in_float32():
    # 100 equal updates of 1.0: summing 0.01-weighted terms in bf16 drifts to ~1.047,
    # a float32 accumulator lands back on 1.0.
    out = weighted_mean([{"w": t(1.0, dtype=torch.bfloat16)}] * 100, [1] * 100)
    assert out["w"].dtype == torch.bfloat16
    assert float(out["w"]) == 1.0


@pytest.mark.parametrize(
    "updates, weights, message",
    [
        ([], [], "no updates"),
        ([{"w": t(1.0)}], [1, 2], "1 update(s) but 2 weight(s)"),
        ([{"w": t(1.0)}, {"w": t(2.0)}], [0, 0], "sum to 0"),
        ([{"w": t(1.0)}, {"w": t(2.0)}], [1, -1], ">= 0"),
        ([{"w": t(1.0)}, {"v": t(2.0)}], [1, 1], "missing w"),
        ([{"w": t(1.0)}, {"w": t(1.0, 2.0)}], [1, 1], "different shapes"),
    ],
)
def test_weighted_mean_refuses_bad_input(updates, weights, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        weighted_mean(updates, weights)


def test_fedavg_and_fedprox_take_the_mean():
    prev = {"w": t(10.0, 10.0)}
    updates = [{"w": t(1.0, 2.0)}, {"w": t(3.0, 6.0)}]
    for name in ("fedavg", "fedprox"):
        new, residual = aggregate_round(prev, updates, [1, 3], make_strategy(name), "average")
        torch.testing.assert_close(new["w"], t(2.5, 5.0))
        assert residual is None
        assert make_strategy(name).state_dict() == {}


# Adaptive optimisers with eta=0.2, beta1=0.5, beta2=0.96, tau=0.15, x0 = [1, 1],
# deltas [0.5, 0.5] then [-0.5, -0.05] (delta = average - previous global). By hand:
# Adam  r1: m = .5·.5 = .25, v = .04·.25 = .01, x = 1 + .2·.25/(.1+.15) = 1.2
#       r2: m = [.125-.25, .125-.025] = [-.125, .1], v = [.0096+.01, .0096+.0001] = [.0196, .0097]
#           x0 = 1.2 - .025/(.14+.15) = 1.1137931; x1 = 1.2 + .02/(√.0097+.15) = 1.2804866
# Yogi  r1: v = 0 - .04·.25·sign(0-.25) = .01 → same as Adam
#       r2: v = .01 - .04·[.25, .0025]·sign(.01-[.25, .0025]) = [.02, .0099]
#           x0 = 1.2 - .025/(√.02+.15) = 1.1142136; x1 = 1.2 + .02/(√.0099+.15) = 1.2801607
# Adagrad (beta1 = 0: m = delta) r1: v = .25, x = 1 + .2·.5/(.5+.15) = 1.1538462
#       r2: v = [.5, .2525], x0 = 1.1538462 - .1/(√.5+.15) = 1.0371746,
#           x1 = 1.1538462 - .01/(√.2525+.15) = 1.1385203
ADAPTIVE = [
    ("fedadam", {"beta1": 0.5, "beta2": 0.96}, (1.2, 1.2), (1.1137931, 1.2804866)),
    ("fedyogi", {"beta1": 0.5, "beta2": 0.96}, (1.2, 1.2), (1.1142136, 1.2801607)),
    ("fedadagrad", {}, (1.1538462, 1.1538462), (1.0371746, 1.1385203)),
]
DELTAS = [t(0.5, 0.5), t(-0.5, -0.05)]


@pytest.mark.parametrize("name, extra, step1, step2", ADAPTIVE)
def test_adaptive_optimisers_two_steps_by_hand(name, extra, step1, step2):
    strategy = make_strategy(name, {"serverLearningRate": 0.2, "tau": 0.15, **extra})
    x = {"w": t(1.0, 1.0)}
    for delta, expected in zip(DELTAS, (step1, step2)):
        x = strategy.aggregate(x, {"w": x["w"] + delta})
        torch.testing.assert_close(x["w"], t(*expected), atol=1e-6, rtol=0)


def test_fedadagrad_keeps_no_first_moment():
    strategy = make_strategy("fedadagrad", {"serverLearningRate": 0.2, "tau": 0.15})
    strategy.aggregate({"w": t(1.0)}, {"w": t(1.5)})
    assert sorted(strategy.state_dict()) == ["v/w"]


def test_fedavgm_two_steps_by_hand():
    # lr 0.5, momentum 0.9, x0 = 1.
    # r1: avg 0.8 → g = 0.2, buf = 0.2, x = 1 - 0.5·0.2 = 0.9
    # r2: avg 0.8 → g = 0.1, buf = 0.9·0.2 + 0.1 = 0.28, x = 0.9 - 0.5·0.28 = 0.76
    strategy = make_strategy("fedavgm", {"serverLearningRate": 0.5, "momentum": 0.9})
    x = strategy.aggregate({"w": t(1.0)}, {"w": t(0.8)})
    torch.testing.assert_close(x["w"], t(0.9))
    x = strategy.aggregate(x, {"w": t(0.8)})
    torch.testing.assert_close(x["w"], t(0.76))
    torch.testing.assert_close(strategy.state_dict()["momentum/w"], t(0.28))


def test_fedavgm_without_momentum_and_unit_rate_is_fedavg():
    strategy = make_strategy("fedavgm", {"serverLearningRate": 1.0, "momentum": 0.0})
    x = {"w": t(1.0, -2.0)}
    for target in (t(0.5, 0.5), t(3.0, -1.0)):
        x = strategy.aggregate(x, {"w": target})
        torch.testing.assert_close(x["w"], target)


@pytest.mark.parametrize("name", ["fedadam", "fedyogi", "fedadagrad", "fedavgm"])
def test_state_survives_a_restart(name):
    prev = {"w": t(1.0, -1.0, 0.5), "b": t(0.25)}
    r1 = {"w": t(1.3, -0.8, 0.1), "b": t(0.5)}
    first = make_strategy(name)
    after_r1 = first.aggregate(prev, r1)
    r2 = {k: v + 0.2 for k, v in after_r1.items()}

    saved = st_save(first.state_dict())  # what the aggregator uploads between rounds
    resumed = make_strategy(name)
    resumed.load_state_dict(st_load(saved))
    expected = first.aggregate(after_r1, r2)
    got = resumed.aggregate(after_r1, r2)
    for key in expected:
        assert torch.equal(got[key], expected[key]), key

    # Without the state the step differs, so this test would catch state being ignored.
    amnesiac = make_strategy(name).aggregate(after_r1, r2)
    assert not torch.allclose(amnesiac["w"], expected["w"])


def test_state_dict_is_a_copy_and_caller_params_are_untouched():
    params = {"serverLearningRate": 0.1}
    strategy = make_strategy("fedadam", params)
    assert params == {"serverLearningRate": 0.1}
    strategy.aggregate({"w": t(1.0)}, {"w": t(2.0)})
    strategy.state_dict()["v/w"].fill_(123.0)
    assert float(strategy.state_dict()["v/w"]) != 123.0


def test_inputs_are_not_modified_and_dtype_is_kept():
    prev = {"w": t(1.0, 2.0, dtype=torch.float16)}
    avg = {"w": t(2.0, 3.0, dtype=torch.float16)}
    before = (prev["w"].clone(), avg["w"].clone())
    out = make_strategy("fedyogi").aggregate(prev, avg)
    assert out["w"].dtype == torch.float16
    assert torch.equal(prev["w"], before[0]) and torch.equal(avg["w"], before[1])


def test_state_from_another_strategy_is_refused():
    adam = make_strategy("fedadam")
    adam.aggregate({"w": t(1.0)}, {"w": t(2.0)})
    with pytest.raises(ValueError, match="fedavgm cannot resume .* m/w"):
        make_strategy("fedavgm").load_state_dict(adam.state_dict())


def test_state_of_another_adapter_is_refused_and_state_is_unchanged():
    strategy = make_strategy("fedadam")
    saved = {"m/a": t(0.0), "v/a": t(0.0), "m/w": t(0.0, 0.0), "v/w": t(0.0, 0.0)}
    strategy.load_state_dict(saved)
    # "a" is stepped first, then "w" fails: the half-done round must not leak into the state.
    with pytest.raises(ValueError, match=r"m/w has shape \(2,\), adapter has \(3,\)"):
        strategy.aggregate({"a": t(1.0), "w": t(1.0, 1.0, 1.0)}, {"a": t(2.0), "w": t(2.0, 2.0, 2.0)})
    with pytest.raises(ValueError, match="server state has tensors the adapter lacks"):
        strategy.aggregate({"x": t(1.0)}, {"x": t(2.0)})
    assert all(torch.equal(strategy.state_dict()[k], v) for k, v in saved.items())


def test_update_must_cover_the_global_adapter():
    with pytest.raises(ValueError, match="missing b"):
        make_strategy("fedavg").aggregate({"w": t(1.0), "b": t(1.0)}, {"w": t(2.0)})


@pytest.mark.parametrize(
    "name, params, message",
    [
        ("fedsgd", {}, "unknown strategy 'fedsgd'; choose one of: fedadagrad, fedadam"),
        (
            "fedadagrad",
            {"beta1": 0.9},
            r"strategy 'fedadagrad' has no parameter\(s\) beta1; it accepts: serverLearningRate, tau",
        ),
        ("fedadam", {"beta1": 1.0}, "beta1 must be < 1.0"),
        ("fedavgm", {"serverLearningRate": 0.0}, "serverLearningRate must be > 0.0"),
    ],
)
def test_bad_strategy_or_params_report_methods_messages(name, params, message):
    with pytest.raises(ValueError, match=message):
        make_strategy(name, params)
