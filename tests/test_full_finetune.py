"""Full fine-tuning (peft.method full): every weight trains and travels; final/ is a transformers model."""

from __future__ import annotations

import hashlib

import pytest
import torch
from fedtune.api.full_export import pack, unpack
from fedtune.api.job import FederatedJobSpec
from fedtune.api.methods import check_peft_config
from safetensors.torch import load_file
from test_local_run import job_yaml, run_local, tiny_seq_cls, toy_data  # noqa: F401 - fixtures
from tiny_models import make_tiny_model

FULL = {"method": "full"}


def _spec(**overrides) -> dict:
    spec = {
        "model": {"source": "/m", "task": "sequence-classification"},
        "peft": FULL,
        "data": {"labels": ["a", "b"]},
        "parties": [{"name": "alice"}, {"name": "bob"}],
    }
    spec.update(overrides)
    return spec


def test_full_fine_tuning_end_to_end(tiny_seq_cls, toy_data, tmp_path, monkeypatch):  # noqa: F811
    """Two parties, two rounds; every update and global goes through the multipart transport."""
    from fedtune.rounds import intents
    from fedtune.storage.s3 import Bucket
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    started, start = [], Bucket.start_multipart
    monkeypatch.setattr(intents, "MULTIPART_THRESHOLD", 0)  # as a model above 64 MiB would
    monkeypatch.setattr(Bucket, "start_multipart", lambda self, key, *a: started.append(key) or start(self, key, *a))
    st, out = run_local(job_yaml(tiny_seq_cls, toy_data, peft=FULL), tmp_path / "run")
    assert st.phase == "Succeeded", out
    assert "Final model (transformers layout)" in out and "PeftModel" not in out  # what the user is told to load
    assert [h.round for h in st.history] == [0, 1, 2]
    assert all(h.metrics.eval_loss is not None and h.metrics.eval_accuracy is not None for h in st.history)
    assert all(h.metrics.train_loss is not None for h in st.history[1:])
    assert sorted(k.split("/", 2)[2] for k in started) == [
        "global/1.safetensors",
        "global/2.safetensors",
        *["round-1/update.safetensors"] * 2,
        *["round-2/update.safetensors"] * 2,
    ]
    base = load_file(tiny_seq_cls / "model.safetensors")
    # an update is the whole model: as many bytes as its weights (float32), give or take the header
    weights = sum(t.numel() * t.element_size() for t in base.values())
    assert weights <= st.adapter_bytes < weights + 64 * 1024
    print(f"full fine-tuning: {st.adapter_bytes} bytes per update")

    final = tmp_path / "run" / "final"
    saved = load_file(final / "model.safetensors")
    assert hashlib.sha256((final / "model.safetensors").read_bytes()).hexdigest() == st.global_sha256
    # every weight of the base model trained, not only the new head
    assert set(saved) == set(base)
    unchanged = [k for k in base if torch.equal(saved[k], base[k])]
    assert not unchanged, unchanged
    # final/ is a transformers model directory, and loads as exactly the last global
    assert {"config.json", "tokenizer.json", "tokenizer_config.json"} <= {p.name for p in final.iterdir()}
    model = AutoModelForSequenceClassification.from_pretrained(final)
    state = model.state_dict()
    assert set(state) == set(saved)
    for name, tensor in saved.items():
        assert state[name].dtype == tensor.dtype and torch.equal(state[name], tensor), name
    assert model.config.id2label == {0: "negative", 1: "positive"}
    tokenizer = AutoTokenizer.from_pretrained(final)
    batch = tokenizer(["great film"], return_tensors="pt")
    assert model(**batch).logits.shape == (1, 2)


def test_full_state_of_a_tied_model_travels_once_and_loads(tmp_path):
    """A causal LM whose output embeddings are its input embeddings: one tensor, written through the tie."""
    from fedtune.api.job import DataSchema, ModelSpec, PeftSpec
    from fedtune_trainer.adapters import adapter_state, load_adapter_state, model_files_bundle
    from fedtune_trainer.models import apply_peft, load_base_model

    where = make_tiny_model(tmp_path / "llama", "causal-lm")
    net, tok = load_base_model(ModelSpec(source=str(where), task="causal-lm"), DataSchema(), 0)
    model = apply_peft(net, PeftSpec(method="full"), "causal-lm", 0)
    state = adapter_state(model)
    assert "lm_head.weight" not in state and "model.embed_tokens.weight" in state
    assert sum(t.numel() for t in state.values()) == sum(p.numel() for p in model.parameters())
    changed = {k: v + 1.0 for k, v in state.items()}
    load_adapter_state(model, changed)
    assert torch.equal(model.lm_head.weight, changed["model.embed_tokens.weight"])  # still tied
    files = unpack(model_files_bundle(model, tok))
    assert {"config.json", "generation_config.json", "tokenizer.json"} <= set(files)


def test_server_optimiser_state_covers_the_whole_model(tiny_seq_cls):  # noqa: F811
    """FedAdam and FedAvgM keep their moments for every weight of a fully fine-tuned model."""
    from fedtune.api.job import DataSchema, ModelSpec, PeftSpec
    from fedtune_trainer.adapters import adapter_state
    from fedtune_trainer.models import apply_peft, load_base_model
    from fedtune_trainer.strategies import make_strategy, weighted_mean

    net, _ = load_base_model(
        ModelSpec(source=str(tiny_seq_cls), task="sequence-classification"), DataSchema(labels=["a", "b"]), 0
    )
    global0 = adapter_state(apply_peft(net, PeftSpec(method="full"), "sequence-classification", 0))
    assert "classifier.weight" in global0 and "bert.embeddings.word_embeddings.weight" in global0
    updates = [{k: v + 0.01 * (i + 1) for k, v in global0.items()} for i in range(2)]
    for name, kinds in (("fedadam", ("m", "v")), ("fedavgm", ("momentum",))):
        strategy = make_strategy(name, {})
        new = strategy.aggregate(global0, weighted_mean(updates, [1, 1]))
        assert set(new) == set(global0)
        assert all(not torch.equal(new[k], global0[k]) for k in global0), name
        state = strategy.state_dict()
        assert set(state) == {f"{kind}/{k}" for kind in kinds for k in global0}, name
        assert all(bool(state[f"{kinds[0]}/{k}"].abs().sum() > 0) for k in global0), name


def test_exact_lora_mode_is_refused_with_full():
    with pytest.raises(ValueError, match=r"aggregator.loraMode: exact.*peft.method: full"):
        FederatedJobSpec.model_validate(_spec(aggregator={"loraMode": "exact"}))


def test_full_takes_no_config_and_no_quantisation():
    with pytest.raises(ValueError, match="takes no config"):
        check_peft_config("full", {"r": 8}, "causal-lm")
    with pytest.raises(ValueError, match="model.quantization with peft.method: full"):
        FederatedJobSpec.model_validate(
            _spec(model={"source": "/m", "task": "sequence-classification", "quantization": {"bits": 4}})
        )
    FederatedJobSpec.model_validate(_spec())  # and the plain job is fine


def test_model_files_bundle_refuses_paths_and_reserved_names():
    assert unpack(pack({"config.json": b"{}"})) == {"config.json": b"{}"}
    for name in ("../x", "a/b", "model.safetensors", "metrics.json", ".hidden"):
        with pytest.raises(ValueError, match="may not hold"):
            unpack(b'{"%s": ""}' % name.encode())
    with pytest.raises(ValueError, match="not JSON"):
        unpack(b"\x00")
