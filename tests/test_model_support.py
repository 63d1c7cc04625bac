"""A PEFT method the installed libraries cannot train on the job's model is refused before round 1.

Three places refuse it: the static TASK_LIMITS table (every parse, the operator's admission
included), the meta-device probe (`fedtune validate` and `fedtune run`, where the model is on the
machine) and the trainer's forward pass at init (the real model, wherever it is).
"""

from __future__ import annotations

import pytest
import yaml
from fedtune.api.errors import SpecError
from fedtune.api.job import DataSchema, FederatedJob, ModelSpec, PeftSpec
from fedtune.api.methods import TASK_LIMITS
from fedtune.api.support import probe
from fedtune.cli import main
from fedtune.documents import parse_documents
from fedtune_trainer.models import apply_peft, load_base_model
from tiny_models import LABELS
from trainer_helpers import tiny_paths

CLS, LM = "sequence-classification", "causal-lm"
# Architectures of the families people fine-tune, as their default configs describe them.
FAMILIES = ("bert", "roberta", "llama", "gpt2", "mistral")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_paths(tmp_path_factory)


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    """A directory with only config.json per family: all the probe needs (no weights)."""
    from transformers import CONFIG_MAPPING

    out = {}
    for family in FAMILIES:
        d = tmp_path_factory.mktemp(family)
        CONFIG_MAPPING[family]().save_pretrained(d)
        out[family] = d
    return out


def spec(source, task, method, config) -> tuple:
    """probe's arguments for a model directory."""
    model, peft = ModelSpec(source=str(source), task=task), PeftSpec(method=method, config=config)
    return model, peft, DataSchema(labels=LABELS), source


@pytest.mark.parametrize(("method", "task"), sorted(TASK_LIMITS))
def test_static_limits_agree_with_the_libraries(family_dirs, method, task):
    # Under the lock, every family refuses what TASK_LIMITS refuses; when a new transformers or
    # peft lifts a limit, this fails and the table must lose that row.
    for family, d in family_dirs.items():
        problem = probe(*spec(d, task, method, {"num_virtual_tokens": 4}))
        assert problem and method in problem, f"{family}: {method} on {task} now trains: drop it from TASK_LIMITS"


def test_prefix_tuning_trains_causal_lms(family_dirs):
    # The other task is not limited, so the table says nothing about it.
    assert ("prefix_tuning", LM) not in TASK_LIMITS
    for family in ("llama", "gpt2", "mistral"):
        assert probe(*spec(family_dirs[family], LM, "prefix_tuning", {"num_virtual_tokens": 4})) is None, family


def test_probe_names_the_modules_a_wrong_target_list_could_have_named(tiny):
    problem = probe(*spec(tiny[CLS], CLS, "lora", {"r": 4, "target_modules": ["q_proj"]}))
    assert "lora" in problem and "BertForSequenceClassification" in problem
    assert "query" in problem and "value" in problem  # BERT's names, to pick from
    assert probe(*spec(tiny[CLS], CLS, "lora", {"r": 4, "target_modules": ["query"]})) is None


def _job_docs(source, method="lora", config=None, task=CLS) -> str:
    job = {
        "apiVersion": "fedtune.io/v1alpha1",
        "kind": "FederatedJob",
        "metadata": {"name": "j"},
        "spec": {
            "model": {"source": str(source), "task": task},
            "peft": {"method": method, "config": config or {"r": 4}},
            "data": {"labels": LABELS},
            "parties": [{"name": "alice"}],
        },
    }
    return yaml.safe_dump(job)


def test_every_parse_refuses_prefix_tuning_for_classification_naming_model_and_alternative(tiny):
    with pytest.raises(SpecError) as err:
        parse_documents(_job_docs(tiny[CLS], "prefix_tuning", {"num_virtual_tokens": 4}), "job.yaml", False)
    text = str(err.value)
    assert "spec.peft: prefix_tuning cannot train" in text and str(tiny[CLS]) in text
    assert "use prompt_tuning, lora or ia3" in text
    # The operator's admission validates the same model (fedtune.k8s: FederatedJob.model_validate).
    with pytest.raises(ValueError, match="prefix_tuning cannot train"):
        FederatedJob.model_validate(yaml.safe_load(_job_docs(tiny[CLS], "prefix_tuning", {"num_virtual_tokens": 4})))


def test_validate_probes_a_local_model(tiny, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(_job_docs(tiny[CLS], config={"r": 4, "target_modules": ["q_proj"]}))
    assert main(["validate", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "spec.peft: peft cannot apply lora" in err and "linear modules" in err and "Traceback" not in err
    good = tmp_path / "good.yaml"
    good.write_text(_job_docs(tiny[CLS], config={"r": 4, "target_modules": ["query"]}))
    assert main(["validate", str(good)]) == 0
    remote = tmp_path / "remote.yaml"
    remote.write_text(_job_docs("s3://models/tiny"))
    assert main(["validate", str(remote)]) == 0
    assert "not on this machine" in capsys.readouterr().out


def test_validate_reports_every_problem_of_a_document_at_once(tiny, tmp_path, capsys):
    doc = yaml.safe_load(_job_docs(tiny[CLS], config={"r": -3}))
    doc["spec"].update(rounds=0, minParties=4)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(doc))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "spec.rounds: must be at least 1 (got 0)" in err
    assert "minParties (4) is larger than the number of parties (1)" in err
    assert "spec.peft: config.r must be a positive integer (got -3)" in err


def test_trainer_refuses_at_init_what_its_libraries_cannot_train(tiny):
    # Past every control-plane check (a stale operator, say): the trainer's own forward pass at init.
    model, _ = load_base_model(ModelSpec(source=str(tiny[CLS]), task=CLS), DataSchema(labels=LABELS), seed=0)
    with pytest.raises(ValueError) as err:
        apply_peft(model, PeftSpec(method="prefix_tuning", config={"num_virtual_tokens": 4}), CLS, seed=0)
    assert "prefix_tuning cannot train BertForSequenceClassification" in str(err.value)
    assert "past key values" in str(err.value)


def test_check_at_init_draws_no_random_numbers(tiny):
    # The adapter and the data order come from the job's seed: the forward pass must not draw from
    # the generator (dropout in train mode would), or training would differ from a run without it.
    import torch
    from peft import LoraConfig, get_peft_model

    def base():
        model, _ = load_base_model(ModelSpec(source=str(tiny[LM]), task=LM), DataSchema(labels=LABELS), seed=0)
        return model.train()

    peft = PeftSpec(method="lora", config={"r": 4, "lora_dropout": 0.5})
    plain = base()
    torch.manual_seed(0)
    get_peft_model(plain, LoraConfig(task_type="CAUSAL_LM", r=4, lora_dropout=0.5))
    expected = torch.random.get_rng_state()
    checked = apply_peft(base(), peft, LM, seed=0)
    assert torch.equal(torch.random.get_rng_state(), expected)
    assert checked.training, "the check restores train mode"


def test_a_missing_local_model_is_a_problem_in_local_mode_and_a_note_elsewhere(tmp_path):
    from fedtune.api.support import verdict

    model, peft, data, _ = spec(tmp_path / "nowhere", CLS, "lora", {"r": 4})
    problem, note = verdict(model, peft, data, model_here=True)
    assert problem.startswith("spec.model.source: ") and "does not exist" in problem and note is None
    problem, note = verdict(model, peft, data)
    assert problem is None and "not checked" in note


def test_run_refuses_before_any_pod_starts(tiny, tmp_path):
    import io

    from fedtune.local.runner import LocalRun
    from toy_data import toy_jsonl

    data = tmp_path / "toy.jsonl"
    data.write_bytes(toy_jsonl(40))
    docs = list(yaml.safe_load_all(_job_docs(tiny[CLS], config={"r": 4, "target_modules": ["q_proj"]})))
    docs[0]["spec"]["data"]["labels"] = ["negative", "positive"]
    docs.append(
        {
            "apiVersion": "fedtune.io/v1alpha1",
            "kind": "Party",
            "metadata": {"name": "alice"},
            "spec": {"storage": {"bucket": "alice-data"}, "data": {"trainPath": str(data), "evalPath": str(data)}},
        }
    )
    run = LocalRun(parse_documents(yaml.safe_dump_all(docs), "job.yaml"), tmp_path / "run", out=io.StringIO())
    with pytest.raises(SpecError, match="spec.peft: peft cannot apply lora"):
        run.run()
    assert not run.pods.pods and not list((tmp_path / "run").glob("logs/*--*.log"))  # no pod was ever started
    assert run.pods.zygote.proc.poll() is not None  # and the process pods fork from is gone
