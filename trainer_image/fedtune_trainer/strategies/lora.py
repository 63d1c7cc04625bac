"""Combining client updates of LoRA adapters: plain averaging, or the exact mean of products.

A LoRA module adds ΔW = B·A to a frozen weight. Averaging A and B separately gives
(Σ wᵢBᵢ)(Σ wᵢAᵢ), which is not the average update Σ wᵢBᵢAᵢ that the parties asked for
(think of one party sending (B, A) and another (−B, −A): same ΔW, averages to zero).

`exact` mode forms M = Σ wᵢBᵢAᵢ per module and re-factors it to the adapter's rank r by
truncated SVD: B' = U_r√S_r, A' = √S_r V_rᵀ (a balanced split, so neither factor dwarfs the
other in the next round's training). When rank(M) > r this is the best rank-r approximation
(Eckart–Young), and the loss is reported as the relative residual ‖M − B'A'‖_F / ‖M‖_F.
`combine` reports the MAXIMUM residual over modules: a single badly approximated module
should not hide behind many exact ones. Tensors that are not LoRA factor pairs (heads,
biases, IA3 vectors, prompt embeddings, DoRA magnitudes) are averaged in both modes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch

from fedtune_trainer.strategies.base import Tensors, normalise_weights, weighted_mean

LORA_MODES = ("average", "exact")

# Factor names as peft writes them: `<module>.lora_A[.<adapter>].weight` for Linear/Conv
# layers, `<module>.lora_embedding_A[.<adapter>]` for Embedding layers.
_PARTNER = {"lora_A": "lora_B", "lora_embedding_A": "lora_embedding_B"}
_B_NAMES = set(_PARTNER.values())


def _factor_position(key: str) -> tuple[int, str] | None:
    """Index and name of the lora_A/lora_B component of `key`, if `key` is a LoRA factor."""
    parts = key.split(".")
    for i in range(len(parts) - 1, -1, -1):
        if parts[i] in _PARTNER or parts[i] in _B_NAMES:
            tail = parts[i + 1 :]
            # Up to an adapter name and ".weight"; `lora_B.bias` (lora_bias=True) is additive,
            # so it is averaged like any other tensor.
            if len(tail) > 2 or "bias" in tail or (len(tail) == 2 and tail[1] != "weight"):
                return None
            return i, parts[i]
    return None


def lora_pairs(keys: Iterable[str]) -> dict[str, tuple[str, str]]:
    """LoRA modules found among tensor names: module name -> (A key, B key).

    Raises ValueError when a factor has no partner: such an adapter cannot be re-factored.
    """
    keys = sorted(keys)
    keyset = set(keys)
    pairs: dict[str, tuple[str, str]] = {}
    claimed: set[str] = set()
    for key in keys:
        found = _factor_position(key)
        if found is None or found[1] not in _PARTNER:
            continue
        i, tag = found
        parts = key.split(".")
        partner = ".".join([*parts[:i], _PARTNER[tag], *parts[i + 1 :]])
        if partner not in keyset:
            raise ValueError(f"LoRA factor {key} has no matching {partner}")
        module = ".".join([*parts[:i], *(p for p in parts[i + 1 :] if p != "weight")])
        pairs[module] = (key, partner)
        claimed.add(partner)
    orphans = [k for k in keys if (f := _factor_position(k)) and f[1] in _B_NAMES and k not in claimed]
    if orphans:
        raise ValueError(f"LoRA factor {orphans[0]} has no matching lora_A tensor")
    return pairs


def refactor(
    factors_a: Sequence[torch.Tensor], factors_b: Sequence[torch.Tensor], weights: Sequence[float]
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Rank-r factors (A', B') of M = Σ wᵢBᵢAᵢ, and the relative residual ‖M − B'A'‖_F / ‖M‖_F.

    A is (r, in, *kernel) and B is (out, r, 1, …), as peft stores Linear, Embedding and Conv
    LoRA; outputs have the inputs' shapes and dtypes. Weights are normalised to sum to 1.
    Components whose singular value is numerically zero get B' column 0 and a unit-norm A' row
    (like LoRA's own init), so they can still learn next round instead of being dead (B = A = 0
    has zero gradient for both).
    """
    a0, b0 = factors_a[0], factors_b[0]
    rank, n_out = a0.shape[0], b0.shape[0]
    if b0.numel() != n_out * rank:
        raise ValueError(f"lora_B of shape {tuple(b0.shape)} does not fit lora_A of shape {tuple(a0.shape)}")
    norm = normalise_weights(weights, len(factors_a))
    f64 = torch.float64
    a_cat = torch.cat([a.reshape(rank, -1).to(f64) for a in factors_a])  # (n·r, in)
    b_cat = torch.cat([w * b.reshape(n_out, rank).to(f64) for b, w in zip(factors_b, norm)], dim=1)  # (out, n·r)
    n_in = a_cat.shape[1]
    # M = b_cat @ a_cat has rank <= n·r. Decompose the small core instead of M itself:
    # M = Q_b (R_b R_aᵀ) Q_aᵀ, so one SVD of an (n·r)² matrix replaces one of out × in.
    q_b, r_b = torch.linalg.qr(b_cat)
    q_a, r_a = torch.linalg.qr(a_cat.T)
    u_core, s, vh_core = torch.linalg.svd(r_b @ r_a.T, full_matrices=False)
    keep = min(rank, s.shape[0])  # lift only the kept components: (out, keep), (in, keep), not n·r
    s_r, u_r, v_r = s[:keep], q_b @ u_core[:, :keep], q_a @ vh_core[:keep].T
    if keep < rank:  # only when rank exceeds a layer dimension: pad with empty components
        missing = rank - keep
        s_r = torch.cat([s_r, s_r.new_zeros(missing)])
        u_r = torch.cat([u_r, u_r.new_zeros(n_out, missing)], dim=1)
        v_r = torch.cat([v_r, v_r.new_zeros(n_in, missing)], dim=1)
    # Numerical rank as in matrix_rank, at float32 precision (what the factors are trained in).
    tol = float(s.max()) * max(n_out, n_in) * torch.finfo(torch.float32).eps if s.numel() else 0.0
    alive = s_r > tol
    root = torch.where(alive, s_r, torch.zeros_like(s_r)).sqrt()
    b_new = u_r * root
    a_new = torch.where(alive[:, None], root[:, None] * v_r.T, v_r.T)
    total = float(s.square().sum())
    kept = float(s_r[alive].square().sum())
    residual = max(total - kept, 0.0) ** 0.5 / total**0.5 if total > 0 else 0.0
    return a_new.reshape(a0.shape).to(a0.dtype), b_new.reshape(b0.shape).to(b0.dtype), residual


def exact_combine(
    updates: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]
) -> tuple[Tensors, dict[str, float]]:
    """Exact mode: LoRA pairs re-factored from their mean product, the rest averaged.

    Returns the combined tensors and each LoRA module's relative residual.
    """
    # Averages every tensor (and checks keys and shapes agree); LoRA pairs are overwritten below.
    combined = weighted_mean(updates, weights)
    adalora = [k for k in combined if "lora_E" in k.split(".")]
    if adalora:
        raise ValueError(
            f"exact LoRA aggregation does not handle AdaLoRA's singular values ({adalora[0]}); use loraMode average"
        )
    residuals: dict[str, float] = {}
    for module, (key_a, key_b) in lora_pairs(combined).items():
        a_new, b_new, residual = refactor([u[key_a] for u in updates], [u[key_b] for u in updates], weights)
        combined[key_a], combined[key_b] = a_new, b_new
        residuals[module] = residual
    return combined, residuals


def combine(
    updates: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float], mode: str = "average"
) -> tuple[Tensors, float | None]:
    """Combine client updates in `mode` ("average" or "exact").

    Returns the combined tensors and the maximum relative residual over LoRA modules, or None
    when nothing was re-factored (average mode, or an adapter without LoRA factor pairs).
    """
    if mode not in LORA_MODES:
        raise ValueError(f"unknown LoRA aggregation mode {mode!r}; choose one of: {', '.join(LORA_MODES)}")
    if mode == "average":
        return weighted_mean(updates, weights), None
    combined, residuals = exact_combine(updates, weights)
    return combined, (max(residuals.values()) if residuals else None)
