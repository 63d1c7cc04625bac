"""DeepSpeed engines around a party's model, and ZeRO-3's partitioned weights between them.

A party keeps one model for the whole job and builds a DeepSpeed engine per round (train.py), so
that every round starts with a fresh optimiser. Under ZeRO-3 the first engine partitions the
model's weights across the pod's ranks (each parameter keeps `ds_id`, `ds_tensor` holds this
rank's slice, and `param.data` is empty); later engines find it partitioned and keep it so
(DeepSpeed converts only parameters that are not ZeRO-3 ones yet). Between engines nothing
gathers the weights on its own, so the model is touched in two ways only, on every rank at once:

- adapter I/O (`gathered`): the adapter's parameters gathered whole on every rank, read, or
  written identically everywhere and re-partitioned from rank 0's values (fedtune_trainer.adapters);
- forward passes outside training (`forward_engine`): under a forward-only engine, whose hooks
  gather each module's weights just before it runs and release them after (evaluation).

A ZeRO-3 model partitioned on one rank is partitioned too (its slice is the whole tensor), so
one process follows the same rules.
"""

from __future__ import annotations

import contextlib
import gc
import os
import socket
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from fedtune.api.protocol import TrainerConfig

from fedtune_trainer.ds_config import deepspeed_config


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
    """Form the lone process group DeepSpeed needs in a one-process pod; a no-op when one exists
    (the second time, or under torchrun, whose ranks joined theirs at start: fedtune_trainer.ranks)."""
    deepspeed = import_deepspeed()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    for var, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
        os.environ.setdefault(var, value)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)


def build_engine(model: torch.nn.Module, config: dict[str, Any], parameters: list | None = None) -> Any:
    """A DeepSpeed engine around `model` (which it partitions the first time under ZeRO-3)."""
    deepspeed = import_deepspeed()
    init_distributed_once()
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=parameters, config=config)
    return engine


def release_engine(engine: Any) -> None:
    """Take the engine's hooks off the model, so that it does nothing once the engine is gone.

    `destroy()` removes the optimiser's and ZeRO-3's hooks but not the engine's own forward
    hooks on the module (DeepSpeed 0.19): left there they keep every past engine alive, with its
    optimiser state, and under ZeRO-3 they make any later forward pass gather weights through the
    dead engine, a collective only some ranks might enter.
    """
    engine.destroy()
    for name in ("module_forward_pre_hook", "module_forward_post_hook"):
        hook = getattr(engine, name, None)
        if hook is not None:
            hook.remove()
            setattr(engine, name, None)
    gc.collect()


def zero3(cfg: TrainerConfig) -> bool:
    """Whether the job trains with DeepSpeed ZeRO-3 (its weights partitioned across the ranks)."""
    return cfg.deepspeed.enabled and cfg.deepspeed.zero_stage == 3


@contextlib.contextmanager
def forward_engine(model: torch.nn.Module, cfg: TrainerConfig) -> Iterator[None]:
    """Forward passes of `model` inside gather its ZeRO-3 weights as they run; a no-op without ZeRO-3.

    Every rank must enter, and run the same number of forward passes inside: each module's
    weights are gathered from every rank. The engine has no optimiser (DeepSpeed then only
    installs its gathering hooks), and its first use partitions a model no engine partitioned yet.
    """
    if not zero3(cfg):
        yield
        return
    config = {k: v for k, v in deepspeed_config(cfg).items() if k != "optimizer"}
    engine = build_engine(model, config)
    try:
        yield
    finally:
        release_engine(engine)


@contextlib.contextmanager
def gathered(tensors: Iterable[torch.Tensor], modify: bool = False) -> Iterator[None]:
    """The ZeRO-3-partitioned ones of `tensors` whole inside (a no-op when none is partitioned).

    Every rank must enter. With `modify`, what rank 0 wrote into them is re-partitioned on the way
    out (every rank writes the same values, so any rank's would do); without, writes are lost.
    """
    partitioned = [t for t in tensors if hasattr(t, "ds_id")]
    if not partitioned:
        yield
        return
    deepspeed = import_deepspeed()
    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=0 if modify else None):
        yield
