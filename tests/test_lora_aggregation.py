"""LoRA combination: averaging factors versus the exact mean of products B·A."""

from __future__ import annotations

import pytest
import torch
from fedtune_trainer.strategies import aggregate_round, combine, make_strategy
from fedtune_trainer.strategies.lora import exact_combine, lora_pairs

A = "base_model.model.layer.0.q.lora_A.weight"
B = "base_model.model.layer.0.q.lora_B.weight"
R, N_IN, N_OUT = 2, 6, 5


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def product(upd: dict[str, torch.Tensor], a: str = A, b: str = B) -> torch.Tensor:
    return upd[b].double() @ upd[a].double()


def mean_product(updates, weights, a=A, b=B) -> torch.Tensor:
    total = sum(weights)
    return sum(w / total * product(u, a, b) for u, w in zip(updates, weights))


def rel(x: torch.Tensor, y: torch.Tensor) -> float:
    return float(torch.linalg.norm(x - y) / torch.linalg.norm(y))


def base_factors(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = gen(seed)
    return torch.randn(R, N_IN, generator=g), torch.randn(N_OUT, R, generator=g)


def same_product_pairs(kind: str) -> list[dict[str, torch.Tensor]]:
    """Two parties whose products are identical (so the mean has rank r) but factors differ."""
    a, b = base_factors()
    if kind == "rescaled":
        return [{A: a, B: b}, {A: a / 2, B: 2 * b}]
    if kind == "sign-flipped":
        return [{A: a, B: b}, {A: -a, B: -b}]
    q, _ = torch.linalg.qr(torch.randn(R, R, generator=gen(7)))  # random rotation of the rank space
    return [{A: a, B: b}, {A: q.T @ a, B: b @ q}]


# Averaging factors gives (B + 2B)/2 · (A + A/2)/2 = 1.125·BA for "rescaled" (gap 0.125),
# and 0 for "sign-flipped" (gap 1); the exact mean of products is BA in every case.
@pytest.mark.parametrize("kind, min_gap", [("rescaled", 0.12), ("sign-flipped", 0.99), ("rotated", 0.05)])
def test_exact_reproduces_mean_of_products_and_average_does_not(kind, min_gap):
    updates, weights = same_product_pairs(kind), [1.0, 1.0]
    target = mean_product(updates, weights)

    exact, residual = combine(updates, weights, "exact")
    assert rel(product(exact), target) < 1e-5
    assert residual is not None and residual < 1e-6

    averaged, none = combine(updates, weights, "average")
    assert none is None
    assert rel(product(averaged), target) > min_gap


def test_exact_with_weights_and_shared_a():
    # Parties share A, so Σ wᵢBᵢA = (Σ wᵢBᵢ)A has rank <= r; weights 1:3 as sample counts.
    a, b1 = base_factors(1)
    _, b2 = base_factors(2)
    updates = [{A: a, B: b1}, {A: a, B: b2}]
    exact, residual = combine(updates, [1, 3], "exact")
    torch.testing.assert_close(product(exact), (0.25 * b1.double() + 0.75 * b2.double()) @ a.double())
    assert residual < 1e-6


def test_rank_above_r_leaves_the_svd_tail_as_residual():
    g = gen(3)
    updates = [{A: torch.randn(R, N_IN, generator=g), B: torch.randn(N_OUT, R, generator=g)} for _ in range(3)]
    weights = [2.0, 1.0, 1.0]
    target = mean_product(updates, weights)  # rank min(3·2, 5) = 5 > r = 2
    s = torch.linalg.svdvals(target)
    tail = float(s[R:].square().sum().sqrt() / s.square().sum().sqrt())
    assert tail > 0.05  # a genuinely lossy case

    exact, residual = combine(updates, weights, "exact")
    assert residual == pytest.approx(tail, rel=1e-6)
    # ... and the re-factored product is the best rank-r approximation (Eckart–Young).
    u, _, vh = torch.linalg.svd(target)
    best = u[:, :R] @ torch.diag(s[:R]) @ vh[:R]
    torch.testing.assert_close(product(exact), best, atol=1e-5, rtol=1e-5)
    assert rel(product(exact), target) == pytest.approx(tail, rel=1e-5)
    # Balanced split: both factors carry √S.
    torch.testing.assert_close(exact[A].double().norm(), exact[B].double().norm(), rtol=1e-5, atol=0)


def test_residual_is_the_maximum_over_modules():
    a2, b2 = A.replace("layer.0", "layer.1"), B.replace("layer.0", "layer.1")
    lossless = same_product_pairs("rotated")
    g = gen(5)
    lossy = [{a2: torch.randn(R, N_IN, generator=g), b2: torch.randn(N_OUT, R, generator=g)} for _ in range(2)]
    updates = [{**x, **y} for x, y in zip(lossless, lossy)]
    _, per_module = exact_combine(updates, [1, 1])
    assert per_module["base_model.model.layer.0.q"] < 1e-6
    assert per_module["base_model.model.layer.1.q"] > 0.01
    _, residual = combine(updates, [1, 1], "exact")
    assert residual == max(per_module.values())


def test_non_lora_tensors_are_averaged_in_exact_mode():
    extra = ["classifier.weight", "base_model.model.layer.0.q.lora_B.bias", "ia3_l", "prompt_embeddings"]
    updates = []
    for value in (1.0, 4.0):
        upd = dict(same_product_pairs("rescaled")[0])
        upd.update({k: torch.full((2, 3), value) for k in extra})
        updates.append(upd)
    exact, _ = combine(updates, [2, 1], "exact")
    for key in extra:  # (2·1 + 1·4) / 3 = 2
        torch.testing.assert_close(exact[key], torch.full((2, 3), 2.0))


NAMING = [
    # peft's saved adapter (adapter name stripped), in-model names, embeddings, convolutions
    ("m.q.lora_A.weight", "m.q.lora_B.weight", (R, N_IN), (N_OUT, R)),
    ("m.q.lora_A.default.weight", "m.q.lora_B.default.weight", (R, N_IN), (N_OUT, R)),
    ("m.emb.lora_embedding_A", "m.emb.lora_embedding_B", (R, 10), (N_IN, R)),
    ("m.emb.lora_embedding_A.default", "m.emb.lora_embedding_B.default", (R, 10), (N_IN, R)),
    ("m.conv.lora_A.weight", "m.conv.lora_B.weight", (R, 3, 2, 2), (4, R, 1, 1)),
]


@pytest.mark.parametrize("key_a, key_b, shape_a, shape_b", NAMING)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_naming_forms_shapes_and_dtypes(key_a, key_b, shape_a, shape_b, dtype):
    assert list(lora_pairs([key_a, key_b, "m.head.weight"]).values()) == [(key_a, key_b)]
    g = gen(11)
    base_a, base_b = torch.randn(shape_a, generator=g), torch.randn(shape_b, generator=g)
    # Same product for both parties (B·2, A/2): exact must give back exactly that product.
    updates = [
        {key_a: base_a.to(dtype), key_b: base_b.to(dtype)},
        {key_a: (base_a / 2).to(dtype), key_b: (base_b * 2).to(dtype)},
    ]
    out, residual = combine(updates, [1, 1], "exact")
    assert out[key_a].dtype == dtype and out[key_b].dtype == dtype
    assert out[key_a].shape == shape_a and out[key_b].shape == shape_b
    flat = lambda a, b: b.double().reshape(shape_b[0], R) @ a.double().reshape(R, -1)  # noqa: E731
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert rel(flat(out[key_a], out[key_b]), flat(updates[0][key_a], updates[0][key_b])) < tol
    assert residual < 1e-6


def test_zero_product_keeps_factors_trainable():
    # Round-0 LoRA: B = 0. The mean product is 0; B' must be 0 and A' rows unit vectors,
    # not A' = 0 too (B = A = 0 has zero gradient in both factors and would never learn).
    updates = [{A: torch.randn(R, N_IN, generator=gen(i)), B: torch.zeros(N_OUT, R)} for i in range(2)]
    out, residual = combine(updates, [1, 1], "exact")
    assert torch.count_nonzero(out[B]) == 0
    torch.testing.assert_close(out[A].norm(dim=1), torch.ones(R))
    assert residual == 0.0


def test_rank_deficient_mean_revives_only_the_null_components():
    a, b = base_factors(4)
    b[:, 1] = 0  # product has rank 1 < r
    out, residual = combine([{A: a, B: b}], [1], "exact")
    assert rel(product(out), product({A: a, B: b})) < 1e-6
    assert torch.count_nonzero(out[B][:, 1]) == 0
    assert float(out[A][1].norm()) == pytest.approx(1.0, rel=1e-5)
    assert residual < 1e-6


def test_exact_round_with_fedavg_puts_the_mean_product_in_the_global():
    updates = same_product_pairs("sign-flipped")
    prev = {A: torch.zeros(R, N_IN), B: torch.zeros(N_OUT, R)}
    new, residual = aggregate_round(prev, updates, [1, 1], make_strategy("fedavg"), "exact")
    assert rel(product(new), mean_product(updates, [1, 1])) < 1e-5
    assert residual < 1e-6


@pytest.mark.parametrize(
    "keys, message",
    [
        (["m.q.lora_A.weight"], "m.q.lora_A.weight has no matching m.q.lora_B.weight"),
        (["m.q.lora_B.weight"], "m.q.lora_B.weight has no matching lora_A"),
    ],
)
def test_unpaired_factors_are_refused(keys, message):
    with pytest.raises(ValueError, match=message):
        lora_pairs(keys)


def test_adalora_and_unknown_modes_are_refused():
    upd = {"m.lora_A": torch.ones(R, 3), "m.lora_B": torch.ones(3, R), "m.lora_E": torch.ones(R, 1)}
    with pytest.raises(ValueError, match="AdaLoRA"):
        combine([upd], [1], "exact")
    with pytest.raises(ValueError, match="unknown LoRA aggregation mode 'svd'"):
        combine([upd], [1], "svd")
