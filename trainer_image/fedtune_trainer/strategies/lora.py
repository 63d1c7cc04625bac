"""Combining client updates of LoRA adapters: plain averaging, or the exact mean of products.

A LoRA module adds ΔW = B·A to a frozen weight. Averaging A and B separately gives
(Σ wᵢBᵢ)(Σ wᵢAᵢ), which is not the average update Σ wᵢBᵢAᵢ that the parties asked for
(think of one party sending (B, A) and another (−B, −A): same ΔW, averages to zero).

`exact` mode re-factors M = Σ wᵢBᵢAᵢ per module to the adapter's rank r by truncated SVD:
B' = U_r√S_r, A' = √S_r V_rᵀ (a balanced split, so neither factor dwarfs the other in the
next round's training). When rank(M) > r this is the best rank-r approximation
(Eckart–Young), and the loss is reported as the relative residual ‖M − B'A'‖_F / ‖M‖_F.
M (out × in) is never formed: it has rank ≤ P·r, and its singular triplets come from
P·r × P·r Gram matrices of the stacked factors, batched over modules of one shape
(`refactor_batch`). `combine` reports the MAXIMUM residual over modules: a single badly
approximated module should not hide behind many exact ones. Tensors that are not LoRA factor
pairs (heads, biases, IA3 vectors, prompt embeddings, DoRA magnitudes) are averaged in both modes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import NamedTuple

import torch

from fedtune_trainer.strategies.base import Tensors, normalise_weights, weighted_mean
from fedtune_trainer.tensorfile import specs_of

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


class _Shape(NamedTuple):
    """What LoRA modules re-factored in one batch share: their factors' shapes and dtypes."""

    a: torch.Size
    b: torch.Size
    a_dtype: torch.dtype
    b_dtype: torch.dtype


def _module_groups(
    first: Mapping[str, torch.Tensor], pairs: Mapping[str, tuple[str, str]]
) -> dict[_Shape, list[tuple[str, str, str]]]:
    """LoRA modules (module, A key, B key) grouped by the shapes and dtypes of their factors.

    Shapes and dtypes come from `specs_of`: a file-backed update answers from its header, so no
    factor is read here, only when its chunk is combined."""
    specs = specs_of(first)
    groups: dict[_Shape, list[tuple[str, str, str]]] = {}
    for module, (key_a, key_b) in pairs.items():
        a, b = specs[key_a], specs[key_b]
        if math.prod(b.shape) != b.shape[0] * a.shape[0]:
            raise ValueError(f"lora_B of shape {tuple(b.shape)} does not fit lora_A of shape {tuple(a.shape)}")
        shape = _Shape(torch.Size(a.shape), torch.Size(b.shape), a.dtype, b.dtype)
        groups.setdefault(shape, []).append((module, key_a, key_b))
    return groups


def _stack_factors(
    updates: Sequence[Mapping[str, torch.Tensor]],
    shape: _Shape,
    members: Sequence[tuple[str, str, str]],
    a_cat: torch.Tensor,
    b_cat: torch.Tensor,
) -> None:
    """Copy the parties' factors of `members` into a_cat (k, P·r, in) and b_cat (k, out, P·r)."""
    rank, n_in, n_out = a_cat.shape[1] // len(updates), a_cat.shape[2], b_cat.shape[1]
    for j, (_, key_a, key_b) in enumerate(members):
        for p, update in enumerate(updates):
            a, b = update[key_a], update[key_b]
            if a.shape != shape.a or b.shape != shape.b:
                raise ValueError(f"LoRA factors {key_a} and {key_b} have different shapes across updates")
            cols = slice(p * rank, (p + 1) * rank)
            a_cat[j, cols] = a.reshape(rank, n_in)  # converts while copying: no float64 temporary
            b_cat[j, :, cols] = b.reshape(n_out, rank)


def _gram_factor(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For a batch of Gram matrices G = XᵀX: R = Λ^½Vᵀ (so RᵀR = G) and the lift L = VΛ^-½.

    X = (XL)R with XL orthonormal, so R carries all X contributes to a product, at the Gram's
    (small) size. Eigenvalues below rounding noise of G (possibly negative) are zero: their L
    columns are zero, as in a pseudo-inverse, so XL leaves out directions X does not have.
    """
    lam, vec = torch.linalg.eigh(gram)
    tol = lam[..., -1:].clamp(min=0) * gram.shape[-1] * torch.finfo(gram.dtype).eps
    alive = lam > tol
    root = torch.where(alive, lam, 0.0).sqrt()
    inv_root = torch.where(alive, root, 1.0).reciprocal() * alive
    return root[..., :, None] * vec.mT, vec * inv_root[..., None, :]


def _revive(rows: torch.Tensor, alive: torch.Tensor, a_cat: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """`rows` (k, keep, in) with each dead row replaced by a unit row orthogonal to the others.

    B = A = 0 has zero gradient in both factors, so a dead component would never train again;
    like LoRA's own init it gets B' = 0 and a non-zero A' row: the parties' mean A row,
    orthogonalised. Dead components trail the alive ones (singular values descend) and QR
    keeps the span of every leading set of columns, so Q's trailing columns are orthogonal to
    the alive rows, and of unit norm even where the mean A row is zero.
    """
    dead = ~alive.all(-1)
    if not dead.any():
        return rows
    mean_a = torch.einsum("p,kpri->kri", weights, a_cat[dead].unflatten(1, (weights.numel(), -1)))
    candidates = torch.where(alive[dead][..., None], rows[dead], mean_a[:, : rows.shape[1]])
    rows[dead] = torch.where(alive[dead][..., None], rows[dead], torch.linalg.qr(candidates.mT).Q.mT)
    return rows


def refactor_batch(
    a_cat: torch.Tensor, b_cat: torch.Tensor, weights: torch.Tensor, rank: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank-`rank` factors of M = Σ wᵢBᵢAᵢ for a batch of modules, and the relative residuals.

    a_cat (k, P·r, in) and b_cat (k, out, P·r) hold every party's factors side by side and
    `weights` (P,) sum to 1, all float64. Returns A' (k, rank, in), B' (k, out, rank) and
    ‖M − B'A'‖_F / ‖M‖_F (k,). With B_w = b_cat·diag(w) = Q_b R_b (from its Gram matrix,
    `_gram_factor`), M = Q_b C where C = R_b a_cat, so M's singular values and left vectors
    are C's, lifted by Q_b; C Cᵀ = R_b (a_cat a_catᵀ) R_bᵀ is P·r × P·r, and one eigh of it
    gives U_c and S². Only the kept components are lifted: U_r = Q_b U_c[:, :r], and
    S_r V_rᵀ = U_rᵀ M = U_c[:, :r]ᵀ R_b a_cat. (An SVD of R_b R_aᵀ would need a second
    Gram eigendecomposition and an SVD: twice the serial LAPACK work, for precision that
    float64 already gives: the kept components agree with a dense SVD of M to 1e-9 or better.)
    Components past min(out, in) (rank above a layer dimension) are zero in both factors.
    """
    n_out, n_in = b_cat.shape[1], a_cat.shape[2]
    w = weights.repeat_interleave(a_cat.shape[1] // weights.numel())
    r_b, lift_b = _gram_factor(w[:, None] * (b_cat.mT @ b_cat) * w)
    lam, vec = torch.linalg.eigh(r_b @ (a_cat @ a_cat.mT) @ r_b.mT)
    # S² to within rounding of the largest: below that an eigenvalue is noise (maybe negative).
    lam = lam.flip(-1)
    s = torch.where(lam > lam[..., :1].clamp(min=0) * lam.shape[-1] * torch.finfo(lam.dtype).eps, lam, 0.0).sqrt()
    keep = min(rank, n_out, n_in)
    u_c, s_r = vec.flip(-1)[..., :keep], s[..., :keep]
    u_r = b_cat @ (w[:, None] * (lift_b @ u_c))  # (k, out, keep)
    sv_rows = (r_b.mT @ u_c).mT @ a_cat  # (k, keep, in): row j is s_j v_jᵀ
    # Numerical rank as in matrix_rank, at float32 precision (what the factors are trained in).
    alive = s_r > s[..., :1] * max(n_out, n_in) * torch.finfo(torch.float32).eps
    root = torch.where(alive, s_r, 0.0).sqrt()
    v_rows = _revive(sv_rows / torch.where(alive, s_r, 1.0)[..., None], alive, a_cat, weights)
    a_new = v_rows * torch.where(alive, root, 1.0)[..., None]
    b_new = u_r * root[..., None, :]
    # The dropped part summed directly, not as total − kept: no cancellation when it is tiny.
    dropped = torch.cat([~alive, alive.new_ones(s.shape[:-1] + (s.shape[-1] - keep,))], dim=-1)
    total = s.square().sum(-1)
    residual = ((s.square() * dropped).sum(-1) / torch.where(total > 0, total, 1.0)).sqrt()
    if keep < rank:
        a_new = torch.cat([a_new, a_new.new_zeros(a_new.shape[0], rank - keep, n_in)], dim=1)
        b_new = torch.cat([b_new, b_new.new_zeros(b_new.shape[0], n_out, rank - keep)], dim=2)
    return a_new, b_new, residual


# Float64 scratch for one chunk of modules (every party's stacked factors). It bounds memory when
# updates are read lazily from disk; 4 modules of a 7B's q,k,v,o at P = 8, r = 16 already run
# as fast as 8 (and 1 a chunk is slower on 2 threads).
_CHUNK_BYTES = 32 * 2**20


def _combine_group(
    updates: Sequence[Mapping[str, torch.Tensor]],
    weights: torch.Tensor,
    shape: _Shape,
    members: Sequence[tuple[str, str, str]],
    combined: Tensors,
    residuals: dict[str, float],
) -> None:
    """Re-factor one group of same-shaped modules chunk by chunk into `combined` and `residuals`."""
    rank, n_out = shape.a[0], shape.b[0]
    n_in = shape.a.numel() // rank
    width = len(updates) * rank
    step = max(1, _CHUNK_BYTES // (8 * width * (n_in + n_out)))
    # One scratch for all chunks: fresh buffers this large come as new pages from the kernel
    # every time, and faulting them in costs as much as the Gram matrices.
    a_buf = torch.empty(min(step, len(members)), width, n_in, dtype=torch.float64)
    b_buf = torch.empty(min(step, len(members)), n_out, width, dtype=torch.float64)
    for start in range(0, len(members), step):
        chunk = members[start : start + step]
        a_cat, b_cat = a_buf[: len(chunk)], b_buf[: len(chunk)]
        _stack_factors(updates, shape, chunk, a_cat, b_cat)
        a_new, b_new, residual = refactor_batch(a_cat, b_cat, weights, rank)
        for j, (module, key_a, key_b) in enumerate(chunk):
            # copy=True: each output owns its storage (safetensors refuses shared memory).
            combined[key_a] = a_new[j].reshape(shape.a).to(shape.a_dtype, copy=True)
            combined[key_b] = b_new[j].reshape(shape.b).to(shape.b_dtype, copy=True)
            residuals[module] = float(residual[j])


def exact_combine(
    updates: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]
) -> tuple[Tensors, dict[str, float]]:
    """Exact mode: LoRA pairs re-factored from their mean product, the rest averaged.

    Returns the combined tensors (in the first update's order) and each LoRA module's
    relative residual. Modules of one shape and dtype are re-factored together, a chunk at a
    time, and a factor is read from `updates` only when its chunk comes, so the mappings may
    load tensors lazily.
    """
    if not updates:
        raise ValueError("no updates to combine")
    first = updates[0]
    adalora = [k for k in first if "lora_E" in k.split(".")]
    if adalora:
        raise ValueError(
            f"exact LoRA aggregation does not handle AdaLoRA's singular values ({adalora[0]}); use loraMode average"
        )
    pairs = lora_pairs(first)
    factors = {key for pair in pairs.values() for key in pair}
    combined = weighted_mean(updates, weights, [k for k in first if k not in factors])
    norm = torch.tensor(normalise_weights(weights, len(updates)), dtype=torch.float64)
    residuals: dict[str, float] = {}
    for shape, members in _module_groups(first, pairs).items():
        _combine_group(updates, norm, shape, members, combined, residuals)
    return {key: combined[key] for key in first}, residuals


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
