"""LoRA combination: averaging factors versus the exact mean of products B·A."""

from __future__ import annotations

import weakref
from collections.abc import Mapping

import pytest
import torch
from fedtune_trainer.strategies import aggregate_round, combine, lora, make_strategy
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
    out, residual = combine(updates, [1, 3], "exact")
    assert torch.count_nonzero(out[B]) == 0
    torch.testing.assert_close(out[A] @ out[A].T, torch.eye(R))
    # ... in the directions of the parties' mean A (their init), not arbitrary axes.
    mean_a = 0.25 * updates[0][A] + 0.75 * updates[1][A]
    torch.testing.assert_close(out[A] @ torch.linalg.pinv(mean_a) @ mean_a, out[A])
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


# --- the batched Gram route against an explicit dense SVD --------------------------------------


def flat_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """B·A in float64 for any peft layout (Linear, Embedding, Conv)."""
    rank = a.shape[0]
    return b.double().reshape(b.shape[0], rank) @ a.double().reshape(rank, -1)


def dense_reference(updates, weights, key_a, key_b):
    """Best rank-r approximation of M = Σ wᵢBᵢAᵢ from a float64 SVD of M itself, its kept
    singular values and the relative residual of the rest."""
    total = sum(weights)
    m = sum(w / total * flat_product(u[key_a], u[key_b]) for u, w in zip(updates, weights))
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    keep = min(updates[0][key_a].shape[0], s.numel())
    norm = float(s.square().sum().sqrt())
    residual = float(s[keep:].square().sum().sqrt()) / norm if norm > 0 else 0.0
    return u[:, :keep] * s[:keep] @ vh[:keep], s[:keep], residual


def assert_matches_reference(out, residuals, updates, weights, module, key_a, key_b, tol=1e-6):
    best, s, residual = dense_reference(updates, weights, key_a, key_b)
    a, b, ref_a, ref_b = out[key_a], out[key_b], updates[0][key_a], updates[0][key_b]
    assert (a.shape, a.dtype, b.shape, b.dtype) == (ref_a.shape, ref_a.dtype, ref_b.shape, ref_b.dtype)
    assert float(torch.linalg.norm(flat_product(a, b) - best)) <= tol * float(torch.linalg.norm(best))
    # Balanced split: column k of B' and row k of A' both have norm √s_k (dead components: A' rows
    # of norm 1, checked where they occur).
    alive = int((s > 1e-6 * s.max()).sum()) if s.numel() else 0
    rank = a.shape[0]
    b_norms, a_norms = b.double().reshape(-1, rank).square().sum(0), a.double().reshape(rank, -1).square().sum(1)
    torch.testing.assert_close(b_norms[:alive], s[:alive], rtol=tol * 10, atol=0)
    torch.testing.assert_close(a_norms[:alive], s[:alive], rtol=tol * 10, atol=0)
    # Float64 Gram matrices resolve singular values down to ~1e-8·s₁ (rounding of S²), so tails
    # below that read as 0: a residual resolution of 2e-7, finer than the float32 outputs hold.
    assert residuals[module] == pytest.approx(residual, rel=1e-6, abs=2e-7)


def random_party(shapes: dict[str, tuple], seed: int, dtype=torch.float32) -> dict[str, torch.Tensor]:
    g = gen(seed)
    return {k: torch.randn(shape, generator=g).to(dtype) for k, shape in shapes.items()}


# Several modules of different shapes in one call: two of one Linear shape (batched together),
# a wider Linear, a Linear whose P·r exceeds a dimension, an Embedding and a Conv.
MIXED = {
    "m.l0.q": ((2, 6), (5, 2)),
    "m.l1.q": ((2, 6), (5, 2)),
    "m.l0.up": ((3, 40), (24, 3)),
    "m.l0.narrow": ((4, 3), (7, 4)),
    "m.emb": ((2, 10), (6, 2)),
    "m.conv": ((2, 3, 2, 2), (4, 2, 1, 1)),
}


def mixed_keys(module: str) -> tuple[str, str]:
    if module == "m.emb":
        return f"{module}.lora_embedding_A", f"{module}.lora_embedding_B"
    return f"{module}.lora_A.weight", f"{module}.lora_B.weight"


def mixed_updates(parties: int, dtype=torch.float32) -> list[dict[str, torch.Tensor]]:
    shapes = {}
    for module, (shape_a, shape_b) in MIXED.items():
        key_a, key_b = mixed_keys(module)
        shapes[key_a], shapes[key_b] = shape_a, shape_b
    shapes["m.head.weight"] = (3, 4)
    return [random_party(shapes, seed, dtype) for seed in range(parties)]


@pytest.mark.parametrize("parties", [1, 3])
def test_every_module_matches_a_dense_svd_in_one_call(parties):
    updates, weights = mixed_updates(parties), [3.0, 1.0, 2.0][:parties]
    out, residuals = exact_combine(updates, weights)
    assert list(out) == list(updates[0])  # same names, same order
    for module in MIXED:
        assert_matches_reference(out, residuals, updates, weights, module, *mixed_keys(module))
    if parties > 1:  # P·r > r: the mean product is genuinely lossy somewhere
        assert max(residuals.values()) > 0.05


def test_close_parties_match_the_dense_svd_to_1e6():
    # What federated rounds look like: every party starts from the same global factors and moves
    # a little, so the stacked factors are nearly rank r and their Gram matrices ill-conditioned
    # (condition numbers near 1e9 and 2e10 here). Float32 Gram matrices lose the small directions.
    g = gen(21)
    n_out, n_in, rank, parties = 96, 80, 8, 8
    spectrum = torch.logspace(0, -3, rank)
    a0 = torch.linalg.qr(torch.randn(n_in, rank, generator=g)).Q.T * spectrum[:, None]
    b0 = torch.randn(n_out, rank, generator=g) * 0.01
    updates = [
        {A: a0 + 1e-4 * torch.randn(rank, n_in, generator=g), B: b0 + 1e-6 * torch.randn(n_out, rank, generator=g)}
        for _ in range(parties)
    ]
    weights = [float(10 + i) for i in range(parties)]
    out, residuals = exact_combine(updates, weights)
    assert_matches_reference(out, residuals, updates, weights, "base_model.model.layer.0.q", A, B)


@pytest.mark.parametrize("case", ["identical", "all zero", "zero A", "rank above layer size"])
def test_rank_deficient_inputs(case):
    a, b = base_factors(8)
    if case == "identical":  # P copies: the stacked factors have rank r, not P·r
        updates = [{A: a, B: b}] * 4
    elif case == "all zero":
        updates = [{A: torch.zeros_like(a), B: torch.zeros_like(b)}] * 3
    elif case == "zero A":
        updates = [{A: torch.zeros_like(a), B: b}, {A: torch.zeros_like(a), B: 2 * b}]
    else:  # r = 4 > out = 3: only 3 components can exist, the 4th is padding
        g = gen(9)
        updates = [{A: torch.randn(4, N_IN, generator=g), B: torch.randn(3, 4, generator=g)} for _ in range(2)]
    out, residuals = exact_combine(updates, [1.0] * len(updates))
    assert_matches_reference(out, residuals, updates, [1.0] * len(updates), "base_model.model.layer.0.q", A, B)
    assert all(torch.isfinite(t).all() for t in out.values())
    if case == "rank above layer size":
        assert torch.count_nonzero(out[A][3]) == 0 and torch.count_nonzero(out[B][:, 3]) == 0
    elif case != "identical":  # M = 0: every component dead, revived as orthonormal A' rows
        assert torch.count_nonzero(out[B]) == 0
        torch.testing.assert_close(out[A] @ out[A].T, torch.eye(R))


def test_bf16_and_float32_modules_in_one_call():
    updates = mixed_updates(2)
    for upd in updates:  # the Linear pair and the Embedding in bf16, the rest float32
        for module in ("m.l0.q", "m.emb"):
            for key in mixed_keys(module):
                upd[key] = upd[key].to(torch.bfloat16)
    out, residuals = exact_combine(updates, [1.0, 1.0])
    for module in MIXED:
        # bf16 outputs hold 8 bits of mantissa; the reference uses the bf16 inputs' exact values.
        tol = 1e-2 if module in ("m.l0.q", "m.emb") else 1e-6
        assert_matches_reference(out, residuals, updates, [1.0, 1.0], module, *mixed_keys(module), tol=tol)


class LazyUpdate(Mapping):
    """An update whose tensors are made on access, like one read from disk; it counts reads and
    how many of the tensors it handed out are alive at once."""

    def __init__(self, tensors: dict[str, torch.Tensor], stats: dict[str, int]):
        self._tensors, self._stats = tensors, stats
        self.reads: dict[str, int] = {}

    def __getitem__(self, key):
        tensor = self._tensors[key].clone()
        self.reads[key] = self.reads.get(key, 0) + 1
        self._stats["live"] += 1
        self._stats["peak"] = max(self._stats["peak"], self._stats["live"])
        weakref.finalize(tensor, self._release)
        return tensor

    def _release(self):
        self._stats["live"] -= 1

    def __iter__(self):
        return iter(self._tensors)

    def __len__(self):
        return len(self._tensors)


@pytest.mark.parametrize("chunk_modules", [1, 2, 3, 100])
def test_chunks_give_the_same_result_and_read_factors_lazily(monkeypatch, chunk_modules):
    # 7 modules of one shape: chunks of 2 leave a last chunk of 1, chunks of 100 take all at once.
    shapes = {}
    for i in range(7):
        shapes[A.replace("layer.0", f"layer.{i}")], shapes[B.replace("layer.0", f"layer.{i}")] = (R, N_IN), (N_OUT, R)
    parties = 3
    plain = [random_party(shapes, seed) for seed in range(parties)]
    per_module = 8 * parties * R * (N_IN + N_OUT)  # float64 scratch of one module
    monkeypatch.setattr(lora, "_CHUNK_BYTES", chunk_modules * per_module)
    stats = {"live": 0, "peak": 0}
    lazy = [LazyUpdate(u, stats) for u in plain]
    out, residuals = exact_combine(lazy, [1.0, 2.0, 3.0])
    for i in range(7):
        key_a, key_b = A.replace("layer.0", f"layer.{i}"), B.replace("layer.0", f"layer.{i}")
        assert_matches_reference(out, residuals, plain, [1.0, 2.0, 3.0], key_a.rsplit(".lora_A", 1)[0], key_a, key_b)
    # Party 0's factors are read once more for their shapes; no plain mean of the factors.
    assert set(lazy[0].reads.values()) == {2} and all(set(u.reads.values()) == {1} for u in lazy[1:])
    assert stats["peak"] <= 2 * parties * min(chunk_modules, 7)  # never every factor of every party


def test_factor_shapes_must_agree_across_parties():
    a, b = base_factors()
    with pytest.raises(ValueError, match="different shapes across updates"):
        exact_combine([{A: a, B: b}, {A: a[:1], B: b[:, :1]}], [1, 1])
