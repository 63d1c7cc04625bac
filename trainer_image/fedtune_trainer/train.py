"""One round of local training: plain torch AdamW, or a DeepSpeed engine when the job asks for one.

Every round starts from the received global adapter with a fresh optimiser: FedAvg and its
relatives define a round's update relative to the global weights, and optimiser moments from
an earlier round would drag in state the server never saw.
"""

from __future__ import annotations

import gc
import math
import os
import socket
import time
from collections.abc import Sequence
from typing import NamedTuple

import torch
from fedtune.api.protocol import TrainerConfig

from fedtune_trainer.adapters import load_adapter_state
from fedtune_trainer.data import collate, shuffled
from fedtune_trainer.device import autocast, model_device, to_device
from fedtune_trainer.ds_config import deepspeed_config


class LocalResult(NamedTuple):
    """What one round of local training produced."""

    train_loss: float
    num_samples: int
    seconds: float


def schedule(n: int, cfg: TrainerConfig, seed: int, rnd: int) -> list[list[list[int]]]:
    """Optimizer steps of the round, each a list of micro-batches of example indices.

    Steps are always full (gradientAccumulation micro-batches), wrapping into a freshly
    shuffled epoch when needed, so the torch and DeepSpeed paths see the same batches.
    """
    if n == 0:
        raise ValueError("no training examples")
    tr = cfg.training
    pool = list(range(n))
    if tr.max_train_samples is not None and tr.max_train_samples < n:
        pool = sorted(shuffled(n, seed, rnd, -1)[: tr.max_train_samples])
    per_epoch = math.ceil(len(pool) / tr.batch_size)
    if tr.local_steps is not None:
        steps = tr.local_steps
    else:
        steps = max(1, math.ceil((tr.local_epochs or 1.0) * per_epoch / tr.gradient_accumulation))
    micro: list[list[int]] = []
    epoch = 0
    while len(micro) < steps * tr.gradient_accumulation:
        order = [pool[i] for i in shuffled(len(pool), seed, rnd, epoch)]
        micro.extend(order[i : i + tr.batch_size] for i in range(0, len(order), tr.batch_size))
        epoch += 1
    micro = micro[: steps * tr.gradient_accumulation]
    acc = tr.gradient_accumulation
    return [micro[i : i + acc] for i in range(0, len(micro), acc)]


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
) -> LocalResult:
    """Train the adapter for one round; returns (mean train loss, examples used, seconds).

    With `global_tensors` the adapter is first reset to them, so the round starts exactly from
    the global weights whatever the model held before. The loss reported is the task loss
    (without the FedProx term), averaged over the examples seen.
    """
    start = time.perf_counter()
    if global_tensors is not None:
        load_adapter_state(model, global_tensors)
    if pad_id is None:
        pad_id = getattr(model.config, "pad_token_id", None) or 0
    steps = schedule(len(examples), cfg, seed, rnd)
    used = len({i for step in steps for mb in step for i in mb})
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters (was PEFT applied?)")
    anchors = {n: p.detach().float().clone() for n, p in params} if cfg.prox_mu > 0 else {}
    # Dropout and any other randomness repeat exactly when a round is re-run after a restart.
    torch.manual_seed((seed * 1_000_003 + rnd) % 2**63)
    was_training = model.training
    model.train()
    try:
        if cfg.deepspeed.enabled:
            loss_sum, seen = _run_deepspeed(model, examples, steps, cfg, params, anchors, pad_id)
        else:
            loss_sum, seen = _run_torch(model, examples, steps, cfg, params, anchors, pad_id)
    finally:
        model.train(was_training)
    return LocalResult(loss_sum / max(seen, 1), used, time.perf_counter() - start)


def _run_torch(model, examples, steps, cfg, params, anchors, pad_id) -> tuple[float, int]:
    tr = cfg.training
    dev = model_device(model)
    trainable = [p for _, p in params]
    optimizer = torch.optim.AdamW(trainable, lr=tr.learning_rate, weight_decay=tr.weight_decay)
    # fp16's narrow range needs loss scaling; bf16 has float32's range and does not.
    scaler = torch.amp.GradScaler(dev.type, enabled=tr.precision == "fp16")
    loss_sum, seen = 0.0, 0
    for step in steps:
        optimizer.zero_grad(set_to_none=True)
        for indices in step:
            batch = to_device(collate([examples[i] for i in indices], pad_id), dev)
            with autocast(dev, tr.precision):
                loss = model(**batch).loss
            total = loss.float() / len(step)
            if anchors:
                total = total + _prox(params, anchors, cfg.prox_mu) / len(step)
            scaler.scale(total).backward()
            loss_sum += float(loss.detach()) * len(indices)
            seen += len(indices)
        scaler.unscale_(optimizer)  # clip the true gradients
        torch.nn.utils.clip_grad_norm_(trainable, tr.max_grad_norm)
        scaler.step(optimizer)  # skipped when fp16 overflowed; the scale then shrinks
        scaler.update()
    return loss_sum, seen


def import_deepspeed():
    """deepspeed, imported for the CPU accelerator when no GPU is present (a clear error if absent)."""
    if not torch.cuda.is_available():
        # DeepSpeed picks its accelerator at import time; without this it probes for CUDA and fails.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed
    except ImportError as exc:
        raise RuntimeError(
            f"deepspeed.enabled is true but DeepSpeed cannot be imported here ({exc}); "
            "install fedtune[deepspeed] in the trainer image or set deepspeed.enabled: false"
        ) from None
    return deepspeed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed_once() -> None:
    """Join (or, alone, form) the process group DeepSpeed needs; a no-op the second time."""
    deepspeed = import_deepspeed()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return
    # A launcher (deepspeed/torchrun) sets these for multi-GPU pods; a lone process fills them in.
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    for var, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
        os.environ.setdefault(var, value)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)


def _run_deepspeed(model, examples, steps, cfg, params, anchors, pad_id) -> tuple[float, int]:
    """The same schedule through a DeepSpeed engine built for this round only.

    A new engine per round is the simple way to get a fresh optimiser whose master weights are
    copied from the just-loaded global adapter; an engine kept across rounds would carry its own
    fp32 master copy and moments from the previous round. Building one costs well under a
    second for adapter-sized parameter sets.
    """
    deepspeed = import_deepspeed()
    init_distributed_once()
    world = torch.distributed.get_world_size()
    if world != max(1, cfg.world_size):
        raise RuntimeError(
            f"the job trains with world size {cfg.world_size} but this trainer's process group has {world}: "
            "multi-GPU parties must start the trainer with one process per GPU (deepspeed/torchrun launcher)"
        )
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=[p for _, p in params], config=deepspeed_config(cfg)
    )
    loss_sum, seen = 0.0, 0
    try:
        for step in steps:
            for indices in step:
                batch = {k: v.to(engine.device) for k, v in collate([examples[i] for i in indices], pad_id).items()}
                loss = engine(**batch).loss
                total = loss + _prox(params, anchors, cfg.prox_mu) if anchors else loss
                engine.backward(total)  # the engine divides by gradientAccumulation itself
                engine.step()  # steps the optimiser only at accumulation boundaries
                loss_sum += float(loss.detach().float()) * len(indices)
                seen += len(indices)
    finally:
        # Drop the engine's hooks on our parameters, or the next round's engine would share them.
        if hasattr(engine, "destroy"):
            engine.destroy()
        del engine
        gc.collect()
        # bf16 casts the whole module; give every tensor back its dtype so the adapter's wire
        # format (and evaluation) does not change with the engine settings.
        with torch.no_grad():
            for n, p in model.named_parameters():
                if p.dtype != dtypes[n]:
                    p.data = p.data.to(dtypes[n])
    return loss_sum, seen
