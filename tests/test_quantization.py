"""Quantised base models (model.quantization, QLoRA) on CPU through bitsandbytes' CPU backend.

What only a GPU can show (CUDA kernels, memory saved on the device, speed) is bench/gpu.py's.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
import yaml
from fedtune.api import FederatedJob
from fedtune.api.errors import SpecError
from fedtune.api.job import ModelSpec
from fedtune.api.quantization import QuantizationSpec, cannot_run
from fedtune.api.support import verdict
from fedtune.k8s.resources import parse_quantity
from fedtune_trainer.adapters import adapter_state
from fedtune_trainer.models import fingerprint, is_quantized, load_base_model
from fedtune_trainer.train import train_local
from test_local_run import job_yaml, run_local
from tiny_models import make_tiny_model
from toy_data import toy_jsonl
from trainer_helpers import build, config, tiny_paths

CLS, LM = "sequence-classification", "causal-lm"
FOUR_BIT = {"bits": 4, "quantType": "nf4", "doubleQuant": True, "computeDtype": "bfloat16"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_paths(tmp_path_factory)


def quantized(cfg, **spec):
    """The config with its base model quantised as `spec` (4-bit NF4 by default)."""
    model = cfg.model.model_copy(update={"quantization": QuantizationSpec.model_validate(spec or FOUR_BIT)})
    return cfg.model_copy(update={"model": model})


def packed_weights(model) -> dict[str, torch.Tensor]:
    """The quantised (uint8-packed) base weights."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.dtype == torch.uint8}


@pytest.mark.parametrize("task", [CLS, LM])
def test_qlora_trains_only_the_adapter_and_the_quantised_base_stays_frozen(tiny, task):
    cfg = quantized(config(tiny[task], task, local_steps=15))
    model, tok, examples = build(cfg)
    assert is_quantized(model)
    linears = [type(m).__name__ for m in model.modules() if "Linear4bit" in type(m).__name__]
    assert linears, "no layer was quantised"
    frozen = packed_weights(model)
    assert frozen and all(not p.requires_grad for n, p in model.named_parameters() if p.dtype == torch.uint8)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or "modules_to_save" in n for n in trainable), trainable
    before = adapter_state(model)
    result = train_local(model, examples, cfg, None, 0, 1, tok.pad_token_id)
    after = adapter_state(model)
    assert set(after) == set(before) and {t.dtype for t in after.values()} == {torch.float32}
    assert any(not torch.equal(before[k], after[k]) for k in before), "the adapter did not train"
    assert all(torch.equal(frozen[n], p) for n, p in packed_weights(model).items())
    assert 0 < result.train_loss < 20


def test_classification_heads_stay_unquantised_and_train(tiny):
    model, _, _ = build(quantized(config(tiny[CLS], CLS)))
    head = model.base_model.model.classifier
    assert type(head).__name__ == "ModulesToSaveWrapper"
    assert isinstance(head.modules_to_save["default"], torch.nn.Linear)
    assert head.modules_to_save["default"].weight.dtype == torch.float32


def test_fingerprints_agree_for_the_same_quantisation_and_differ_otherwise(tiny):
    cfg = config(tiny[LM], LM)

    def fp(c):
        base, _ = load_base_model(c.model, c.data, 0)
        return fingerprint(base)

    nf4 = fp(quantized(cfg))
    assert fp(quantized(cfg)) == nf4  # every party quantises the same checkpoint the same way
    assert fp(cfg) != nf4  # a party with the unquantised model is told apart
    assert fp(quantized(cfg, bits=4, quantType="fp4")) != nf4
    assert fp(quantized(cfg, bits=8)) not in {nf4, fp(cfg)}


def test_spec_rules_name_the_field_and_the_fix(tiny):
    with pytest.raises(ValueError, match="quantType applies to 4-bit quantisation only"):
        QuantizationSpec.model_validate({"bits": 8, "quantType": "nf4"})
    with pytest.raises(ValueError, match="bits"):
        QuantizationSpec.model_validate({"bits": 3})
    doc = yaml.safe_load(job_yaml(tiny[CLS], tiny[CLS]).split("---")[0])
    doc["spec"]["model"]["quantization"] = {"bits": 4}
    doc["spec"]["deepspeed"] = {"enabled": True}
    with pytest.raises(ValueError, match="quantization trains on the plain PyTorch path.*deepspeed.enabled: false"):
        FederatedJob.model_validate(doc)
    del doc["spec"]["deepspeed"]
    job = FederatedJob.model_validate(doc)
    assert job.spec.model.quantization.bnb_kwargs() == {
        "load_in_4bit": True,
        "bnb_4bit_quant_type": "nf4",
        "bnb_4bit_use_double_quant": True,
        "bnb_4bit_compute_dtype": "bfloat16",
    }


def test_refused_where_bitsandbytes_cannot_run(tiny, monkeypatch):
    spec = ModelSpec.model_validate({"source": str(tiny[LM]), "task": LM, "quantization": {"bits": 4}})
    cfg = config(tiny[LM], LM)
    # Not installed: the fix is named.
    real_find_spec = importlib.util.find_spec
    hidden = lambda n, *a: None if n == "bitsandbytes" else real_find_spec(n, *a)  # noqa: E731
    monkeypatch.setattr(importlib.util, "find_spec", hidden)
    assert "pip install 'fedtune[qlora]'" in cannot_run("cpu")
    monkeypatch.undo()
    # Installed, but its kernels fail on this device (no CUDA and no CPU backend).
    import bitsandbytes.functional as bnbf

    def broken(*_a, **_k):
        raise RuntimeError("no kernel for this device")

    monkeypatch.setattr(bnbf, "quantize_4bit", broken)
    problem = cannot_run("cpu")
    assert problem and "cannot quantise on cpu" in problem and "remove model.quantization" in problem
    with pytest.raises(ValueError, match="cannot quantise on cpu"):  # at trainer start
        load_base_model(spec, cfg.data, 0)
    found, note = verdict(spec, cfg.peft, cfg.data, model_here=True)  # fedtune run: before any pod starts
    assert found and found.startswith("spec.model.quantization") and note is None
    found, note = verdict(spec, cfg.peft, cfg.data)  # fedtune validate elsewhere: said, not refused
    assert found is None and "each party's trainer checks its own" in note
    monkeypatch.undo()
    assert cannot_run("cpu") is None  # and this machine's bitsandbytes does run


def test_cpu_pod_memory_counts_the_stated_model_size_quantised(tiny):
    """spec.model.parameters reaches the pod the operator builds: a CPU party's memory holds the model."""
    from fedtune.api import Party
    from fedtune.k8s.builders import trainer_context

    doc = yaml.safe_load(job_yaml(tiny[CLS], tiny[CLS]).split("---")[0])
    doc["metadata"]["uid"] = "0000"
    params = 7 * 10**9

    def added(quantization=None, gpus=0, parameters=params):
        doc["spec"]["model"].update(parameters=parameters, quantization=quantization)
        job = FederatedJob.model_validate(doc)
        spec = {"storage": {"bucket": "alice-data"}, "compute": {"gpusPerPod": gpus}}
        party = Party.model_validate({"metadata": {"name": "alice"}, "spec": spec})
        res = trainer_context(job, party).resources
        shm = 2**30 * max(1, gpus)
        return (parse_quantity(res.requests["memory"]) - parse_quantity("8Gi") - shm) / params

    assert added(parameters=None) == 0  # size unknown: compute.memory alone
    assert 1.2 * 4 <= added() < 1.2 * 4 + 0.01  # float32 weights, +20%
    assert 1.2 * 1 <= added({"bits": 8}) < 1.2 * 1.01
    assert 1.2 * 0.5 < added({"bits": 4}) < 1.2 * 0.53  # NF4 with double quantisation: ~0.52 bytes per weight
    assert added({"bits": 4}, gpus=1) == 0  # on a GPU pod the quantised model lives on the GPU


@pytest.mark.slow
def test_qlora_job_runs_locally_and_parties_agree_on_the_base(tmp_path_factory, tmp_path):
    model = make_tiny_model(tmp_path_factory.mktemp("tiny") / "bert", CLS)
    data = tmp_path / "toy.jsonl"
    data.write_bytes(toy_jsonl(200))
    docs = list(yaml.safe_load_all(job_yaml(model, data, rounds=2, samples=40)))
    docs[0]["spec"]["model"]["quantization"] = FOUR_BIT
    try:
        st, out = run_local(yaml.safe_dump_all(docs), tmp_path / "run")
    except SpecError as exc:  # pragma: no cover - the message is the failure
        pytest.fail(str(exc))
    assert st.phase == "Succeeded", out
    assert [h.round for h in st.history] == [0, 1, 2] and st.history[-1].metrics.eval_loss is not None
    # every party loaded the same quantised base (a mismatch would have dropped it)
    assert st.base_model_fingerprint and {p.fingerprint for p in st.parties} == {st.base_model_fingerprint}


def test_the_qlora_example_validates_and_asks_for_one_gpu_per_party():
    """examples/k8s/qlora-7b.yaml with its party: a one-rank pod on one GPU, memory as the party says."""
    from pathlib import Path

    from fedtune.api import Party
    from fedtune.k8s.builders import build_trainer_pod, trainer_context

    root = Path(__file__).resolve().parent.parent / "examples" / "k8s"
    job = FederatedJob.model_validate(yaml.safe_load((root / "qlora-7b.yaml").read_text()))
    docs = yaml.safe_load_all((root / "party-hospital-a.yaml").read_text())
    party = Party.model_validate(next(d for d in docs if d and d["kind"] == "Party"))
    q = job.spec.model.quantization
    assert (q.bits, q.quant_type, q.double_quant) == (4, "nf4", True)
    assert job.spec.training.gradient_checkpointing and job.spec.training.precision == "bf16"
    job.metadata.uid = "0000"
    pod = build_trainer_pod(trainer_context(job, party))
    c = pod["spec"]["containers"][0]
    assert c["command"][:3] == ["python", "-m", "fedtune_trainer"]  # one GPU: one process, no launcher
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert c["resources"]["requests"]["memory"] == "33Gi"  # 32Gi + 1Gi /dev/shm: the model lives on the GPU
