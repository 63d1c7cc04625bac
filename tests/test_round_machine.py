"""The pure round state machine, driven by a simulator that plays parties and aggregator."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
from fedtune.api import FederatedJob
from fedtune.api.protocol import AggregatorReceipt, Timings, TrainerReceipt
from fedtune.api.status import FederatedJobStatus, Metrics
from fedtune.rounds.intents import aggregator_intent, trainer_intents
from fedtune.rounds.machine import Observation, advance, new_status

T0 = datetime(2026, 1, 1, tzinfo=UTC)
FP = "fp-base"


def make_job(n=3, rounds=2, min_parties=2, retries=1, max_failures=3, timeout=60, evaluator=None) -> FederatedJob:
    spec = {
        "model": {"source": "/m", "task": "sequence-classification"},
        "data": {"labels": ["neg", "pos"]},
        "rounds": rounds,
        "minParties": min_parties,
        "maxRoundRetries": retries,
        "maxPartyFailures": max_failures,
        "roundTimeoutSeconds": timeout,
        "parties": [{"name": n} for n in "abcdefgh"[:n]],
    }
    if evaluator:
        spec["evaluator"] = {"name": evaluator}
    return FederatedJob.model_validate({"metadata": {"name": "j", "uid": "uid-1", "generation": 1}, "spec": spec})


class Sim:
    """Plays the pods: answers the tickets the status asks for, unless told otherwise."""

    def __init__(self, job, silent=(), fail=(), reject=(), fingerprint=None, roundtrip=False):
        self.job, self.now = job, T0
        self.silent, self.fail, self.reject = set(silent), set(fail), set(reject)
        self.fingerprint = fingerprint or {}
        self.roundtrip = roundtrip
        self.st = new_status(job, self.now)
        self.events = []
        self.receipts: dict[str, TrainerReceipt] = {}
        self.agg: AggregatorReceipt | None = None
        self.aggregated: list[list[str]] = []

    def answer(self):
        for name, it in trainer_intents(self.job, self.st).items():
            short = name.split("/")[1]
            if it.kind == "exit" or short in self.silent:
                continue
            r = self.receipts.get(name)
            if r and (r.kind, r.round, r.attempt) == (it.kind, it.round, it.attempt):
                continue
            ok = short not in self.fail
            acc = 0.5 + 0.1 * it.round
            self.receipts[name] = TrainerReceipt(
                kind=it.kind,
                job="uid-1",
                party=name,
                round=it.round,
                attempt=it.attempt,
                ok=ok,
                error=None if ok else "boom",
                num_samples=10 * (1 + "abcdefgh".index(short)),
                num_eval_samples=10,
                sha256=f"sha-{short}-{it.round}" if it.kind in ("train", "init") else None,
                update_bytes=90 if it.kind in ("train", "init") else None,
                base_model_fingerprint=self.fingerprint.get(short, FP),
                metrics=Metrics(train_loss=1.0 / (it.round + 1), eval_accuracy=acc, eval_loss=1 - acc),
                bytes_up=100,
                bytes_down=50,
                timings=Timings(train_seconds=2.0),
            )
        ai = aggregator_intent(self.job, self.st)
        if (
            ai
            and ai.kind == "aggregate"
            and not (self.agg and (self.agg.round, self.agg.attempt) == (ai.round, ai.attempt))
        ):
            parties = [p for p, _, _ in ai.updates]
            rejected = {p: "NaN in lora_A" for p in parties if p.split("/")[1] in self.reject}
            accepted = [p for p in parties if p not in rejected]
            ok = len(accepted) >= self.job.spec.min_parties
            self.agg = AggregatorReceipt(
                job="uid-1",
                round=ai.round,
                attempt=ai.attempt,
                ok=ok,
                error=None if ok else "quorum",
                accepted=accepted if ok else [],
                rejected=rejected,
                sha256=f"g-{ai.round}",
                bytes_up=7,
            )
            if ok:
                self.aggregated.append(accepted)

    def step(self, dt=1.0):
        self.now += timedelta(seconds=dt)
        self.answer()
        st = self.st
        if self.roundtrip:  # a controller restart between steps: only the persisted status survives
            st = FederatedJobStatus.model_validate_json(st.model_dump_json(by_alias=True))
        obs = Observation(now=self.now, receipts=dict(self.receipts), aggregator=self.agg)
        self.st, ev = advance(self.job, st, obs)
        self.events += ev
        if self.st.stage in ("evaluating", "done") and self.st.final_adapter is None and self.st.phase != "Failed":
            self.st.final_adapter = "s3://hub/final/"  # what the controller's finalize step does

    def run(self, max_steps=200, dt=1.0):
        for _ in range(max_steps):
            if self.st.phase in ("Succeeded", "Failed"):
                return self.st
            self.step(dt)
        raise AssertionError(f"did not finish: {self.st.stage} r{self.st.current_round}")


def reasons(sim):
    return [e.reason for e in sim.events]


@pytest.mark.parametrize("roundtrip", [False, True])
def test_happy_path_records_every_round(roundtrip):
    sim = Sim(make_job(rounds=3), roundtrip=roundtrip)
    st = sim.run()
    assert st.phase == "Succeeded" and st.condition("Ready").status == "True"
    assert [h.round for h in st.history] == [0, 1, 2, 3]
    # round r's accuracy is measured by the parties on global r (at the start of round r+1 / final eval)
    assert [round(h.metrics.eval_accuracy, 3) for h in st.history] == [0.6, 0.7, 0.8, 0.8]
    assert st.history[1].participants == ["default/a", "default/b", "default/c"]
    # train loss is sample-weighted: all parties report 1/(r+1)
    assert st.history[2].metrics.train_loss == pytest.approx(1 / 3)
    assert st.history[1].bytes_up == 3 * 100 + 7
    assert reasons(sim).count("RoundCompleted") == 3 and st.last_metric == "acc=0.800"
    assert all(i.kind == "exit" for i in trainer_intents(sim.job, st).values())


def test_straggler_is_left_out_then_rejoins_next_round():
    sim = Sim(make_job(rounds=2, timeout=10), silent={"c"})
    for _ in range(100):
        sim.step()
        if sim.st.current_round == 2:
            break
    assert sim.aggregated == [["default/a", "default/b"]]
    assert sim.st.party("default/c").state == "Training"  # it got the round-2 ticket
    sim.silent.clear()
    assert sim.run().phase == "Succeeded"
    assert sim.aggregated[1] == ["default/a", "default/b", "default/c"]


def test_deadline_aggregates_without_straggler():
    sim = Sim(make_job(rounds=1, timeout=10), silent={"c"})
    st = sim.run()
    assert st.phase == "Succeeded"
    assert sim.aggregated == [["default/a", "default/b"]]
    assert st.history[1].stragglers == ["default/c"]
    assert "PartyFailed" in reasons(sim)


def test_quorum_lost_after_bounded_retries():
    sim = Sim(make_job(n=3, min_parties=3, retries=1, timeout=5), silent={"c"})
    st = sim.run()
    assert st.phase == "Failed"
    assert st.condition("QuorumLost").status == "True" and st.condition("Stalled").status == "True"
    assert "maxRoundRetries=1" in st.message
    assert reasons(sim).count("RoundRetry") == 1
    assert all(i.kind == "exit" for i in trainer_intents(sim.job, st).values())


def test_rejected_update_round_continues_when_quorum_holds():
    sim = Sim(make_job(rounds=1), reject={"b"})
    st = sim.run()
    assert st.phase == "Succeeded"
    assert st.history[1].rejected == {"default/b": "NaN in lora_A"}
    assert st.history[1].participants == ["default/a", "default/c"]
    assert "UpdateRejected" in reasons(sim)
    assert st.party("default/b").failures == 1


def test_rejections_below_quorum_retry_the_round():
    sim = Sim(make_job(n=2, rounds=1, min_parties=2, retries=1), reject={"b"})
    st = sim.run()
    assert st.phase == "Failed" and "aggregation failed" in st.message


def test_failing_party_is_dropped_and_job_degrades():
    sim = Sim(make_job(n=3, rounds=4, max_failures=2), fail={"c"})
    st = sim.run()
    assert st.phase == "Succeeded"
    assert st.party("default/c").state == "Dropped"
    assert st.condition("Degraded").status == "True"
    assert trainer_intents(sim.job, st)["default/c"].kind == "exit"


def test_base_model_mismatch_is_caught_at_init():
    sim = Sim(make_job(rounds=1), fingerprint={"b": "other"})
    st = sim.run()
    assert st.phase == "Succeeded"
    assert "fingerprint" in st.party("default/b").message
    assert "default/b" not in sim.aggregated[0]


def test_init_lead_failure_rotates_the_initialiser():
    job = make_job(rounds=1)
    sim = Sim(job, fail={"a"})
    sim.step()
    assert sim.st.attempt == 1
    lead = [i for i in trainer_intents(job, sim.st).values() if i.upload_global0]
    assert [i.party for i in lead] == ["default/b"]
    assert sim.run().phase == "Succeeded"


def test_stale_receipts_do_not_count():
    job = make_job(rounds=1)
    st = new_status(job, T0)
    old = TrainerReceipt(
        kind="init", job="uid-1", party="default/a", round=0, attempt=5, ok=True, sha256="x", base_model_fingerprint=FP
    )
    other_job = old.model_copy(update={"attempt": 0, "job": "uid-OTHER"})
    for r in (old, other_job):
        st2, _ = advance(job, st, Observation(now=T0, receipts={"default/a": r}))
        assert st2.party("default/a").state == "Pending"


def test_advance_does_not_mutate_its_input():
    job = make_job()
    st = new_status(job, T0)
    before = st.model_dump_json()
    advance(job, st, Observation(now=T0 + timedelta(hours=1)))
    assert st.model_dump_json() == before


def test_silent_initialiser_is_replaced_after_the_deadline():
    job = make_job(rounds=1, timeout=10)
    sim = Sim(job, silent={"a"})  # a is the first initialiser and never answers
    st = sim.run()
    assert st.phase == "Succeeded"
    assert "RoundRetry" in reasons(sim) and st.history[0].participants == ["default/b"]


def test_an_aggregator_answer_about_updates_it_was_not_sent_retries_the_round():
    # The aggregator's pod writes its receipt: names it was not sent must not reach st.party (KeyError).
    sim = Sim(make_job(rounds=1, retries=1))
    while sim.st.stage != "aggregating":
        sim.step()
    bogus = AggregatorReceipt(
        job="uid-1", round=1, attempt=0, ok=True, accepted=["default/a", "nobody"], rejected={"x/ghost": "?"}
    )
    st, events = advance(sim.job, sim.st, Observation(now=sim.now, receipts=dict(sim.receipts), aggregator=bogus))
    assert st.stage == "training" and st.attempt == 1 and st.history[-1].round == 0
    assert events[-1].reason == "RoundRetry"
    assert "the aggregator answered about updates it was not sent: nobody, x/ghost" in events[-1].message
    sim.st = st  # the job goes on: the retry's answers are taken
    assert sim.run().phase == "Succeeded" and sim.st.history[-1].attempt == 1


def test_metrics_whose_mean_overflows_are_left_out_not_infinite():
    # Each value is a finite float a receipt may carry; weighted by samples they overflow to inf, which
    # no JSON (a Kubernetes status patch) can hold.
    sim = Sim(make_job(rounds=1))
    answer = sim.answer

    def huge_metrics():
        answer()
        for name, r in sim.receipts.items():
            sim.receipts[name] = r.model_copy(update={"metrics": Metrics(train_loss=1e308, eval_accuracy=1e308)})

    sim.answer = huge_metrics
    st = sim.run()
    assert st.phase == "Succeeded"
    assert st.history[1].metrics.train_loss is None and st.history[1].metrics.eval_accuracy is None
    json.dumps(st.to_wire(), allow_nan=False)  # what the operator patches
