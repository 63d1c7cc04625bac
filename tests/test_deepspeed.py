"""DeepSpeed: the config builder (pure) and real ZeRO training on CPU (in a subprocess).

The engine tests run in a child process: DeepSpeed initialises torch.distributed for the whole
process, which must not leak into other tests. The first run compiles DeepSpeed's CPU comm op
(about a minute) into TORCH_EXTENSIONS_DIR, a persistent cache, so later runs skip it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from fedtune.api.job import DeepSpeedSpec
from fedtune_trainer.ds_config import deepspeed_config
from trainer_helpers import config

TESTS = Path(__file__).parent
EXTENSIONS = Path.home() / ".cache" / "fedtune" / "torch_extensions"


def test_config_batch_is_micro_times_accumulation_times_world():
    cfg = config("/unused", "causal-lm", batch_size=4, gradient_accumulation=3)
    cfg = cfg.model_copy(update={"world_size": 2, "deepspeed": DeepSpeedSpec(enabled=True, zero_stage=2)})
    conf = deepspeed_config(cfg)
    assert conf["train_micro_batch_size_per_gpu"] == 4 and conf["gradient_accumulation_steps"] == 3
    assert conf["train_batch_size"] == 24
    assert conf["zero_optimization"] == {"stage": 2}
    assert conf["optimizer"]["type"] == "AdamW" and conf["optimizer"]["params"]["torch_adam"] is True
    assert conf["optimizer"]["params"]["lr"] == cfg.training.learning_rate
    assert conf["gradient_clipping"] == cfg.training.max_grad_norm and conf["bf16"] == {"enabled": False}


def test_config_refuses_inconsistent_train_batch_size():
    cfg = config("/unused", "causal-lm", batch_size=4, gradient_accumulation=2)
    ok = cfg.model_copy(update={"deepspeed": DeepSpeedSpec(enabled=True, train_batch_size=8)})
    assert deepspeed_config(ok)["train_batch_size"] == 8
    bad = cfg.model_copy(update={"world_size": 2, "deepspeed": DeepSpeedSpec(enabled=True, train_batch_size=8)})
    with pytest.raises(ValueError, match=r"4 x 2 x 2 = 16"):
        deepspeed_config(bad)


def test_config_offload_and_bf16():
    spec = DeepSpeedSpec(enabled=True, zero_stage=3, bf16=True, offload_optimizer=True, offload_params=True)
    conf = deepspeed_config(config("/unused", "causal-lm").model_copy(update={"deepspeed": spec}), pin_memory=True)
    zero = conf["zero_optimization"]
    assert zero["stage"] == 3 and conf["bf16"] == {"enabled": True}
    assert zero["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    assert zero["offload_param"] == {"device": "cpu", "pin_memory": True}
    assert conf["zero_force_ds_cpu_optimizer"] is False, "torch AdamW must be allowed on offloaded state"
    plain = deepspeed_config(
        config("/unused", "causal-lm").model_copy(update={"deepspeed": DeepSpeedSpec(enabled=True)})
    )
    assert "offload_optimizer" not in plain["zero_optimization"] and "zero_force_ds_cpu_optimizer" not in plain


# Runs in the child: prints one JSON line of findings for the parent to assert on.
CHILD = r"""
import json, sys, tempfile, torch
from tiny_models import make_tiny_model
from trainer_helpers import build, config
from fedtune.api.job import DeepSpeedSpec
from fedtune_trainer.adapters import adapter_state, to_bytes
from fedtune_trainer.engines import forward_engine
from fedtune_trainer.evaluate import evaluate
from fedtune_trainer.party import PartyRuntime
from fedtune_trainer.train import train_local
from fedtune_trainer.data import load_examples
from trainer_helpers import keyword_jsonl

CLS = "sequence-classification"
path = make_tiny_model(tempfile.mkdtemp(), CLS)
out = {}

def loss(model, examples, cfg):
    with forward_engine(model, cfg):  # as a party evaluates: a ZeRO-3 model is partitioned after training
        return evaluate(model, examples, CLS, 16).eval_loss

def run(spec, mu=0.0, steps=40):
    cfg = config(path, CLS, deepspeed=spec, prox_mu=mu, local_steps=steps, learning_rate=3e-2)
    rt = PartyRuntime()
    rt.ensure(cfg)  # loads the base in bf16 when DeepSpeed bf16 is on, like a party does
    examples = load_examples(keyword_jsonl(), cfg.data, CLS, rt.tokenizer)
    start = adapter_state(rt.model)
    before = loss(rt.model, examples, cfg)
    result = train_local(rt.model, examples, cfg, start, seed=0, rnd=1)
    after = loss(rt.model, examples, cfg)
    state = adapter_state(rt.model)
    moved = sum(float(((state[k].float() - start[k].float()) ** 2).sum()) for k in state) ** 0.5
    return rt, cfg, examples, start, state, dict(
        before=before, after=after, train_loss=result.train_loss, moved=moved,
        dtypes=sorted({str(v.dtype) for v in state.values()}),
        start_dtypes=sorted({str(v.dtype) for v in start.values()}),
        base_dtype=str(rt.model.get_base_model().bert.embeddings.word_embeddings.weight.dtype),
    )

rt, cfg, examples, start, state, out["zero2"] = run(DeepSpeedSpec(enabled=True, zero_stage=2, offload_optimizer=True))
train_local(rt.model, examples, cfg, start, seed=0, rnd=1)
out["zero2"]["rerun_identical"] = to_bytes(adapter_state(rt.model)) == to_bytes(state)
plain = cfg.model_copy(update={"deepspeed": DeepSpeedSpec()})
train_local(rt.model, examples, plain, start, seed=0, rnd=1)
torch_state = adapter_state(rt.model)
out["zero2"]["max_diff_vs_torch"] = max(float((torch_state[k] - state[k]).abs().max()) for k in state)
out["zero2_prox"] = run(DeepSpeedSpec(enabled=True, zero_stage=2), mu=50.0)[-1]
out["zero2_bf16"] = run(DeepSpeedSpec(enabled=True, zero_stage=2, bf16=True))[-1]
rt, cfg, examples, start, state, out["zero3"] = run(DeepSpeedSpec(enabled=True, zero_stage=3), steps=20)
train_local(rt.model, examples, cfg, start, seed=0, rnd=1)
out["zero3"]["rerun_identical"] = to_bytes(adapter_state(rt.model)) == to_bytes(state)
rt, cfg, examples, start, state, out["zero3_bf16"] = run(DeepSpeedSpec(enabled=True, zero_stage=3, bf16=True), steps=20)
out["zero3_bf16"]["wire_dtypes"] = sorted({str(v.dtype) for v in adapter_state(rt.model, like=start).values()})
print("RESULT " + json.dumps(out))
"""


@pytest.fixture(scope="module")
def engine_results() -> dict:
    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed (pip install fedtune[deepspeed])")
    EXTENSIONS.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "DS_ACCELERATOR": "cpu",
        "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(EXTENSIONS)),
        "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"DeepSpeed child failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return json.loads(lines[-1][len("RESULT ") :])


@pytest.mark.deepspeed
def test_zero2_offload_trains_like_the_torch_path(engine_results):
    r = engine_results["zero2"]
    assert r["after"] < 0.5 * r["before"]
    assert r["rerun_identical"], "each round must start from the global weights with a fresh engine"
    assert r["max_diff_vs_torch"] < 1e-4, "same schedule, same AdamW: DeepSpeed must match plain torch"
    assert r["dtypes"] == ["torch.float32"]


@pytest.mark.deepspeed
def test_zero2_fedprox_limits_drift(engine_results):
    assert engine_results["zero2_prox"]["moved"] < 0.5 * engine_results["zero2"]["moved"]


@pytest.mark.deepspeed
def test_zero2_bf16_keeps_the_adapter_wire_dtype(engine_results):
    r = engine_results["zero2_bf16"]
    assert r["base_dtype"] == "torch.bfloat16", "the base is loaded in bf16 so DeepSpeed's cast loses nothing"
    assert r["dtypes"] == r["start_dtypes"], "updates must keep the global adapter's dtypes"
    assert r["after"] < 0.5 * r["before"]


@pytest.mark.deepspeed
def test_zero3_trains(engine_results):
    r = engine_results["zero3"]
    assert r["after"] < r["before"] and r["moved"] > 0
    assert r["rerun_identical"], "the global adapter must reach the partitions the next engine starts from"


@pytest.mark.deepspeed
def test_zero3_bf16_partitions_in_bf16_and_updates_keep_the_wire_dtypes(engine_results):
    r = engine_results["zero3_bf16"]
    assert r["dtypes"] == ["torch.bfloat16"], "ZeRO-3 partitions every weight in bf16, the adapter's too"
    assert r["start_dtypes"] != r["dtypes"] and r["wire_dtypes"] == r["start_dtypes"], "a party uploads like=global"
    assert r["after"] < r["before"]
