"""Offsite tuning (peft.method offsite): the emulator's layer mapping, its trainable adapter, the plug-back into
the full model, the job's validation, and a local run in which no party ever loads the full model."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch
import yaml
from fedtune.api.job import FederatedJobSpec
from fedtune.api.offsite import adapter_map, kept_layers, offsite_params, plugged_name
from fedtune_trainer import offsite
from test_local_run import job_yaml, run_local, toy_data  # noqa: F401 - fixtures
from tiny_models import make_tiny_model

LAYERS = 6  # a middle of 2 at adapterLayers 2: the default dropRatio keeps one of them
OFFSITE = {"method": "offsite", "config": {"adapterLayers": 2, "dropRatio": 0.5}}


@pytest.fixture(scope="module")
def tiny6(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny6") / "bert", "sequence-classification", layers=LAYERS)


# -- the layer mapping (pure) ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("total", "k", "ratio", "expected"),
    [
        (12, 2, 0.5, [0, 1, 2, 4, 6, 8, 10, 11]),
        (6, 2, 0.5, [0, 1, 2, 4, 5]),
        (12, 2, 0.0, list(range(12))),
        (12, 2, 1.0, [0, 1, 10, 11]),
        (32, 2, 0.75, [0, 1, 2, 6, 10, 14, 18, 22, 26, 30, 31]),
        (8, 1, 1 / 3, [0, 1, 2, 4, 5, 7]),
    ],
)
def test_kept_layers(total, k, ratio, expected):
    kept = kept_layers(total, k, ratio)
    assert kept == expected
    assert kept[:k] == list(range(k)) and kept[-k:] == list(range(total - k, total))  # the adapter stays whole
    assert kept == sorted(set(kept))


def test_kept_layers_needs_a_middle():
    with pytest.raises(ValueError, match=r"adapterLayers \(2\) leaves no middle .* at most 1"):
        kept_layers(4, 2, 0.5)
    with pytest.raises(ValueError, match="at least 3 layers"):
        kept_layers(2, 1, 0.5)


def test_adapter_map_and_names():
    kept = kept_layers(12, 2, 0.5)  # emulator of 8 layers
    mapping = adapter_map(kept, 2)
    assert mapping == {0: 0, 1: 1, 6: 10, 7: 11}
    path = "bert.encoder.layer"
    assert plugged_name(f"{path}.7.output.dense.weight", path, mapping) == f"{path}.11.output.dense.weight"
    assert plugged_name(f"{path}.1.attention.self.query.bias", path, mapping) == f"{path}.1.attention.self.query.bias"
    assert plugged_name("classifier.weight", path, mapping) == "classifier.weight"
    with pytest.raises(KeyError):  # a middle layer never trains, so it never plugs back
        plugged_name(f"{path}.3.output.dense.weight", path, mapping)


def test_params_validation():
    assert offsite_params({}) == {"adapterLayers": 2, "dropRatio": 0.5}
    for bad, match in [
        ({"adapterLayers": 0}, "adapterLayers must be between 1"),
        ({"adapterLayers": 1.5}, "adapterLayers must be an integer"),
        ({"dropRatio": 1.5}, "dropRatio must be between 0 and 1"),
        ({"r": 8}, "offsite has no parameter"),
    ]:
        with pytest.raises(ValueError, match=match):
            offsite_params(bad)


def _spec(**overrides) -> dict:
    spec = {
        "model": {"source": "/full", "emulator": "/emu", "task": "sequence-classification"},
        "peft": {"method": "offsite"},
        "data": {"labels": ["a", "b"]},
        "parties": [{"name": "alice"}, {"name": "bob"}],
    }
    spec.update(overrides)
    return spec


def test_spec_validation():
    FederatedJobSpec.model_validate(_spec())
    cases = [
        ({"model": {"source": "/full", "task": "sequence-classification"}}, "offsite needs model.emulator"),
        (
            {"model": {"source": "/full", "emulator": "/emu", "task": "sequence-classification"}, "peft": {}},
            "model.emulator is for peft.method offsite",
        ),
        ({"model": {"source": "/m", "emulator": "file:///m", "task": "sequence-classification"}}, "is model.source"),
        ({"deepspeed": {"enabled": True}}, "deepspeed.enabled cannot be used with peft.method offsite"),
        ({"aggregator": {"loraMode": "exact"}}, "loraMode: exact cannot be used with peft.method offsite"),
        ({"personalization": {"mode": "head"}}, "personalization cannot be used with peft.method offsite"),
        ({"peft": {"method": "offsite", "config": {"dropRatio": -1}}}, "dropRatio must be between"),
    ]
    for overrides, match in cases:
        with pytest.raises(ValueError, match=match):
            FederatedJobSpec.model_validate(_spec(**overrides))
    # the parties' model is the emulator, with no trace of the full model's source
    party = FederatedJobSpec.model_validate(_spec()).party_model
    assert party.source == "/emu" and party.emulator is None


def test_probe_refuses_too_many_adapter_layers(tiny6):
    from fedtune.api.job import DataSchema, ModelSpec, PeftSpec
    from fedtune.api.support import verdict

    model = ModelSpec(source=str(tiny6), task="sequence-classification")
    data = DataSchema(labels=["neg", "pos"])
    ok, _ = verdict(model, PeftSpec(method="offsite", config={"adapterLayers": 2}), data)
    assert ok is None
    problem, _ = verdict(model, PeftSpec(method="offsite", config={"adapterLayers": 3}), data)
    assert problem is not None and "adapterLayers (3) leaves no middle" in problem and "at most 2" in problem


def _in_full(name: str) -> str:
    """An emulator tensor's name in the full model of LAYERS layers (emulator layers 3, 4 are full 4, 5), by hand."""
    return re.sub(r"^bert\.encoder\.layer\.([34])\.", lambda m: f"bert.encoder.layer.{int(m.group(1)) + 1}.", name)


# -- the emulator and the plug-back (torch) -------------------------------------------------------------------


def _load(source, seed=0):
    from fedtune.api.job import DataSchema, ModelSpec
    from fedtune_trainer.models import load_base_model

    return load_base_model(
        ModelSpec(source=str(source), task="sequence-classification"), DataSchema(labels=["neg", "pos"]), seed
    )


@pytest.fixture(scope="module")
def emulator_dir(tiny6, tmp_path_factory):
    from fedtune.api.job import DataSchema, ModelSpec, PeftSpec, TrainingSpec
    from fedtune.api.protocol import TrainerConfig

    cfg = TrainerConfig(
        model=ModelSpec(source=str(tiny6), task="sequence-classification"),
        peft=PeftSpec(**OFFSITE),
        data=DataSchema(labels=["neg", "pos"]),
        training=TrainingSpec(),
        deepspeed={},
    )
    where = tmp_path_factory.mktemp("emu")
    (where / "config.json").write_text(json.dumps(cfg.to_wire()))
    out = where / "emulator"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedtune_trainer",
            "emulator",
            "--config",
            str(where / "config.json"),
            "--output",
            str(out),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "5 of 6 layers" in done.stdout and "[0, 1, 2, 4, 5]" in done.stdout, done.stdout
    return out


def test_emulator_holds_the_kept_layers(tiny6, emulator_dir):
    full, _ = _load(tiny6)
    emu, _ = _load(emulator_dir)
    assert emu.config.num_hidden_layers == 5
    info = emu.config.fedtune_offsite
    assert info["kept"] == [0, 1, 2, 4, 5] and info["fullLayers"] == LAYERS
    full_state, emu_state = full.state_dict(), emu.state_dict()
    path = "bert.encoder.layer"
    for i, j in enumerate(info["kept"]):  # emulator layer i is full layer kept[i], bit for bit
        layer = {n: t for n, t in emu_state.items() if n.startswith(f"{path}.{i}.")}
        assert layer
        for name, tensor in layer.items():
            assert torch.equal(tensor, full_state[name.replace(f"{path}.{i}.", f"{path}.{j}.", 1)]), name
    outside = [n for n in emu_state if not n.startswith(path)]  # embeddings, pooler, the seeded head
    assert all(torch.equal(emu_state[n], full_state[n]) for n in outside)
    assert not any(n.startswith(f"{path}.5.") for n in emu_state)
    assert offsite.model_bytes(emulator_dir) < offsite.model_bytes(tiny6)


def test_only_adapter_layers_and_head_train(emulator_dir):
    from fedtune.api.job import PeftSpec
    from fedtune_trainer.adapters import adapter_state
    from fedtune_trainer.models import apply_peft

    emu, _ = _load(emulator_dir)
    model = apply_peft(emu, PeftSpec(**OFFSITE), "sequence-classification", seed=0)
    state = adapter_state(model)
    layers = {int(n.split(".")[3]) for n in state if n.startswith("bert.encoder.layer.")}
    assert layers == {0, 1, 3, 4}  # the first and last two of five; the kept middle layer (2) is frozen
    assert {n for n in state if not n.startswith("bert.encoder.layer.")} == {"classifier.weight", "classifier.bias"}
    assert not any(p.requires_grad for n, p in model.named_parameters() if n.startswith("bert.embeddings"))
    for config, match in [
        ({"adapterLayers": 1}, r"adapterLayers \(1\) differs from the emulator's \(2\)"),
        ({"dropRatio": 0.25}, r"dropRatio \(0.25\) differs from the emulator's \(0.5\)"),
    ]:
        with pytest.raises(ValueError, match=match):
            apply_peft(_load(emulator_dir)[0], PeftSpec(method="offsite", config=config), "sequence-classification", 0)


def test_a_full_model_is_refused_as_emulator(tiny6):
    from fedtune.api.job import PeftSpec
    from fedtune_trainer.models import apply_peft

    with pytest.raises(ValueError, match="is not an emulator"):
        apply_peft(_load(tiny6)[0], PeftSpec(**OFFSITE), "sequence-classification", 0)


def test_plug_back_writes_adapter_layers_only(tiny6, emulator_dir):
    full, _ = _load(tiny6)
    before = {n: t.clone() for n, t in full.state_dict().items()}
    emu, _ = _load(emulator_dir)
    path = "bert.encoder.layer"
    trained = {
        n: torch.randn_like(p)
        for n, p in emu.named_parameters()
        if n.startswith(("classifier.", f"{path}.0.", f"{path}.1.", f"{path}.3.", f"{path}.4."))
    }
    written = offsite.plug(full, trained, emu.config.fedtune_offsite)
    after = full.state_dict()
    assert len(written) == len(trained)
    for name, value in trained.items():  # emulator 3, 4 -> full 4, 5
        assert torch.equal(after[_in_full(name)], value), name
    for i in (2, 3):  # the full model's middle stays the base's
        assert all(torch.equal(after[n], before[n]) for n in before if n.startswith(f"{path}.{i}."))
    with pytest.raises(ValueError, match="compressed middle layer"):
        offsite.plug(full, {f"{path}.2.output.dense.weight": torch.zeros(32, 64)}, emu.config.fedtune_offsite)
    with pytest.raises(ValueError, match="does not plug"):
        offsite.plug(full, {"classifier.weight": torch.zeros(3, 32)}, emu.config.fedtune_offsite)


# -- end to end: local mode ----------------------------------------------------------------------------------


def test_offsite_end_to_end(tiny6, toy_data, tmp_path):  # noqa: F811
    """`fedtune run` builds the emulator once, the parties train its adapter layers and never read the full
    model, and final/ plugs into the full model, whose adapter layers are then the last global's."""
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    docs = list(yaml.safe_load_all(job_yaml(tiny6, toy_data, peft=OFFSITE)))
    emulator = tmp_path / "emulator"
    docs[0]["spec"]["model"]["emulator"] = f"file://{emulator}"
    run = tmp_path / "run"
    st, out = run_local(yaml.safe_dump_all(docs), run)
    assert st.phase == "Succeeded", out
    assert "building the offsite-tuning emulator" in out and "5 of 6 layers" in out
    assert (emulator / "config.json").exists()
    assert [h.round for h in st.history] == [0, 1, 2]
    assert all(h.metrics.eval_accuracy is not None for h in st.history)  # the emulator's accuracy, every round
    assert "python -m fedtune_trainer.offsite" in out

    # no party was told where the full model is: its configs and tickets name the emulator only
    seen = [p.read_text() for p in run.rglob("*.json") if "mailboxes" in p.parts or p.name == "zygote-config.json"]
    assert seen and all(str(tiny6) not in text for text in seen)
    assert any(str(emulator) in text for text in seen)

    final = run / "final"
    tensors = load_file(final / "offsite.safetensors")
    layers = {int(n.split(".")[3]) for n in tensors if n.startswith("bert.encoder.layer.")}
    assert layers == {0, 1, 3, 4}
    plugged = tmp_path / "plugged"
    done = subprocess.run(
        [sys.executable, "-m", "fedtune_trainer.offsite", str(final), str(plugged), "--eval", str(toy_data)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["plugged"] == len(tensors) and 0.0 <= result["evalAccuracy"] <= 1.0
    model = AutoModelForSequenceClassification.from_pretrained(plugged)
    state = model.state_dict()
    assert model.config.num_hidden_layers == LAYERS
    for name, value in tensors.items():
        assert torch.equal(state[_in_full(name)], value), name
    base, _ = _load(tiny6)
    assert torch.equal(
        state["bert.encoder.layer.3.output.dense.weight"], base.state_dict()["bert.encoder.layer.3.output.dense.weight"]
    )


def test_emulator_command(tiny6, toy_data, tmp_path, capsys):  # noqa: F811
    """`fedtune emulator` writes the emulator where asked, says what it kept, and never overwrites one."""
    from fedtune.cli import main

    docs = list(yaml.safe_load_all(job_yaml(tiny6, toy_data, peft=OFFSITE)))
    docs[0]["spec"]["model"]["emulator"] = f"file://{tmp_path / 'emu'}"
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump_all(docs))
    assert main(["emulator", str(job)]) == 0
    assert "5 of 6 layers" in capsys.readouterr().out
    config = json.loads((tmp_path / "emu" / "config.json").read_text())
    assert config["num_hidden_layers"] == 5 and config["fedtune_offsite"]["kept"] == [0, 1, 2, 4, 5]
    assert main(["emulator", str(job)]) != 0  # it exists: nothing is overwritten
    assert "exists: remove it" in capsys.readouterr().err
    docs[0]["spec"]["peft"] = {"method": "lora", "config": {"r": 4}}
    del docs[0]["spec"]["model"]["emulator"]
    job.write_text(yaml.safe_dump_all(docs))
    assert main(["emulator", str(job), "--output", str(tmp_path / "other")]) != 0
    assert "an emulator is for peft.method offsite" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()
