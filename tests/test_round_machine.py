"""The pure round state machine, driven by a simulator that plays parties and aggregator."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
from fedtune.api import FederatedJob, Party
from fedtune.api.protocol import AggregatorReceipt, Timings, TrainerReceipt
from fedtune.api.status import FederatedJobStatus, Metrics
from fedtune.rounds.intents import aggregator_intent, build_trainer_ticket, trainer_intents
from fedtune.rounds.machine import Observation, advance, new_status, resumed
from fedtune.storage import layout

T0 = datetime(2026, 1, 1, tzinfo=UTC)
FP = "fp-base"
STORAGE_ERROR = "PUT failed after 5 attempts: NewConnectionError for http://s3.example:9000/a-data/update"
DOWN = "S3 endpoint http://s3.example:9000 (bucket a-data of party default/a) does not answer: connection refused"


def make_job(
    n=3, rounds=2, min_parties=2, retries=1, max_failures=3, timeout=60, evaluator=None, outage=600, **more
) -> FederatedJob:
    spec = {
        "model": {"source": "/m", "task": "sequence-classification"},
        "data": {"labels": ["neg", "pos"]},
        "rounds": rounds,
        "minParties": min_parties,
        "maxRoundRetries": retries,
        "maxPartyFailures": max_failures,
        "roundTimeoutSeconds": timeout,
        "storageOutageTimeoutSeconds": outage,
        "parties": [{"name": n} for n in "abcdefgh"[:n]],
    }
    if evaluator:
        spec["evaluator"] = {"name": evaluator}
    spec.update(more)
    return FederatedJob.model_validate({"metadata": {"name": "j", "uid": "uid-1", "generation": 1}, "spec": spec})


class Sim:
    """Plays the pods: answers the tickets the status asks for, unless told otherwise."""

    def __init__(self, job, silent=(), fail=(), reject=(), fingerprint=None, roundtrip=False, fields=None):
        self.job, self.now = job, T0
        self.fields = fields or (lambda short, intent: {})  # more receipt fields: (party, intent) -> dict
        self.silent, self.fail, self.reject = set(silent), set(fail), set(reject)
        self.fingerprint = fingerprint or {}
        self.roundtrip = roundtrip
        self.st = new_status(job, self.now)
        self.events = []
        self.receipts: dict[str, TrainerReceipt] = {}
        self.agg: AggregatorReceipt | None = None
        self.aggregated: list[list[str]] = []
        self.storage_error: str | None = None  # what the controller's storage probe says
        self.storage_fail: set[str] = set()  # parties whose transfers fail on the storage
        self.agg_storage_fail = False

    def answer(self):
        for name, it in trainer_intents(self.job, self.st).items():
            short = name.split("/")[1]
            if it.kind == "exit" or short in self.silent:
                continue
            r = self.receipts.get(name)
            if r and (r.kind, r.round, r.attempt) == (it.kind, it.round, it.attempt):
                continue
            ok = short not in self.fail and short not in self.storage_fail
            acc = 0.5 + 0.1 * it.round
            self.receipts[name] = TrainerReceipt(
                kind=it.kind,
                job="uid-1",
                party=name,
                round=it.round,
                attempt=it.attempt,
                ok=ok,
                error=None if ok else STORAGE_ERROR if short in self.storage_fail else "boom",
                fault="storage" if short in self.storage_fail else None,
                num_samples=10 * (1 + "abcdefgh".index(short)),
                num_eval_samples=10,
                sha256=f"sha-{short}-{it.round}" if it.kind in ("train", "init") else None,
                update_bytes=90 if it.kind in ("train", "init") else None,
                base_model_fingerprint=self.fingerprint.get(short, FP),
                metrics=Metrics(train_loss=1.0 / (it.round + 1), eval_accuracy=acc, eval_loss=1 - acc),
                bytes_up=100,
                bytes_down=50,
                timings=Timings(train_seconds=2.0),
                **self.fields(short, it),
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
            ok = len(accepted) >= self.job.spec.min_parties and not self.agg_storage_fail
            self.agg = AggregatorReceipt(
                job="uid-1",
                round=ai.round,
                attempt=ai.attempt,
                ok=ok,
                error=None if ok else STORAGE_ERROR if self.agg_storage_fail else "quorum",
                fault="storage" if self.agg_storage_fail else None,
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
        obs = Observation(
            now=self.now, receipts=dict(self.receipts), aggregator=self.agg, storage_error=self.storage_error
        )
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


def test_a_plain_round_resumed_mid_training_keeps_its_attempt_and_the_receipts_already_written():
    sim = Sim(make_job(rounds=2))
    while not (sim.st.current_round == 1 and sim.st.stage == "training"):
        sim.step()
    sim.answer()  # the parties uploaded round 1's updates before the run stopped
    sim.now += timedelta(hours=5)
    st = resumed(sim.job, sim.st, sim.now)
    assert (st.stage, st.current_round, st.attempt, st.resume_restarts) == ("training", 1, 0, 0)
    st, _ = advance(sim.job, st, Observation(now=sim.now, receipts=dict(sim.receipts)))
    assert st.stage == "aggregating" and all(p.state == "Submitted" for p in st.parties)


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


# --- storage outages: the storage's, not the parties' ---------------------------------------------


def _until(sim, cond, max_steps=200, dt=1.0):
    for _ in range(max_steps):
        if cond(sim.st):
            return
        sim.step(dt)
    raise AssertionError(f"not reached: {sim.st.stage} r{sim.st.current_round}")


@pytest.mark.parametrize("roundtrip", [False, True])
def test_a_storage_outage_pauses_the_round_then_it_goes_on_with_nothing_retried_or_blamed(roundtrip):
    sim = Sim(make_job(rounds=3, retries=0, max_failures=1, timeout=10), roundtrip=roundtrip)
    _until(sim, lambda st: st.stage == "training" and st.current_round == 2)
    sim.silent = {"a", "b", "c"}  # mid-round 2 the storage goes: nobody can answer
    sim.storage_error = DOWN
    deadline = sim.st.round_deadline
    for _ in range(40):  # four times the round's timeout
        sim.step()
    st = sim.st
    assert (st.phase, st.stage, st.current_round, st.attempt) == ("Running", "training", 2, 0)
    down = st.condition("StorageUnavailable")
    assert (down.status, down.reason, down.message) == ("True", "StorageUnreachable", DOWN)
    assert st.condition("Ready").reason == "StorageUnreachable" and "round 2 paused" in st.message
    assert st.storage_unavailable_since == T0 + (st.storage_unavailable_since - T0)  # kept across a restart too
    assert all(p.failures == 0 and p.state == "Training" for p in st.parties)
    assert "RoundRetry" not in reasons(sim) and reasons(sim).count("StorageUnavailable") == 1
    sim.silent = {"c"}  # answers written while it is down wait until it answers again
    sim.step()
    assert [p.state for p in sim.st.parties] == ["Training"] * 3
    sim.storage_error = None
    sim.step()
    back = sim.st.condition("StorageUnavailable")
    assert (back.status, back.reason) == ("False", "StorageAnswers")
    assert [p.state for p in sim.st.parties] == ["Submitted", "Submitted", "Training"]
    assert sim.st.round_deadline == deadline + timedelta(seconds=41)  # the step got the outage's time back
    sim.silent.clear()
    st = sim.run()
    assert st.phase == "Succeeded" and st.condition("Ready").status == "True"
    assert [(h.round, h.attempt) for h in st.history] == [(0, 0), (1, 0), (2, 0), (3, 0)]
    assert all(p.state != "Dropped" and p.failures == 0 for p in st.parties)
    assert "StorageAvailable" in reasons(sim) and "RoundRetry" not in reasons(sim)


def test_a_storage_outage_longer_than_the_bound_fails_the_job_naming_the_storage():
    sim = Sim(make_job(rounds=3, timeout=10, outage=30))
    _until(sim, lambda st: st.current_round == 2)
    sim.storage_error = DOWN
    st = sim.run()
    assert st.phase == "Failed" and st.stage == "done"
    assert DOWN in st.message and "longer than spec.storageOutageTimeoutSeconds (30s)" in st.message
    assert (
        st.condition("StorageUnavailable").status == "True" and st.condition("Stalled").reason == "StorageUnavailable"
    )
    assert st.condition("QuorumLost") is None and all(p.state != "Dropped" for p in st.parties)
    assert [h.round for h in st.history] == [0, 1]  # what was done is kept
    assert all(i.kind == "exit" for i in trainer_intents(sim.job, st).values())


def test_a_storage_failure_pods_report_reruns_the_round_without_counting_it_or_blaming_them():
    # maxRoundRetries 0 and maxPartyFailures 1: one counted failure would drop a party or fail the job
    sim = Sim(make_job(rounds=2, retries=0, max_failures=1, min_parties=3))
    _until(sim, lambda st: st.current_round == 1 and st.stage == "training")
    sim.storage_fail = {"a", "b"}
    sim.step()
    assert sim.st.attempt == 1 and "not counted: the storage failed" in sim.events[-1].message
    assert "the storage failed for default/a, default/b" in sim.events[-1].message
    sim.storage_fail.clear()
    sim.agg_storage_fail = True  # then the aggregator cannot reach it
    _until(sim, lambda st: st.attempt == 2)
    sim.agg_storage_fail = False
    st = sim.run()
    assert st.phase == "Succeeded"
    assert [(h.round, h.attempt) for h in st.history[1:]] == [(1, 2), (2, 0)]
    assert all(p.failures == 0 and p.state != "Dropped" for p in st.parties)
    assert reasons(sim).count("StorageFailed") == 2 and "PartyFailed" not in reasons(sim)


def test_pods_that_keep_blaming_the_storage_fail_the_job_after_the_bound():
    sim = Sim(make_job(rounds=2, retries=0, max_failures=1, outage=20))
    _until(sim, lambda st: st.current_round == 1)
    sim.storage_fail = {"a", "b", "c"}
    st = sim.run()
    assert st.phase == "Failed" and st.condition("Stalled").reason == "StorageUnavailable"
    assert "the storage kept failing for" in st.message and "spec.storageOutageTimeoutSeconds (20s)" in st.message
    assert "http://s3.example:9000/a-data/update" in st.message  # the pods' words name the endpoint
    assert all(p.state != "Dropped" for p in st.parties)


def test_a_partys_sample_epsilon_never_goes_down_when_its_accountant_restarts():
    """privacy.dpSgd: a restarted trainer's Opacus accountant counts from zero, so its receipts report less ε than
    the status already holds; the status keeps the largest ε each party reported (the spend never shrinks)."""
    reported = {1: 2.0, 2: 0.5, 3: 1.5}  # party a's pod restarts after round 1: its new accountant starts over

    def eps(short, it):
        return {"sample_epsilon": reported[it.round] if short == "a" else 0.1 * it.round} if it.kind == "train" else {}

    sim = Sim(make_job(rounds=3), fields=eps)
    seen = []
    for _ in range(200):
        if sim.st.phase in ("Succeeded", "Failed"):
            break
        sim.step()
        seen.append(sim.st.party("default/a").sample_epsilon)
    assert sim.st.phase == "Succeeded", reasons(sim)
    a = [e for e in seen if e is not None]
    assert a == sorted(a) and a[-1] == 2.0, a
    assert [h.sample_epsilon for h in sim.st.history if h.round > 0] == [2.0, 2.0, 2.0]
    assert sim.st.party("default/b").sample_epsilon == pytest.approx(0.3)


class UrlSigner:
    def presign_get(self, owner, key, expires_s):
        return f"get:{owner}:{key}"

    def presign_put(self, owner, key, expires_s):
        return f"put:{owner}:{key}"


@pytest.mark.parametrize("roundtrip", [False, True])
def test_a_personal_part_is_committed_only_when_its_round_is_aggregated(roundtrip):
    """Personalization: a party's personal part of an attempt whose round is retried (no quorum) was trained beside
    a shared update that was thrown away; the retry starts from the personal part of the last aggregated round."""
    job = make_job(n=3, rounds=2, timeout=5, personalization={"mode": "head"})

    def own(short, it):  # each train attempt writes its own personal part (its own key, its own digest)
        return {"personal_sha256": f"own-{short}-r{it.round}-a{it.attempt}"} if it.kind == "train" else {}

    sim = Sim(job, fields=own, roundtrip=roundtrip)
    a = lambda: sim.st.party("default/a")  # noqa: E731
    round1 = (layout.personal_key("uid-1", 1, 0), "own-a-r1-a0")
    _until(sim, lambda st: st.current_round == 2)
    assert (a().personal_object, a().personal_sha256) == round1
    sim.silent = {"b", "c"}  # round 2, attempt 0: only a trains, so the round is retried for want of a quorum
    _until(sim, lambda st: st.party("default/a").state == "Submitted")
    assert (a().personal_object, a().personal_sha256) == round1
    _until(sim, lambda st: st.attempt == 1)
    assert "RoundRetry" in reasons(sim) and (a().personal_object, a().personal_sha256) == round1
    doc = Party.model_validate({"metadata": {"name": "a"}, "spec": {"storage": {"bucket": "a-data"}}})
    ticket = build_trainer_ticket(job, trainer_intents(job, sim.st)["default/a"], doc, sim.st, UrlSigner(), sim.now)
    assert (ticket.personal_in.url, ticket.personal_in.sha256) == (f"get:default/a:{round1[0]}", round1[1])
    assert ticket.personal_out == f"put:default/a:{layout.personal_key('uid-1', 2, 1)}"
    sim.silent = set()
    _until(sim, lambda st: st.stage == "evaluating")  # round 2 aggregated at attempt 1: its parts are committed
    assert sim.st.history[-1].attempt == 1
    for short in "abc":
        p = sim.st.party(f"default/{short}")
        assert (p.personal_object, p.personal_sha256) == (layout.personal_key("uid-1", 2, 1), f"own-{short}-r2-a1")
