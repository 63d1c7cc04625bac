"""FedKSeed (Qin et al., ICML 2024): full-parameter zeroth-order tuning that exchanges scalars only.

A job shares K seeds (seed k's value: `seed_value(job seed, k)`). Each local step a party draws a
seed index i (reproducibly, from job seed, round, party and step), perturbs every parameter along
z_i ~ N(0, I) drawn from a generator seeded with seed i, and estimates the projected gradient
g = (L(θ + εz_i) − L(θ − εz_i)) / 2ε on one batch; then θ ← θ − lr·g·z_i. Its update is the list of
(i, g) pairs (`fedkseed.seeds` int16, `fedkseed.grads` float32): a few KB.

The global is the per-seed accumulator A (`fedkseed.accum`, float32 [K]): the aggregator adds each
round the sample-weighted mean over parties of each party's per-seed sum of g. Since a step along
seed i always moves along the same z_i, the global model is θ_0 − lr·Σ_k A_k·z_k, whatever the
number of rounds: a party replays it from the base weights it kept, at most K directions (the
paper's bound on the replay cost), and the global object stays K floats.
"""

from __future__ import annotations

import hashlib
import random
import time
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import torch

from fedtune_trainer.data import collate, shuffled
from fedtune_trainer.device import model_device, to_device

ACCUM = "fedkseed.accum"
SEEDS = "fedkseed.seeds"
GRADS = "fedkseed.grads"


def is_global(tensors: Iterable[str]) -> bool:
    """Whether a global's tensor names are FedKSeed's accumulator."""
    return set(tensors) == {ACCUM}


def seed_value(job_seed: int, k: int) -> int:
    """The generator seed of seed index k: a hash of (job seed, k), the same in every process."""
    digest = hashlib.sha256(f"fedkseed/{job_seed}/{k}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def step_seeds(job_seed: int, rnd: int, party: str, steps: int, k: int) -> list[int]:
    """The seed indices of a party's local steps in round `rnd`, uniform over range(k)."""
    rng = random.Random(f"fedkseed-steps/{job_seed}/{rnd}/{party}")
    return [rng.randrange(k) for _ in range(steps)]


def direction(params: Sequence[torch.Tensor], seed: int) -> Iterable[torch.Tensor]:
    """z ~ N(0, I) over `params`, one tensor each, drawn on the CPU in float32 from `seed` (device-independent)."""
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        yield torch.randn(p.shape, generator=gen, dtype=torch.float32)


@torch.no_grad()
def move(params: Sequence[torch.Tensor], seed: int, scale: float) -> None:
    """θ ← θ + scale·z(seed), in place."""
    for p, z in zip(params, direction(params, seed)):
        p.add_(z.to(p.device, p.dtype), alpha=scale)


def parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Every parameter, each tied one once, in a fixed order."""
    return [p for _, p in model.named_parameters()]


@torch.no_grad()
def replay(
    model: torch.nn.Module, base: dict[str, torch.Tensor], accum: torch.Tensor, job_seed: int, lr: float
) -> None:
    """Set `model` to the global: the base weights, then θ ← θ − lr·A_k·z_k for every seed with A_k ≠ 0."""
    named = dict(model.named_parameters())
    for name, p in named.items():
        p.copy_(base[name])
    params = list(named.values())
    for k in torch.nonzero(accum).flatten().tolist():
        move(params, seed_value(job_seed, k), -lr * float(accum[k]))


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 of every parameter's bytes: parties that replayed the same global agree on it exactly."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class LocalSteps(NamedTuple):
    seeds: list[int]
    grads: list[float]
    train_loss: float
    num_samples: int
    seconds: float


@torch.no_grad()
def train_steps(
    model: torch.nn.Module,
    examples: Sequence[dict],
    pad_id: int,
    *,
    job_seed: int,
    rnd: int,
    party: str,
    k: int,
    steps: int,
    lr: float,
    eps: float,
    batch_size: int,
) -> LocalSteps:
    """`steps` zeroth-order SGD steps (MeZO-style two-point estimate, dropout off); returns their (i, g) pairs."""
    if not examples:
        raise ValueError("no training examples")
    start = time.perf_counter()
    model.eval()  # both evaluations of a step must see the same function
    dev = model_device(model)
    params = parameters(model)
    order: list[int] = []
    epoch, grads, loss_sum, seen = 0, [], 0.0, set()
    seeds = step_seeds(job_seed, rnd, party, steps, k)
    for i in seeds:
        while len(order) < batch_size:
            order += shuffled(len(examples), job_seed, rnd, epoch)
            epoch += 1
        idx, order = order[:batch_size], order[batch_size:]
        seen.update(idx)
        batch = to_device(collate([examples[j] for j in idx], pad_id), dev)
        s = seed_value(job_seed, i)
        move(params, s, eps)
        plus = float(model(**batch).loss)
        move(params, s, -2 * eps)
        minus = float(model(**batch).loss)
        move(params, s, eps)
        g = (plus - minus) / (2 * eps)
        move(params, s, -lr * g)
        grads.append(g)
        loss_sum += (plus + minus) / 2
    return LocalSteps(seeds, grads, loss_sum / len(seeds), len(seen), time.perf_counter() - start)


def update_tensors(seeds: Sequence[int], grads: Sequence[float]) -> dict[str, torch.Tensor]:
    """A party's update: its steps' seed indices (int16) and projected gradients (float32)."""
    return {SEEDS: torch.tensor(seeds, dtype=torch.int16), GRADS: torch.tensor(grads, dtype=torch.float32)}


def global0(k: int) -> dict[str, torch.Tensor]:
    """The first global: no step taken yet."""
    return {ACCUM: torch.zeros(k, dtype=torch.float32)}


def check_update(tensors, k: int, source: str) -> None:
    """ValueError unless `tensors` is a FedKSeed update for K=`k`: paired int16 seeds in range, finite grads."""
    names = set(tensors.keys())
    if names != {SEEDS, GRADS}:
        raise ValueError(f"{source}: a FedKSeed update holds {SEEDS} and {GRADS}, got {', '.join(sorted(names))}")
    seeds, grads = tensors[SEEDS], tensors[GRADS]
    if seeds.dtype != torch.int16 or grads.dtype != torch.float32 or seeds.dim() != 1 or seeds.shape != grads.shape:
        raise ValueError(f"{source}: {SEEDS} (int16) and {GRADS} (float32) must be vectors of one length")
    if seeds.numel() and (int(seeds.min()) < 0 or int(seeds.max()) >= k):
        raise ValueError(f"{source}: a seed index lies outside 0..{k - 1}")
    if not bool(torch.isfinite(grads).all()):
        raise ValueError(f"{source}: {GRADS} holds NaN or Inf")


def aggregate(accum: torch.Tensor, updates: Sequence[tuple[torch.Tensor, torch.Tensor]], weights: Sequence[float]):
    """A + Σ_c (w_c / Σw)·(per-seed sum of party c's g): the new accumulator (the paper's server step)."""
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("FedKSeed aggregation needs a positive total weight")
    out = accum.to(torch.float64).clone()
    for (seeds, grads), w in zip(updates, weights):
        out.index_add_(0, seeds.to(torch.int64), grads.to(torch.float64), alpha=w / total)
    return out.to(torch.float32)


def export(final_dir: str, out_dir: str) -> None:
    """Replay a finished job's final/ (fedkseed.safetensors + fedkseed.json + config and tokenizer files)
    into a transformers model directory `out_dir`: the base model built as the parties built it, plus the steps."""
    import json
    from pathlib import Path

    from fedtune.api.job import DataSchema, ModelSpec
    from safetensors.torch import load_file

    from fedtune_trainer.models import load_base_model

    doc = json.loads((Path(final_dir) / "fedkseed.json").read_text())
    model, tokenizer = load_base_model(
        ModelSpec.model_validate(doc["model"]), DataSchema.model_validate(doc["data"]), doc["seed"]
    )
    base = {k: v.detach().clone() for k, v in model.named_parameters()}
    accum = load_file(Path(final_dir) / "fedkseed.safetensors")[ACCUM]
    replay(model, base, accum, doc["seed"], doc["fedkseed"]["learningRate"])
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 3:
        sys.exit("usage: python -m fedtune_trainer.fedkseed FINAL_DIR OUT_DIR")
    export(sys.argv[1], sys.argv[2])
