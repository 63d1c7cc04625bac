"""Multi-GPU parties on CPU: two ranks under torchrun with gloo train and evaluate what one process does.

The runs start `tests/ranks_child.py` under the same launcher command a pod runs
(fedtune.api.launch), so DeepSpeed's and torch.distributed's process-wide state never touches
the test process.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fedtune.api.launch import torchrun
from fedtune_trainer.adapters import adapter_state, from_bytes, load_adapter_state
from fedtune_trainer.evaluate import evaluate
from fedtune_trainer.train import schedule, shard, train_local
from ranks_child import ACCUMULATION, EVAL_BATCH, LM, recording_grad_norms, run_config
from tiny_models import make_tiny_model
from trainer_helpers import build, config

TESTS = Path(__file__).parent
EXTENSIONS = Path.home() / ".cache" / "fedtune" / "torch_extensions"


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "llama", "causal-lm")


def two_ranks(model: Path, out: Path, mode: str) -> list[dict]:
    """Run ranks_child.py as two ranks; each rank's adapter and findings."""
    out.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "DS_ACCELERATOR": "cpu",
        "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(EXTENSIONS)),
        "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
    }
    cmd = [sys.executable, *torchrun(2)[1:], str(TESTS / "ranks_child.py"), str(model), str(out), mode]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"two-rank run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return [
        {
            **json.loads((out / f"rank{r}.json").read_text()),
            "adapter": from_bytes((out / f"rank{r}.safetensors").read_bytes()),
        }
        for r in range(2)
    ]


def one_process(model: Path, mode: str, monkeypatch) -> tuple[dict, object, list[float]]:
    """The same round in one process accumulating twice as many micro-batches: the same global batches."""
    cfg = run_config(str(model), mode, world=1, accumulation=ACCUMULATION * 2)
    net, _, examples = build(cfg)
    with monkeypatch.context() as patch:
        patch.setattr(torch.nn.utils, "clip_grad_norm_", torch.nn.utils.clip_grad_norm_)  # undone afterwards
        norms = recording_grad_norms()
        result = train_local(net, examples, cfg, adapter_state(net), seed=0, rnd=1)
    return adapter_state(net), result, norms


def assert_same_update(ranks: list[dict], single: dict, result) -> None:
    for key in ranks[0]["adapter"]:
        assert torch.equal(ranks[0]["adapter"][key], ranks[1]["adapter"][key]), f"ranks disagree on {key}"
    # Summing gradients across processes instead of accumulating them in one rounds differently:
    # ~1e-6 here, and Adam's normalisation can magnify that in near-zero gradients (as with
    # gradient accumulation, tests/test_trainer.py). Ranks training the same half of each step move
    # weights by ~6e-2; a wrong loss scale shows in the gradient norms only (Adam does not see it).
    for key, value in single.items():
        torch.testing.assert_close(ranks[0]["adapter"][key], value, rtol=1e-3, atol=2e-4)
    assert ranks[0]["num_samples"] == result.num_samples
    assert ranks[0]["hooks_left"] == ranks[1]["hooks_left"] == 0, "engines must take their hooks with them"
    assert ranks[0]["train_loss"] == pytest.approx(result.train_loss, rel=1e-5)


def assert_same_evaluations(ranks: list[dict], model: Path) -> None:
    """Each rank evaluated its share of the batches; the pod's metrics are one process's on all of them."""
    cfg = run_config(str(model), "torch", world=1, accumulation=ACCUMULATION)
    net, _, examples = build(cfg)  # the global adapter the ranks started from (same seed)
    for when, adapter in (("eval_before", None), ("eval_after", ranks[0]["adapter"])):
        if adapter is not None:
            load_adapter_state(net, adapter)
        alone = evaluate(net, examples, LM, EVAL_BATCH).model_dump(exclude_none=True)
        assert ranks[0][when] == ranks[1][when], f"ranks disagree on {when}"
        # Only the order of the sums differs: float64 sums of float32 losses.
        assert ranks[0][when] == pytest.approx(alone, rel=1e-6), when


def test_schedule_of_two_ranks_is_the_one_process_schedule_split():
    cfg = config("/unused", "causal-lm", local_epochs=1.0, batch_size=4, gradient_accumulation=2)
    both = schedule(100, cfg, seed=3, rnd=2, world=2)
    alone = schedule(
        100, cfg.model_copy(update={"training": cfg.training.model_copy(update={"gradient_accumulation": 4})}), 3, 2
    )
    assert both == alone and len(both) == 7  # ceil(25 micro-batches / (2 x 2)) steps of a global batch of 16
    halves = [shard(both, r, 2) for r in range(2)]
    for step, first, second in zip(both, *halves):
        assert len(first) == len(second) == 2 and first + second == step


def test_two_ranks_train_the_one_process_update(tiny_lm, tmp_path, monkeypatch):
    ranks = two_ranks(tiny_lm, tmp_path / "out", "torch")
    single, result, norms = one_process(tiny_lm, "torch", monkeypatch)
    assert_same_update(ranks, single, result)
    # Adam does not see a constant factor on every gradient; the norms do (a loss averaged per
    # rank and then summed, not averaged, over the ranks would double them).
    assert ranks[0]["grad_norms"] == ranks[1]["grad_norms"] == pytest.approx(norms, rel=1e-4)
    assert_same_evaluations(ranks, tiny_lm)
    assert ranks[0]["rerun_identical"] and ranks[1]["rerun_identical"]
    # A failure of rank 0's shared work, or of one rank's own step, reaches every rank.
    assert ranks[0]["failures"] == {
        "share": "ValueError: no such object",
        "together": "RankError: rank 1: OSError: disk full",
    }
    assert ranks[1]["failures"] == {
        "share": "RankError: rank 0: ValueError: no such object",
        "together": "OSError: disk full",
    }


@pytest.mark.deepspeed
def test_two_ranks_with_deepspeed_zero2_train_the_one_process_update(tiny_lm, tmp_path, monkeypatch):
    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed (pip install fedtune[deepspeed])")
    ranks = two_ranks(tiny_lm, tmp_path / "out", "zero2")
    # DeepSpeed on two ranks matches plain torch in one process.
    single, result, _ = one_process(tiny_lm, "torch", monkeypatch)
    assert_same_update(ranks, single, result)
    assert_same_evaluations(ranks, tiny_lm)


@pytest.mark.deepspeed
@pytest.mark.parametrize("mode", ["zero3", "zero3-all"])
def test_two_ranks_with_deepspeed_zero3_train_and_evaluate_as_one_process(tiny_lm, tmp_path, monkeypatch, mode):
    # zero3: the weights partitioned across the ranks, the adapter's small tensors kept whole on
    # every rank (DeepSpeed's persistence threshold); zero3-all: the adapter partitioned too.
    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed (pip install fedtune[deepspeed])")
    ranks = two_ranks(tiny_lm, tmp_path / "out", mode)
    single, result, _ = one_process(tiny_lm, "torch", monkeypatch)
    assert_same_update(ranks, single, result)
    # Evaluated on both ranks in step (each forward gathers the partitioned weights), before
    # training (the model not partitioned yet) and after (partitioned).
    assert_same_evaluations(ranks, tiny_lm)
    # The round re-run from the same global adapter (a retried round) gives the same bytes: the
    # global adapter reached the partitions the next engine's optimiser starts from.
    assert ranks[0]["rerun_identical"] and ranks[1]["rerun_identical"]
