"""Every user error of a job file, as the CLI says it: exit code 2, one line naming the document, the field and
the file, no traceback, and (for `fedtune run`) nothing started: found by fault injection into a small job."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from toy_data import toy_jsonl

# hf:// keeps `validate` from loading torch to probe the model: these cases are about the file and its data.
MODEL = "hf://example/tiny-bert"


def documents(data: str = "data.jsonl") -> list[dict]:
    """A small valid job: two parties, a Dataset dealing out a JSON-lines file (relative to the job file's dir)."""
    job = {
        "apiVersion": "fedtune.io/v1alpha1",
        "kind": "FederatedJob",
        "metadata": {"name": "tiny"},
        "spec": {
            "model": {"source": MODEL, "task": "sequence-classification"},
            "peft": {"method": "lora", "config": {"r": 4, "target_modules": ["query", "value"]}},
            "data": {"labels": ["negative", "positive"], "maxLength": 16},
            "rounds": 2,
            "minParties": 2,
            "parties": [{"name": "alice"}, {"name": "bob"}],
        },
    }
    parties = [
        {
            "apiVersion": "fedtune.io/v1alpha1",
            "kind": "Party",
            "metadata": {"name": p},
            "spec": {"storage": {"bucket": f"{p}-data"}},
        }
        for p in ("alice", "bob")
    ]
    dataset = {
        "apiVersion": "fedtune.io/v1alpha1",
        "kind": "Dataset",
        "metadata": {"name": "toy"},
        "spec": {"source": f"file://{data}", "labels": ["negative", "positive"], "seed": 1},
    }
    return [job, *parties, dataset]


def own_files(d: list[dict]) -> list[dict]:
    """The parties bring their own files instead of a Dataset."""
    d = [x for x in d if x["kind"] != "Dataset"]
    for party in d[1:]:
        name = party["metadata"]["name"]
        party["spec"]["data"] = {"trainPath": f"{name}/train.jsonl", "evalPath": f"{name}/eval.jsonl"}
    return d


def rows(*records: dict) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in records)


GOOD = toy_jsonl(40)


def edit(fn: Callable[[list[dict]], None]) -> Callable[[list[dict]], list[dict]]:
    def apply(d: list[dict]) -> list[dict]:
        d = copy.deepcopy(d)
        fn(d)
        return d

    return apply


def _set(path: str, value) -> Callable[[list[dict]], list[dict]]:
    """Set a dotted path of document `i` (`i.a.b`)."""
    index, *keys = path.split(".")

    def fn(d: list[dict]) -> None:
        node = d[int(index)]
        for k in keys[:-1]:
            node = node[k]
        node[keys[-1]] = value

    return edit(fn)


# (id, job file text or documents edit, data files {name: bytes}, what the one line must name)
CASES = [
    ("bad-yaml", "kind: [\n", {}, ["job.yaml", "not valid YAML", "line 2"]),
    ("not-utf8-yaml", b"kind: \xff\n", {}, ["job.yaml", "not UTF-8"]),
    (
        "unknown-field",
        _set("0.spec.roundz", 3),
        {},
        ["job.yaml, document 1 (FederatedJob tiny)", "spec.roundz", "unknown field"],
    ),
    (
        "missing-data-file",
        _set("3.spec.source", "file://nope.jsonl"),
        {},
        ["Dataset toy", "spec.source", "nope.jsonl does not exist"],
    ),
    (
        "data-is-a-directory",
        _set("3.spec.source", "file://folder"),
        {"folder/x.jsonl": GOOD},
        ["Dataset toy", "spec.source", "folder is a directory"],
    ),
    (
        "malformed-line",
        None,
        {"data.jsonl": GOOD[:200] + b'\n{"text": "oops"\n'},
        ["Dataset toy", "spec.source", "data.jsonl line", "invalid JSON"],
    ),
    (
        "not-utf8-line",
        None,
        {"data.jsonl": GOOD + b'{"text": "\xff", "label": "negative"}\n'},
        ["data.jsonl line 41", "not UTF-8"],
    ),
    ("empty-file", None, {"data.jsonl": b""}, ["Dataset toy", "spec.source", "data.jsonl: no examples (empty file)"]),
    (
        "missing-text",
        None,
        {"data.jsonl": GOOD + rows({"label": "negative"})},
        ["data.jsonl line 41", "missing field 'text'", "spec.data.textField"],
    ),
    (
        "missing-label",
        _set("3.spec.labels", []),
        {"data.jsonl": GOOD + rows({"text": "no label"})},
        ["data.jsonl line 41", "missing field 'label'", "spec.data.labelField"],
    ),
    (
        "no-label-field",
        None,
        {"data.jsonl": rows({"text": "a", "class": "positive"})},
        ["Dataset toy", "no record has the field 'label'", "spec.labelField"],
    ),
    (
        "unknown-label",
        _set("3.spec.labels", []),
        {"data.jsonl": GOOD + rows({"text": "so so", "label": "neutral"})},
        ["Dataset toy", "label(s) neutral (first at line 41)", "spec.data.labels (negative, positive) does not list"],
    ),
    (
        "dataset-label-absent",
        _set("3.spec.labels", ["negative", "neutral"]),
        {},
        ["Dataset toy", "label(s) neutral of the Dataset's spec.labels not found", "it has: negative, positive"],
    ),
    (
        "too-few-records",
        _set("3.spec.labels", []),
        {"data.jsonl": rows({"text": "great", "label": "positive"})},
        ["Dataset toy", "1 record(s) to deal", "2 parties"],
    ),
    (
        "bad-model-path",
        _set("0.spec.model.source", "file:///nonexistent/model"),
        {},
        ["FederatedJob tiny", "spec.model.source", "/nonexistent/model does not exist"],
    ),
    (
        "bad-model-scheme",
        _set("0.spec.model.source", "ftp://x/model"),
        {},
        ["FederatedJob tiny", "spec.model.source", "unsupported scheme"],
    ),
    (
        "own-file-missing",
        own_files,
        {"alice/train.jsonl": GOOD, "alice/eval.jsonl": GOOD, "bob/train.jsonl": GOOD},
        ["Party default/bob", "spec.data.evalPath", "bob/eval.jsonl: no such file"],
    ),
    (
        "own-file-malformed",
        own_files,
        {
            "alice/train.jsonl": b'{"text": "a", "label": "negative"}\n{oops}\n',
            "alice/eval.jsonl": GOOD,
            "bob/train.jsonl": GOOD,
            "bob/eval.jsonl": GOOD,
        },
        ["Party default/alice", "spec.data.trainPath", "alice/train.jsonl line 2", "invalid JSON"],
    ),
    (
        "own-file-unknown-label",
        own_files,
        {
            "alice/train.jsonl": GOOD,
            "alice/eval.jsonl": GOOD,
            "bob/train.jsonl": GOOD,
            "bob/eval.jsonl": rows({"text": "meh", "label": "neutral"}),
        },
        ["Party default/bob", "spec.data.evalPath", "bob/eval.jsonl line 1", "unknown label 'neutral'"],
    ),
]


def _write_case(tmp_path: Path, job, files: dict[str, bytes]) -> Path:
    files = {"data.jsonl": GOOD, **files}
    for name, body in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(body)
    path = tmp_path / "job.yaml"
    if isinstance(job, (str, bytes)):
        path.write_bytes(job.encode() if isinstance(job, str) else job)
    else:
        path.write_text(yaml.safe_dump_all((job or (lambda d: d))(documents())))
    return path


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fedtune.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=120
    )


def _assert_one_line_error(result: subprocess.CompletedProcess, expected: list[str]) -> None:
    err = result.stderr
    assert result.returncode == 2, (result.returncode, err, result.stdout)
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for text in expected:
        assert text in lines[0], (text, lines[0])


@pytest.mark.parametrize(("job", "files", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_validate_and_run_refuse_with_one_line(tmp_path, job, files, expected):
    _write_case(tmp_path, job, files)
    _assert_one_line_error(_cli("validate", "job.yaml", cwd=tmp_path), expected)
    # `fedtune run` finds the same before it starts anything: its work directory is not even created.
    _assert_one_line_error(_cli("run", "job.yaml", "--workdir", "w", cwd=tmp_path), expected)
    assert not (tmp_path / "w").exists()


def test_the_good_file_of_the_corpus_is_valid(tmp_path):
    """The corpus's base file passes, so each case above fails for its own fault."""
    _write_case(tmp_path, None, {})
    result = _cli("validate", "job.yaml", cwd=tmp_path)
    assert result.returncode == 0 and "valid" in result.stdout, result.stderr
    own = tmp_path / "own"
    own.mkdir()
    _write_case(own, own_files, {f"{p}/{s}.jsonl": GOOD for p in ("alice", "bob") for s in ("train", "eval")})
    result = _cli("validate", "job.yaml", cwd=own)
    assert result.returncode == 0 and "valid" in result.stdout, result.stderr


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["validate", "missing.yaml"], ["cannot read missing.yaml"]),
        (["run", "missing.yaml"], ["cannot read missing.yaml"]),
        (["run", "job.yaml", "--workdir", "job.yaml"], ["--workdir job.yaml is a file"]),
        (["status", "nowhere"], ["nowhere: cannot read status.json"]),
        (["data", "partition", "job.yaml", "--credentials", "missing.json"], ["--credentials missing.json"]),
    ],
    ids=["validate-no-file", "run-no-file", "workdir-is-a-file", "status-no-run", "partition-no-credentials"],
)
def test_command_line_mistakes_are_one_line(tmp_path, args, expected):
    _write_case(tmp_path, None, {})
    _assert_one_line_error(_cli(*args, cwd=tmp_path), expected)


def test_a_bad_option_value_is_argparse_usage_not_a_traceback(tmp_path):
    result = _cli("run", "job.yaml", "--threads", "0", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "--threads: '0' is not a positive whole number" in result.stderr
