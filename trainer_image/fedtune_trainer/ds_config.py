"""The DeepSpeed config a party trains with, derived from the job. Pure: the operator reuses it."""

from __future__ import annotations

from typing import Any

from fedtune.api.protocol import TrainerConfig


def deepspeed_config(cfg: TrainerConfig, pin_memory: bool = False) -> dict[str, Any]:
    """DeepSpeed's JSON config for `cfg` (batch = micro x accumulation x world, checked).

    `pin_memory` pins offloaded buffers; it needs CUDA, so it stays off on CPU-only parties.
    """
    ds, tr = cfg.deepspeed, cfg.training
    world = max(1, cfg.world_size)
    total = tr.batch_size * tr.gradient_accumulation * world
    if ds.train_batch_size is not None and ds.train_batch_size != total:
        raise ValueError(
            f"deepspeed.trainBatchSize ({ds.train_batch_size}) != batchSize x gradientAccumulation x world "
            f"({tr.batch_size} x {tr.gradient_accumulation} x {world} = {total})"
        )
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": pin_memory}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": pin_memory}
    config: dict[str, Any] = {
        "train_batch_size": total,
        "train_micro_batch_size_per_gpu": tr.batch_size,
        "gradient_accumulation_steps": tr.gradient_accumulation,
        "gradient_clipping": tr.max_grad_norm,
        # torch's AdamW: the same optimiser as the plain path, and no compiled fused-Adam op to build.
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": tr.learning_rate, "weight_decay": tr.weight_decay, "torch_adam": True},
        },
        "zero_optimization": zero,
        "bf16": {"enabled": ds.bf16},
        "steps_per_print": 2**31 - 1,  # fedtune logs per round itself
        "wall_clock_breakdown": False,
    }
    if ds.offload_optimizer:
        # Without this DeepSpeed insists on its compiled CPU Adam for offloaded optimiser state.
        config["zero_force_ds_cpu_optimizer"] = False
    return config
