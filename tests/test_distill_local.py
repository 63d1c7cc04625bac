"""Knowledge distillation end to end: `fedtune teacher` on a public share, then a federated run that distils from it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from fedtune import cli
from fedtune.api.job import DistillationSpec
from fedtune.api.protocol import TrainerConfig
from test_local_run import job_yaml, run_local, tiny_seq_cls, toy_data  # noqa: F401  (fixtures)
from toy_data import toy_jsonl, toy_records

LABELS = ["negative", "positive"]


def _with_distillation(text: str, teacher: Path, alpha: float = 0.5, temperature: float = 2.0) -> str:
    docs = list(yaml.safe_load_all(text))
    docs[0]["spec"]["training"]["distillation"] = {
        "teacher": f"file://{teacher}",
        "alpha": alpha,
        "temperature": temperature,
    }
    return yaml.safe_dump_all(docs)


@pytest.fixture(scope="module")
def teacher(tiny_seq_cls, toy_data, tmp_path_factory) -> Path:  # noqa: F811
    """A teacher fine-tuned by `fedtune teacher` on a public share (other records than the parties')."""
    root = tmp_path_factory.mktemp("teacher")
    public = root / "public.jsonl"
    public.write_bytes(toy_jsonl(160, seed=7))
    held = root / "held.jsonl"
    held.write_bytes(toy_jsonl(100, seed=8))
    job = root / "job.yaml"
    out = root / "ckpt"
    job.write_text(_with_distillation(job_yaml(tiny_seq_cls, toy_data), out))
    argv = ["teacher", str(job), "--data", str(public), "--epochs", "6", "--learning-rate", "2e-3"]
    assert cli.main(argv + ["--eval", str(held)]) == 0  # --output defaults to the job's teacher
    return out


def _accuracy(model, tokenizer, records: list[dict]) -> float:
    batch = tokenizer([r["text"] for r in records], padding=True, return_tensors="pt")
    with torch.no_grad():
        pred = model(**batch).logits.argmax(-1)
    gold = torch.tensor([LABELS.index(r["label"]) for r in records])
    return (pred == gold).float().mean().item()


def test_teacher_cli_writes_a_transformers_checkpoint_that_beats_chance(teacher):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(teacher).eval()
    tokenizer = AutoTokenizer.from_pretrained(teacher)
    assert model.config.id2label == dict(enumerate(LABELS))
    assert _accuracy(model, tokenizer, toy_records(200, seed=9)) > 0.8  # chance is 0.5
    doc = json.loads((teacher / "fedtune_teacher.json").read_text())
    assert doc["method"] == "full fine-tuning" and doc["evalAccuracy"] > 0.8 and doc["publicData"]["examples"] == 160


def test_teacher_cli_needs_an_output_when_the_job_names_none(tiny_seq_cls, toy_data, tmp_path, capsys):  # noqa: F811
    job = tmp_path / "job.yaml"
    job.write_text(job_yaml(tiny_seq_cls, toy_data))
    assert cli.main(["teacher", str(job), "--data", str(toy_data)]) == 2
    assert "--output is needed" in capsys.readouterr().err


def test_federated_run_distils_from_the_teacher(tiny_seq_cls, toy_data, teacher, tmp_path):  # noqa: F811
    workdir = tmp_path / "run"
    st, out = run_local(_with_distillation(job_yaml(tiny_seq_cls, toy_data, rounds=2), teacher), workdir)
    assert st.phase == "Succeeded", out
    trained = [h for h in st.history if h.round > 0]
    assert [h.round for h in trained] == [1, 2]
    assert all(h.metrics.train_distill_loss is not None and h.metrics.train_distill_loss > 0 for h in trained)
    logs = "".join(p.read_text() for p in (workdir / "logs").glob("*.log"))
    assert "T²·KL to the teacher" in logs and "alpha 0.5, T 2" in logs


def _student_and_teacher(model_dir: Path, teacher_dir: Path):
    from fedtune_trainer.distill import load_teacher
    from fedtune_trainer.models import apply_peft, load_base_model

    spec = job_yaml(model_dir, model_dir)  # only the job's model, peft, data and training parts are used
    job = next(yaml.safe_load_all(spec))["spec"]
    job["training"].update(
        localEpochs=10, learningRate=0.02, distillation={"teacher": str(teacher_dir), "temperature": 2}
    )
    cfg = TrainerConfig.model_validate({k: job.get(k, {}) for k in ("model", "peft", "data", "training", "deepspeed")})
    base, tokenizer = load_base_model(cfg.model, cfg.data, seed=0)
    student = apply_peft(base, cfg.peft, cfg.model.task, seed=0)
    return cfg, student, tokenizer, load_teacher(cfg.model, cfg.data, cfg.training.distillation, tokenizer, None)


def _agreement(student, teacher, examples) -> float:
    from fedtune_trainer.data import collate

    batch = collate(examples, 0)
    del batch["labels"]
    student.eval()
    with torch.no_grad():
        return (student(**batch).logits.argmax(-1) == teacher(**batch).logits.argmax(-1)).float().mean().item()


def test_alpha_one_trains_the_student_towards_the_teacher_not_the_labels(tiny_seq_cls, teacher):  # noqa: F811
    from fedtune_trainer.data import load_examples
    from fedtune_trainer.train import train_local

    # Every training label is flipped: with alpha 1 the labels play no part, and only the teacher's
    # soft labels can make the student agree with it (cross-entropy alone would teach the opposite).
    flipped = [{**r, "label": LABELS[1 - LABELS.index(r["label"])]} for r in toy_records(160, seed=3)]
    raw = "".join(json.dumps(r) + "\n" for r in flipped).encode()
    for alpha, rises in ((1.0, True), (0.0, False)):
        cfg, student, tokenizer, tch = _student_and_teacher(tiny_seq_cls, teacher)
        # The spec refuses alpha 0 (it would ignore the teacher); the loss allows it, for this comparison.
        cfg.training.distillation = DistillationSpec.model_construct(teacher=str(teacher), alpha=alpha, temperature=2)
        examples = load_examples(raw, cfg.data, cfg.model.task, tokenizer)
        before = _agreement(student, tch, examples)
        result = train_local(student, examples, cfg, teacher=tch)
        after = _agreement(student, tch, examples)
        assert result.distill_loss is not None
        if rises:
            assert after > max(before, 0.85), (before, after)
        else:
            assert after < 0.3, (before, after)  # the flipped labels won: the student disagrees with the teacher


def test_a_teacher_with_other_labels_is_refused_at_load(tiny_seq_cls, tmp_path):  # noqa: F811
    from fedtune_trainer.distill import load_teacher
    from fedtune_trainer.models import load_base_model
    from tiny_models import make_tiny_model

    other = make_tiny_model(tmp_path / "other", "sequence-classification")  # labels neg, pos
    cfg = TrainerConfig.model_validate(
        {
            "model": {"source": str(tiny_seq_cls), "task": "sequence-classification"},
            "peft": {},
            "data": {"labels": LABELS},
            "training": {"distillation": {"teacher": str(other)}},
            "deepspeed": {},
        }
    )
    _, tokenizer = load_base_model(cfg.model, cfg.data, seed=0)
    with pytest.raises(ValueError, match=f"training.distillation.teacher {other}.*wrong classes"):
        load_teacher(cfg.model, cfg.data, cfg.training.distillation, tokenizer, None)
