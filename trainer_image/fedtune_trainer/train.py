"""One round of local training: plain torch AdamW, or a DeepSpeed engine when the job asks for one.

Every round starts from the received global adapter with a fresh optimiser: FedAvg and its
relatives define a round's update relative to the global weights, and optimiser moments from
an earlier round would drag in state the server never saw.

With several ranks (fedtune_trainer.ranks) an optimizer step's global batch is
batchSize x gradientAccumulation x world examples: the schedule is the one-process schedule of
that batch, each rank takes its gradientAccumulation micro-batches of every step, and the summed
gradients are those of the one-process run over the same global batch.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import NamedTuple

import torch
from fedtune.api.protocol import TrainerConfig

from fedtune_trainer.adapters import load_adapter_state
from fedtune_trainer.data import collate, shuffled
from fedtune_trainer.device import autocast, model_device, to_device
from fedtune_trainer.distill import kd_loss, teacher_logits
from fedtune_trainer.ds_config import deepspeed_config
from fedtune_trainer.engines import build_engine, release_engine
from fedtune_trainer.ranks import SOLO, Ranks


class LocalResult(NamedTuple):
    """What one round of local training produced."""

    train_loss: float
    num_samples: int
    seconds: float
    distill_loss: float | None = None  # mean T²·KL towards the teacher (training.distillation)


def train_pool(n: int, cfg: TrainerConfig, seed: int, rnd: int) -> list[int]:
    """The examples a round trains from: all, or maxTrainSamples of them chosen by (seed, round)."""
    cap = cfg.training.max_train_samples
    return sorted(shuffled(n, seed, rnd, -1)[:cap]) if cap is not None and cap < n else list(range(n))


def schedule(n: int, cfg: TrainerConfig, seed: int, rnd: int, world: int = 1) -> list[list[list[int]]]:
    """Optimizer steps of the round, each a list of micro-batches of example indices.

    Steps are always full (gradientAccumulation x `world` micro-batches), wrapping into a freshly
    shuffled epoch when needed, so the torch and DeepSpeed paths see the same batches, and `world`
    ranks the same as one process accumulating `world` times as many micro-batches.
    """
    if n == 0:
        raise ValueError("no training examples")
    tr = cfg.training
    pool = train_pool(n, cfg, seed, rnd)
    per_epoch = math.ceil(len(pool) / tr.batch_size)
    acc = tr.gradient_accumulation * world  # micro-batches of one optimizer step, over all ranks
    if tr.local_steps is not None:
        steps = tr.local_steps
    else:
        steps = max(1, math.ceil((tr.local_epochs or 1.0) * per_epoch / acc))
    micro: list[list[int]] = []
    epoch = 0
    while len(micro) < steps * acc:
        order = [pool[i] for i in shuffled(len(pool), seed, rnd, epoch)]
        micro.extend(order[i : i + tr.batch_size] for i in range(0, len(order), tr.batch_size))
        epoch += 1
    micro = micro[: steps * acc]
    return [micro[i : i + acc] for i in range(0, len(micro), acc)]


def shard(steps: list[list[list[int]]], rank: int, world: int) -> list[list[list[int]]]:
    """Rank `rank`'s micro-batches of each step: its contiguous 1/`world` of the step's global batch."""
    return [step[rank * len(step) // world : (rank + 1) * len(step) // world] for step in steps]


def _prox(params: list[tuple[str, torch.nn.Parameter]], anchors: dict[str, torch.Tensor], mu: float) -> torch.Tensor:
    """FedProx's (mu/2)·Σ‖w − w_global‖² over the trainable parameters."""
    total = sum(((p.float() - anchors[n]) ** 2).sum() for n, p in params)
    return 0.5 * mu * total


def train_local(
    model: torch.nn.Module,
    examples: Sequence[dict],
    cfg: TrainerConfig,
    global_tensors: dict[str, torch.Tensor] | None = None,
    seed: int = 0,
    rnd: int = 0,
    pad_id: int | None = None,
    ranks: Ranks = SOLO,
    accountant: object | None = None,
    teacher: torch.nn.Module | None = None,
) -> LocalResult:
    """Train the adapter for one round; returns (mean train loss, examples used, seconds).

    With `global_tensors` the adapter is first reset to them, so the round starts exactly from
    the global weights whatever the model held before. The loss reported is the task loss
    (without the FedProx term), averaged over the examples seen. With several `ranks` every rank
    calls this with the same examples and trains its shard of each step; all of them end with
    the same adapter, and the loss and counts are the whole pod's.

    With cfg.dp_sgd the steps are DP-SGD steps over Poisson batches (fedtune_trainer.dpsgd), as
    many as the schedule has; `accountant` (an Opacus accountant the caller keeps across rounds)
    records them. The examples used are then the whole pool the batches are sampled from.

    With training.distillation the frozen `teacher` scores every batch and the loss is
    fedtune_trainer.distill.kd_loss; train_loss is then its cross-entropy part, and distill_loss
    its T²·KL part.
    """
    start = time.perf_counter()
    kd = cfg.training.distillation
    if (kd is None) != (teacher is None):
        raise ValueError("training.distillation and a loaded teacher go together: the job names one, load it")
    if kd is not None and cfg.dp_sgd is not None:
        raise ValueError("training.distillation and privacy.dpSgd do not combine: DP-SGD steps take no teacher term")
    if kd is not None and cfg.deepspeed.enabled:
        raise ValueError("training.distillation runs on the plain PyTorch path: set deepspeed.enabled: false")
    if ranks.world != max(1, cfg.world_size):
        raise RuntimeError(
            f"the job trains this party with world size {cfg.world_size} (compute.gpusPerPod) but this trainer "
            f"runs {ranks.world} process(es): start the pod with its launcher command (fedtune.api.launch)"
        )
    if cfg.dp_sgd is not None and (ranks.world > 1 or cfg.deepspeed.enabled):
        raise RuntimeError(
            f"privacy.dpSgd trains on one process with plain PyTorch; this party runs {ranks.world} rank(s) "
            f"(compute.gpusPerPod) with deepspeed.enabled={cfg.deepspeed.enabled}: give it gpusPerPod <= 1"
        )
    if global_tensors is not None:
        load_adapter_state(model, global_tensors)
    if pad_id is None:
        pad_id = getattr(model.config, "pad_token_id", None) or 0
    steps = schedule(len(examples), cfg, seed, rnd, ranks.world)
    used = len({i for step in steps for mb in step for i in mb})
    steps = shard(steps, ranks.rank, ranks.world)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters (was PEFT applied?)")
    anchors = {n: p.detach().float().clone() for n, p in params} if cfg.prox_mu > 0 else {}
    # Dropout and any other randomness repeat exactly when a round is re-run after a restart
    # (and differ between ranks, whose micro-batches differ too).
    torch.manual_seed(((seed * 1_000_003 + rnd) * ranks.world + ranks.rank) % 2**63)
    was_training = model.training
    model.train()
    try:
        if cfg.dp_sgd is not None:
            from fedtune_trainer.dpsgd import new_accountant, run_dp_sgd

            pool = train_pool(len(examples), cfg, seed, rnd)
            acc = accountant if accountant is not None else new_accountant()
            loss_sum, seen = run_dp_sgd(model, examples, pool, len(steps), cfg, params, anchors, pad_id, acc)
            used = len(pool)
        elif cfg.deepspeed.enabled:
            loss_sum, seen = _run_deepspeed(model, examples, steps, cfg, params, anchors, pad_id)
        else:
            loss_sum, seen, kl_sum = _run_torch(
                model, examples, steps, cfg, params, anchors, pad_id, ranks.world, teacher
            )
    finally:
        model.train(was_training)
    if teacher is None:
        loss_sum, seen = ranks.sum(loss_sum, seen)
        return LocalResult(loss_sum / max(seen, 1), used, time.perf_counter() - start)
    loss_sum, seen, kl_sum = ranks.sum(loss_sum, seen, kl_sum)
    return LocalResult(loss_sum / max(seen, 1), used, time.perf_counter() - start, kl_sum / max(seen, 1))


def _sum_gradients(params: list[torch.nn.Parameter]) -> None:
    """Add up every rank's gradients in place: one all-reduce of one flat buffer per optimizer step.

    What DistributedDataParallel does, without wrapping the model: the peft model stays the one
    object that adapter I/O and evaluation use, parameters a step leaves without a gradient need
    no find_unused_parameters, and no round pays DDP's broadcast of the whole base model.
    """
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    # One more element per parameter counts the ranks that gave it a gradient: a parameter no rank
    # reached keeps grad None, so that AdamW skips it as it would in one process.
    present = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=grads[0].device)
    flat = torch.cat([g.float().reshape(-1) for g in grads] + [present])  # float32 whatever the adapter's dtypes
    torch.distributed.all_reduce(flat)
    offset = 0
    for p, g, reached in zip(params, grads, flat[-len(params) :].tolist()):
        p.grad = flat[offset : offset + g.numel()].view(g.shape).to(g.dtype) if reached else None
        offset += g.numel()


def _run_torch(model, examples, steps, cfg, params, anchors, pad_id, world=1, teacher=None) -> tuple[float, int, float]:
    """AdamW over this rank's share of `steps`; each micro-batch's loss is scaled by 1 / (micro-batches
    of the whole step), so that the gradients summed over the ranks are the one-process ones.

    Returns (sum of the task loss over examples, examples, sum of the T²·KL term: 0 without a teacher)."""
    tr = cfg.training
    dev = model_device(model)
    trainable = [p for _, p in params]
    optimizer = torch.optim.AdamW(trainable, lr=tr.learning_rate, weight_decay=tr.weight_decay)
    # fp16's narrow range needs loss scaling; bf16 has float32's range and does not.
    scaler = torch.amp.GradScaler(dev.type, enabled=tr.precision == "fp16")
    kd = tr.distillation
    loss_sum, seen, kl_sum = 0.0, 0, 0.0
    for step in steps:
        optimizer.zero_grad(set_to_none=True)
        parts = len(step) * world
        for indices in step:
            batch = to_device(collate([examples[i] for i in indices], pad_id), dev)
            with autocast(dev, tr.precision):
                if teacher is None:
                    loss = objective = model(**batch).loss
                else:
                    soft = teacher_logits(teacher, batch)
                    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                    objective, loss, kl = kd_loss(logits, soft, batch["labels"], kd.alpha, kd.temperature)
                    kl_sum += float(kl.detach()) * len(indices)
            total = objective.float() / parts
            if anchors:
                total = total + _prox(params, anchors, cfg.prox_mu) / parts
            scaler.scale(total).backward()
            loss_sum += float(loss.detach()) * len(indices)
            seen += len(indices)
        if world > 1:
            _sum_gradients(trainable)  # every rank's scale is the same: the scaled sums add up
        scaler.unscale_(optimizer)  # clip the true gradients
        torch.nn.utils.clip_grad_norm_(trainable, tr.max_grad_norm)
        scaler.step(optimizer)  # skipped when fp16 overflowed; the scale then shrinks
        scaler.update()
    return loss_sum, seen, kl_sum


def _run_deepspeed(model, examples, steps, cfg, params, anchors, pad_id) -> tuple[float, int]:
    """The same schedule through a DeepSpeed engine built for this round only.

    A new engine per round is the simple way to get a fresh optimiser whose master weights are
    copied from the just-loaded global adapter; an engine kept across rounds would carry its own
    fp32 master copy and moments from the previous round. Building one costs well under a
    second for adapter-sized parameter sets. Under ZeRO-3 the first engine partitions the model
    and later ones keep it partitioned (fedtune_trainer.engines).
    """
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    engine = build_engine(model, deepspeed_config(cfg), [p for _, p in params])
    loss_sum, seen = 0.0, 0
    try:
        for step in steps:
            for indices in step:
                batch = {k: v.to(engine.device) for k, v in collate([examples[i] for i in indices], pad_id).items()}
                loss = engine(**batch).loss
                total = loss + _prox(params, anchors, cfg.prox_mu) if anchors else loss
                engine.backward(total)  # the engine divides by gradientAccumulation and averages over the ranks
                engine.step()  # steps the optimiser only at accumulation boundaries
                loss_sum += float(loss.detach().float()) * len(indices)
                seen += len(indices)
    finally:
        release_engine(engine)  # or the next round's engine would share this one's hooks
        del engine
        _restore_dtypes(model, dtypes)
    return loss_sum, seen


def _restore_dtypes(model: torch.nn.Module, dtypes: dict[str, torch.dtype]) -> None:
    """bf16 casts the whole module; give every tensor back its dtype so the adapter's wire format
    (and evaluation) does not change with the engine settings.

    ZeRO-3 tensors are left in the dtype their partitions hold (a cast of `data`, their whole
    copy or an empty placeholder, would not reach the partitions): a party casts the update to
    the global adapter's dtypes as it reads it (adapters.adapter_state(like=...)).
    """
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.dtype != dtypes[n] and not hasattr(p, "ds_id"):
                p.data = p.data.to(dtypes[n])
