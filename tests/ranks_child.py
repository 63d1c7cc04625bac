"""One rank of a two-rank training run, started by tests/test_ranks.py under torchrun (not a test module).

`python -m torch.distributed.run --standalone --nproc-per-node=2 ranks_child.py MODEL OUT MODE`: every
rank builds the tiny causal LM, joins the pod's process group as a trainer pod does
(fedtune_trainer.ranks.from_env), trains one round on its shard and writes its adapter to
OUT/rank<r>.safetensors, and OUT/rank<r>.json with the round's loss and counts and, for MODE
torch, how `share` and `together` carried one rank's failure to the other.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from fedtune.api.job import DeepSpeedSpec
from fedtune_trainer.adapters import adapter_state, to_bytes
from fedtune_trainer.ranks import RankError, from_env
from fedtune_trainer.train import train_local
from trainer_helpers import build, config

LM = "causal-lm"
# Shared with the test's one-process run: a step's global batch is 4 x 1 x 2 = 8 examples.
STEPS, MICRO, ACCUMULATION = 3, 4, 1


def run_config(model: str, mode: str, world: int, accumulation: int):
    """The round's TrainerConfig: plain torch, or DeepSpeed ZeRO-2 (mode "zero2")."""
    ds = DeepSpeedSpec(enabled=True, zero_stage=2) if mode == "zero2" else None
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


def main(model: str, out: str, mode: str) -> None:
    ranks = from_env()
    cfg = run_config(model, mode, ranks.world, ACCUMULATION)
    net, _, examples = build(cfg)
    norms = recording_grad_norms()
    result = train_local(net, examples, cfg, adapter_state(net), seed=0, rnd=1, ranks=ranks)
    Path(out, f"rank{ranks.rank}.safetensors").write_bytes(to_bytes(adapter_state(net)))
    doc = {"train_loss": result.train_loss, "num_samples": result.num_samples, "grad_norms": norms}
    if mode == "torch":
        doc["failures"] = _failures(ranks)
    Path(out, f"rank{ranks.rank}.json").write_text(json.dumps(doc))
    ranks.close()


if __name__ == "__main__":
    main(*sys.argv[1:4])
