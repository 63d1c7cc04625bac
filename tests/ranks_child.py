"""One rank of a two-rank training run, started by tests/test_ranks.py under torchrun (not a test module).

`python -m torch.distributed.run --standalone --nproc-per-node=2 ranks_child.py MODEL OUT MODE`: every
rank builds the tiny causal LM, joins the pod's process group as a trainer pod does
(fedtune_trainer.ranks.from_env), evaluates the global adapter on its share of the eval batches,
trains one round on its shard, evaluates the update, trains the round once more from the same
global adapter (a retried round), and writes its adapter to OUT/rank<r>.safetensors, and
OUT/rank<r>.json with the round's loss and counts, both evaluations, whether the second run gave
the same bytes and, for MODE torch, how `share` and `together` carried one rank's failure to the other.
MODE is torch (the plain path), zero2 or zero3 (DeepSpeed).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from fedtune.api.job import DeepSpeedSpec
from fedtune_trainer import engines, train
from fedtune_trainer.adapters import adapter_state, to_bytes
from fedtune_trainer.ds_config import deepspeed_config
from fedtune_trainer.engines import forward_engine
from fedtune_trainer.evaluate import evaluate
from fedtune_trainer.ranks import RankError, from_env
from fedtune_trainer.train import train_local
from trainer_helpers import build, config

LM = "causal-lm"
# Shared with the test's one-process run: a step's global batch is 4 x 1 x 2 = 8 examples.
STEPS, MICRO, ACCUMULATION = 3, 4, 1
# 32 examples in batches of 5: 7 batches, so rank 1 runs one forward pass more than its 3 (padding).
EVAL_BATCH = 5


def run_config(model: str, mode: str, world: int, accumulation: int):
    """The round's TrainerConfig: plain torch, or DeepSpeed ZeRO-2 or ZeRO-3 (mode "zero2", "zero3", "zero3-all")."""
    ds = DeepSpeedSpec(enabled=True, zero_stage=int(mode[4])) if mode.startswith("zero") else None
    cfg = config(
        model,
        LM,
        deepspeed=ds,
        local_steps=STEPS,
        batch_size=MICRO,
        gradient_accumulation=accumulation,
        learning_rate=2e-2,
    )
    return cfg.model_copy(update={"world_size": world})


def _failures(ranks) -> dict[str, str]:
    """What each rank saw when rank 0's shared work failed, and when rank 1's own step failed."""
    seen = {}

    def fail() -> None:
        raise ValueError("no such object")

    try:
        ranks.share(fail)
    except (ValueError, RankError) as exc:
        seen["share"] = f"{type(exc).__name__}: {exc}"
    try:
        with ranks.together():
            if ranks.rank == 1:
                raise OSError("disk full")
    except (OSError, RankError) as exc:
        seen["together"] = f"{type(exc).__name__}: {exc}"
    return seen


def recording_grad_norms() -> list[float]:
    """Record the gradient norm of every optimizer step of the plain torch path (before clipping)."""
    norms, clip = [], torch.nn.utils.clip_grad_norm_

    def recorded(params, max_norm, *args, **kwargs):
        norm = clip(params, max_norm, *args, **kwargs)
        norms.append(float(norm))
        return norm

    torch.nn.utils.clip_grad_norm_ = recorded
    return norms


def partition_every_tensor() -> None:
    """ZeRO-3 partitions even the adapter's small tensors, which it otherwise keeps whole on every
    rank (below stage3_param_persistence_threshold, 1e5 elements; so are a large model's LoRA
    factors at small ranks)."""

    def config(cfg, pin_memory=False):
        conf = deepspeed_config(cfg, pin_memory)
        conf["zero_optimization"]["stage3_param_persistence_threshold"] = 0
        return conf

    engines.deepspeed_config = train.deepspeed_config = config


def evaluated(net, examples, cfg, ranks) -> dict:
    """The loaded adapter's metrics, every rank evaluating its share as a party's ranks do."""
    with forward_engine(net, cfg):
        return evaluate(net, examples, LM, EVAL_BATCH, ranks=ranks).model_dump(exclude_none=True)


def hooks(net) -> int:
    """Forward hooks on the model's modules (an engine that is gone must leave none behind)."""
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in net.modules())


def main(model: str, out: str, mode: str) -> None:
    ranks = from_env()
    if mode == "zero3-all":
        partition_every_tensor()
    cfg = run_config(model, mode, ranks.world, ACCUMULATION)
    net, _, examples = build(cfg)
    start, hooked = adapter_state(net), hooks(net)
    before = evaluated(net, examples, cfg, ranks)  # under ZeRO-3 this partitions the model
    recorded = recording_grad_norms()
    result = train_local(net, examples, cfg, start, seed=0, rnd=1, ranks=ranks)
    norms = list(recorded)  # this round's steps only, not the re-run's
    update = to_bytes(adapter_state(net))
    after = evaluated(net, examples, cfg, ranks)
    train_local(net, examples, cfg, start, seed=0, rnd=1, ranks=ranks)
    Path(out, f"rank{ranks.rank}.safetensors").write_bytes(update)
    doc = {
        "train_loss": result.train_loss,
        "num_samples": result.num_samples,
        "grad_norms": norms,
        "eval_before": before,
        "eval_after": after,
        "rerun_identical": to_bytes(adapter_state(net)) == update,
        "hooks_left": hooks(net) - hooked,
    }
    if mode == "torch":
        doc["failures"] = _failures(ranks)
    Path(out, f"rank{ranks.rank}.json").write_text(json.dumps(doc))
    ranks.close()


if __name__ == "__main__":
    main(*sys.argv[1:4])
