"""Local mode with each organisation's own files: checked before anything starts, uploaded to its bucket."""

from __future__ import annotations

import io
import json

import pytest
import yaml
from fedtune.api.errors import SpecError
from fedtune.data.own_files import read_own_data
from fedtune.documents import load_documents, parse_documents
from fedtune.local.runner import LocalRun
from tiny_models import make_tiny_model
from toy_data import toy_jsonl


@pytest.fixture(scope="module")
def tiny_seq_cls(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "bert", "sequence-classification")


def job_file(tmp_path, model, files: dict[str, tuple[str, str] | None], rounds=2) -> str:
    """A job file in tmp_path whose parties name their own files (relative to it)."""
    job = {
        "apiVersion": "fedtune.io/v1alpha1",
        "kind": "FederatedJob",
        "metadata": {"name": "own"},
        "spec": {
            "model": {"source": f"file://{model}", "task": "sequence-classification"},
            "peft": {"method": "lora", "config": {"r": 4, "target_modules": ["query", "value"]}},
            "data": {"labels": ["negative", "positive"], "maxLength": 16},
            "training": {"localEpochs": 1, "batchSize": 8, "learningRate": 0.01},
            "rounds": rounds,
            "minParties": len(files),
            "roundTimeoutSeconds": 120,
            "parties": [{"name": p} for p in files],
        },
    }
    parties = []
    for name, paths in files.items():
        data = {"trainPath": paths[0], "evalPath": paths[1]} if paths else {}
        spec = {"storage": {"bucket": f"{name}-data"}, "data": data}
        parties.append({"apiVersion": "fedtune.io/v1alpha1", "kind": "Party", "metadata": {"name": name}, "spec": spec})
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump_all([job, *parties]))
    return path


def write(path, body: bytes):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(body)
    return path


def own(path):
    docs = load_documents(path)
    return read_own_data(docs.job, [docs.parties[k] for k in docs.job.party_keys], docs.base_dir)


GOOD = toy_jsonl(8)
BAD = [
    (b'{"text": "fine", "label": "positive"}\n{"text": "oops"\n', "alice/train.jsonl line 2: invalid JSON"),
    (b'{"text": "fine", "label": "positive"}\n{"label": "negative"}\n', "line 2: missing field 'text'"),
    (b'{"text": "meh", "label": "neutral"}\n', "line 1: unknown label 'neutral'"),
    (b"\n\n", "alice/train.jsonl: no examples (empty file)"),
]


@pytest.mark.parametrize(("body", "expected"), BAD, ids=["json", "field", "label", "empty"])
def test_bad_data_names_party_file_and_line(tmp_path, tiny_seq_cls, body, expected):
    write(tmp_path / "alice" / "train.jsonl", body)
    write(tmp_path / "alice" / "eval.jsonl", GOOD)
    path = job_file(tmp_path, tiny_seq_cls, {"alice": ("alice/train.jsonl", "alice/eval.jsonl")})
    with pytest.raises(SpecError) as err:
        own(path)
    assert str(err.value).startswith("Party default/alice: ") and expected in str(err.value)


def test_missing_files_and_half_configured_parties_are_clear_errors(tmp_path, tiny_seq_cls):
    path = job_file(tmp_path, tiny_seq_cls, {"alice": ("nowhere.jsonl", "nowhere.jsonl")})
    with pytest.raises(SpecError, match=r"Party default/alice: .*nowhere\.jsonl: no such file or directory"):
        own(path)
    write(tmp_path / "empty-dir" / "notes.txt", b"")
    path = job_file(tmp_path, tiny_seq_cls, {"alice": ("empty-dir", "empty-dir")})
    with pytest.raises(SpecError, match="a directory with no \\*.jsonl files"):
        own(path)
    write(tmp_path / "a.jsonl", GOOD)
    path = job_file(tmp_path, tiny_seq_cls, {"alice": ("a.jsonl", "a.jsonl"), "bob": None})
    with pytest.raises(SpecError, match="Parties default/bob name no files of their own"):
        own(path)
    text = yaml.safe_dump(
        {
            "apiVersion": "fedtune.io/v1alpha1",
            "kind": "Party",
            "metadata": {"name": "x"},
            "spec": {"storage": {"bucket": "x-data"}, "data": {"trainPath": "a.jsonl"}},
        }
    )
    with pytest.raises(SpecError, match="set evalPath too"):
        parse_documents(text, "p.yaml", require_parties=False)


def test_a_directory_is_its_jsonl_files_in_name_order(tmp_path, tiny_seq_cls):
    write(tmp_path / "bob" / "train" / "2.jsonl", toy_jsonl(3, seed=2))
    write(tmp_path / "bob" / "train" / "1.jsonl", toy_jsonl(5, seed=1).rstrip(b"\n"))  # no final newline
    write(tmp_path / "bob" / "train" / "README", b"not data")
    write(tmp_path / "bob" / "eval.jsonl", GOOD)
    ((train, ev),) = own(job_file(tmp_path, tiny_seq_cls, {"bob": ("bob/train", "bob/eval.jsonl")})).values()
    assert train.body == toy_jsonl(5, seed=1) + toy_jsonl(3, seed=2) and len(train.records) == 8
    assert (train.key, ev.key) == ("data/train.jsonl", "data/eval.jsonl")


def test_run_trains_on_each_partys_own_files(tmp_path, tiny_seq_cls):
    write(tmp_path / "alice" / "train.jsonl", toy_jsonl(48, seed=1))
    write(tmp_path / "alice" / "eval.jsonl", toy_jsonl(16, seed=2))
    write(tmp_path / "bob" / "train" / "part-1.jsonl", toy_jsonl(24, seed=3))
    write(tmp_path / "bob" / "train" / "part-2.jsonl", toy_jsonl(8, seed=4))
    write(tmp_path / "bob" / "eval.jsonl", toy_jsonl(12, seed=5))
    files = {"alice": ("alice/train.jsonl", "alice/eval.jsonl"), "bob": ("bob/train", "bob/eval.jsonl")}
    docs = load_documents(job_file(tmp_path, tiny_seq_cls, files))
    out = io.StringIO()
    st = LocalRun(docs, tmp_path / "run", out=out, threads=1).run()
    text = out.getvalue()
    assert st.phase == "Succeeded", text
    assert "alice      48 train / 16 eval records from alice/train.jsonl" in text
    assert "bob        32 train / 12 eval records from bob/train" in text
    samples = {p.name: p.num_samples for p in st.parties}
    assert samples == {"default/alice": 48, "default/bob": 32}, samples
    # the majority baseline comes from the parties' own eval files: 14 of 28 are either class
    assert json.loads((tmp_path / "run" / "final" / "metrics.json").read_text())["majorityBaseline"] == 0.5


def test_the_example_reads_and_checks():
    from pathlib import Path

    example = Path(__file__).resolve().parent.parent / "examples" / "own-data.yaml"
    splits = own(example)  # paths relative to the example file, not to the working directory
    assert {k: (len(t.records), len(e.records)) for k, (t, e) in splits.items()} == {
        "default/clinic-a": (120, 40),
        "default/clinic-b": (120, 40),
    }
