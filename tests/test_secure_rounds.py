"""Secure aggregation in the pure round machine: the keys, shares, train and unmask exchanges, dropouts, t.

The pods are simulated (tests/test_round_machine.py's Sim); the cryptography is tests/test_secagg.py's,
and tests/test_secure_aggregation_e2e.py runs both together in a real local job.
"""

from __future__ import annotations

import base64
from datetime import timedelta

import pytest
from fedtune.api import FederatedJob
from fedtune.api.protocol import TrainerReceipt
from fedtune.api.receipts import TicketRef
from fedtune.api.secagg import MAX_PARTIES
from fedtune.api.status import FederatedJobStatus
from fedtune.rounds import conditions as cond
from fedtune.rounds.intents import aggregator_intent, trainer_intents
from fedtune.rounds.machine import resumed
from fedtune_trainer.secagg.shares import MAX_PARTIES as SHARES_MAX_PARTIES
from pydantic import ValidationError
from test_round_machine import Sim, make_job, reasons

KEY = base64.b64encode(bytes(32)).decode()


def secure_job(n=4, threshold=3, min_parties=2, retries=1, rounds=2) -> FederatedJob:
    job = make_job(n=n, rounds=rounds, min_parties=min_parties, retries=retries)
    doc = job.model_dump(by_alias=True, exclude_none=True)
    doc["spec"]["privacy"] = {"secureAggregation": {"threshold": threshold}}
    return FederatedJob.model_validate(doc)


class SecureSim(Sim):
    """Answers the secure exchanges too; `gone[party] = phase` makes a party silent from that phase of round 1,
    `broken[party] = phase` makes it fail that exchange, `nameless[party] = phase` answer it ok naming no object."""

    def __init__(self, job, gone=None, broken=None, nameless=None, **kw):
        super().__init__(job, **kw)
        self.gone, self.broken, self.nameless = gone or {}, broken or {}, nameless or {}
        self.kinds: dict[str, list[str]] = {}

    def answer(self):
        for name, it in trainer_intents(self.job, self.st).items():
            short = name.split("/")[1]
            seen = self.kinds.setdefault(short, [])
            if not seen or seen[-1] != f"{it.kind}-r{it.round}-a{it.attempt}":
                seen.append(f"{it.kind}-r{it.round}-a{it.attempt}")
            phases = ("keys", "shares", "train", "unmask")
            if short in self.gone:
                away = it.round == 1 and it.kind in phases and phases.index(it.kind) >= phases.index(self.gone[short])
                (self.silent.add if away else self.silent.discard)(short)
                if away:
                    continue
            if it.kind in ("keys", "shares", "unmask"):
                r = self.receipts.get(name)
                if r and (r.kind, r.round, r.attempt) == (it.kind, it.round, it.attempt):
                    continue
                ok = not (it.round == 1 and self.broken.get(short) == it.kind)
                named = it.kind != "keys" and not (it.round == 1 and self.nameless.get(short) == it.kind)
                self.receipts[name] = TrainerReceipt(
                    kind=it.kind,
                    job="uid-1",
                    party=name,
                    round=it.round,
                    attempt=it.attempt,
                    ok=ok,
                    error=None if ok else "this trainer holds no secure-aggregation keys",
                    public_keys={"c": KEY, "s": KEY} if it.kind == "keys" else None,
                    sha256=f"{it.kind}-{short}-{it.round}-{it.attempt}" if named else None,
                    bytes_up=10,
                )
        super().answer()


def test_a_round_goes_keys_shares_train_unmask_then_aggregates_every_update():
    sim = SecureSim(secure_job())
    st = sim.run()
    assert st.phase == "Succeeded" and sim.aggregated == [["default/a", "default/b", "default/c", "default/d"]] * 2
    assert sim.kinds["a"][:5] == ["init-r0-a0", "keys-r1-a0", "shares-r1-a0", "train-r1-a0", "unmask-r1-a0"]
    assert st.secure_aggregation.survivors == ["default/a", "default/b", "default/c", "default/d"]
    assert set(st.secure_aggregation.reveals) == set(st.secure_aggregation.survivors)
    # The keys, shares and unmask receipts' bytes count in the round's traffic (100 train + 3 x 10, 4 parties).
    assert st.history[1].bytes_up == 4 * (100 + 30) + 7


def test_a_party_that_drops_after_uploading_still_counts():
    sim = SecureSim(secure_job(), gone={"d": "unmask"})
    st = sim.run()
    assert st.phase == "Succeeded"
    assert sim.aggregated[0] == ["default/a", "default/b", "default/c", "default/d"]
    assert "default/d" in st.history[1].participants


def test_a_survivor_that_cannot_reveal_after_a_restart_still_counts_and_is_not_blamed():
    sim = SecureSim(secure_job(), broken={"d": "unmask"})
    st = sim.run()
    assert st.phase == "Succeeded" and sim.aggregated[0] == ["default/a", "default/b", "default/c", "default/d"]
    assert "NoReveal" in reasons(sim) and "PartyFailed" not in reasons(sim)
    assert st.party("default/d").failures == 0 and st.history[1].attempt == 0


def test_an_ok_unmask_receipt_naming_no_reveal_is_no_reveal_not_a_failure():
    sim = SecureSim(secure_job(), nameless={"d": "unmask"})
    st = sim.run()
    assert st.phase == "Succeeded" and sim.aggregated[0] == ["default/a", "default/b", "default/c", "default/d"]
    assert "NoReveal" in reasons(sim) and "PartyFailed" not in reasons(sim)
    assert st.party("default/d").failures == 0 and st.history[1].attempt == 0
    assert any("the unmask receipt names no object (sha256)" in e.message for e in sim.events)


def test_a_masked_update_the_aggregator_rejects_fails_the_attempt_counted_against_that_party():
    """secure_mean names a malformed masked update in `rejected` and fails (the sum needs it): the party is
    blamed, the round is retried with fresh keys and the others are not blamed."""
    sim = SecureSim(secure_job(retries=1), reject={"d"})
    plain = sim.answer

    def answer():
        plain()
        a = sim.agg
        if a is not None and a.rejected and a.ok:  # what the secure aggregator answers instead
            sim.agg = a.model_copy(update={"ok": False, "accepted": [], "error": "cannot unmask without d"})
            sim.aggregated.pop()
            sim.reject.clear()

    sim.answer = answer
    st = sim.run()
    assert st.phase == "Succeeded" and st.history[1].attempt == 1
    assert [e.message.split(":")[0] for e in sim.events if e.reason == "UpdateRejected"] == ["default/d"]
    assert "PartyFailed" not in reasons(sim) and "RoundRetry" in reasons(sim)
    assert sim.aggregated[0] == ["default/a", "default/b", "default/c", "default/d"]  # back in the retry


def test_a_party_that_drops_before_uploading_is_unmasked_out_of_the_sum():
    sim = SecureSim(secure_job(), gone={"d": "train"})
    seen = {}

    def watch(s):
        ai = aggregator_intent(sim.job, s)
        if ai is not None and ai.kind == "aggregate" and ai.round == 1:
            seen["updates"] = [p for p, _, _ in ai.updates]
            seen["dropped"] = list(s.secure_aggregation.dropped)
        return s.phase in ("Succeeded", "Failed")

    for _ in range(400):
        if watch(sim.st):
            break
        sim.step()
    assert sim.st.phase == "Succeeded"
    assert seen == {"updates": ["default/a", "default/b", "default/c"], "dropped": ["default/d"]}
    assert sim.aggregated[0] == ["default/a", "default/b", "default/c"]


def test_a_party_missing_the_keys_exchange_sits_the_round_out_and_keeps_its_ticket():
    sim = SecureSim(secure_job(), gone={"d": "keys"})
    st = sim.run()
    assert st.phase == "Succeeded" and sim.aggregated[0] == ["default/a", "default/b", "default/c"]
    assert "keys-r1-a0" in sim.kinds["d"] and "shares-r1-a0" not in sim.kinds["d"]
    assert sim.aggregated[1] == ["default/a", "default/b", "default/c", "default/d"]  # back in round 2


def test_fewer_than_t_survivors_fail_the_round_with_a_condition():
    sim = SecureSim(secure_job(threshold=3, retries=1), gone={"c": "train", "d": "train"})
    for _ in range(400):
        if sim.st.phase in ("Succeeded", "Failed") or sim.st.attempt == 1:
            break
        sim.step()
    c = sim.st.condition(cond.SECURE_AGGREGATION_FAILED)
    assert c is not None and c.status == "True" and c.reason == cond.BELOW_THRESHOLD
    assert "2 masked update(s) arrived, 3 needed" in c.message and "threshold t=3" in c.message
    assert sim.st.attempt == 1 and sim.st.secure_aggregation.phase == "keys"  # retried with fresh keys


def test_fewer_than_t_reveals_fail_the_round():
    sim = SecureSim(secure_job(threshold=3, retries=0), gone={"b": "unmask", "c": "unmask", "d": "unmask"})
    st = sim.run(max_steps=600)
    assert st.phase == "Failed"
    assert "1 part(y/ies) revealed their shares, 3 needed" in st.condition(cond.SECURE_AGGREGATION_FAILED).message
    assert sim.aggregated == []


def test_a_retried_attempts_keys_come_after_the_last_attempts_unmask():
    assert TicketRef("keys", 1, 1).after(TicketRef("unmask", 1, 0))
    assert not TicketRef("unmask", 1, 0).after(TicketRef("keys", 1, 1))
    assert TicketRef("unmask", 1, 0).after(TicketRef("train", 1, 0))
    assert TicketRef("eval", 1, 0).after(TicketRef("unmask", 1, 0))


def _interrupted_then_resumed(sim: SecureSim, phase: str) -> FederatedJobStatus:
    """Run round 1 to `phase`, let parties a and b answer it, stop the run, and resume it hours later.

    The resumed run's party processes are new: the old attempt's secrets are gone, so they fail any
    exchange of that attempt after keys (as secure_party.py does). Returns the status as resumed.
    """
    while not (sim.st.current_round == 1 and sim.st.secure_aggregation.phase == phase):
        sim.step()
    sim.silent |= {"c", "d"}
    sim.answer()  # a and b answered the exchange before the run stopped; c and d had not yet
    sim.silent -= {"c", "d"}
    before, old = dict(sim.receipts), sim.st.attempt
    plain = sim.answer

    def forgetful():
        plain()
        for name, r in sim.receipts.items():
            if r is not before.get(name) and (r.round, r.attempt) == (1, old) and r.kind != "keys":
                err = "this trainer holds no secure-aggregation keys"
                sim.receipts[name] = r.model_copy(update={"ok": False, "error": err, "sha256": None})

    sim.answer = forgetful
    persisted = FederatedJobStatus.model_validate_json(sim.st.model_dump_json(by_alias=True))
    sim.now += timedelta(hours=5)
    sim.st = resumed(sim.job, persisted, sim.now)
    return persisted


@pytest.mark.parametrize("phase", ["train", "unmask"])
def test_a_run_resumed_mid_round_restarts_the_attempt_with_fresh_keys_counting_no_retry_and_no_failure(phase):
    """The last run's parties took the attempt's secrets with them: the resumed round starts again at keys,
    with a new attempt number, and neither the job's retry budget nor any party pays for the time away."""
    sim = SecureSim(secure_job(retries=0))  # a counted retry would fail the job
    before = _interrupted_then_resumed(sim, phase)
    st, sa = sim.st, sim.st.secure_aggregation
    assert (st.stage, st.current_round, st.attempt) == ("training", 1, before.attempt + 1)
    assert (sa.phase, sa.keys, sa.shares, sa.survivors, sa.reveals) == ("keys", {}, {}, [], {})
    assert {p.name: (p.state, p.failures) for p in st.parties} == {p.name: ("Training", 0) for p in before.parties}
    assert st.attempt - st.storage_retries - st.resume_restarts == before.attempt - before.storage_retries == 0
    assert st.round_deadline == sim.now + timedelta(seconds=sim.job.spec.round_timeout_seconds)
    assert "not counted as a retry" in st.condition(cond.READY).message
    assert {it.kind for it in trainer_intents(sim.job, st).values()} == {"keys"}  # every party, the new attempt

    st = sim.run()
    assert st.phase == "Succeeded", st.message
    assert sim.aggregated == [["default/a", "default/b", "default/c", "default/d"]] * 2
    assert st.history[1].attempt == before.attempt + 1 and st.history[2].attempt == 0
    assert {"RoundRetry", "PartyFailed", "NoReveal", "PartyDropped"}.isdisjoint(reasons(sim))
    assert all(p.failures == 0 for p in st.parties) and st.condition(cond.SECURE_AGGREGATION_FAILED) is None
    assert "keys-r1-a1" in sim.kinds["d"] and st.resume_restarts == 0  # round 2 starts with a clean count


def test_a_resumed_restart_is_not_a_retry_but_later_retries_of_the_round_still_count():
    sim = SecureSim(secure_job(retries=1), gone={"c": "shares", "d": "shares"})
    _interrupted_then_resumed(sim, "keys")
    assert (sim.st.attempt, sim.st.resume_restarts) == (1, 1)
    st = sim.run(max_steps=1000)  # c and d never deal shares again: one counted retry, then QuorumLost
    assert st.phase == "Failed" and reasons(sim).count("RoundRetry") == 1
    assert "gave up after 2 attempt(s) (spec.maxRoundRetries=1)" in st.condition(cond.QUORUM_LOST).message


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        ({"aggregator": {"loraMode": "exact"}}, "needs aggregator.loraMode: average"),
        ({"aggregator": {"robust": {"rule": "median"}}}, "cannot be combined with aggregator.robust"),
        (
            {
                "privacy": {
                    "dp": {
                        "mode": "central",
                        "clipNorm": 1,
                        "noiseMultiplier": 1,
                        "budget": {"epsilon": 50, "delta": 1e-5},
                    }
                }
            },
            "needs privacy.dp.mode: local",
        ),
        ({"training": {"updateCompression": "int8"}}, "set training.updateCompression: none"),
        (
            {"privacy": {"secureAggregation": {"threshold": 9}}},
            "threshold (9) is larger than the number of parties (4)",
        ),
    ],
)
def test_what_secure_aggregation_cannot_combine_with_is_refused_naming_the_field(extra, words):
    doc = secure_job().model_dump(by_alias=True, exclude_none=True)
    for k, v in extra.items():
        doc["spec"].setdefault(k, {}).update(v)
    with pytest.raises(ValidationError) as err:
        FederatedJob.model_validate(doc)
    assert words in str(err.value)


def test_full_fine_tuning_is_refused_naming_the_fix():
    doc = secure_job().model_dump(by_alias=True, exclude_none=True)
    doc["spec"]["peft"] = {"method": "full"}
    with pytest.raises(ValidationError) as err:
        FederatedJob.model_validate(doc)
    text = str(err.value)
    assert "privacy.secureAggregation cannot be combined with peft.method full" in text, text
    assert "a PEFT method such as lora, or drop privacy.secureAggregation" in text, text
    del doc["spec"]["privacy"]
    assert FederatedJob.model_validate(doc).spec.peft.method == "full"  # full alone is accepted


def test_more_parties_than_a_shamir_share_index_can_name_are_refused():
    assert MAX_PARTIES == SHARES_MAX_PARTIES  # the limit the trainers' Shamir shares enforce at run time
    doc = secure_job().model_dump(by_alias=True, exclude_none=True)
    doc["spec"]["parties"] = [{"name": f"p{i}"} for i in range(MAX_PARTIES)]
    assert len(FederatedJob.model_validate(doc).spec.parties) == MAX_PARTIES  # 255 is accepted
    doc["spec"]["parties"].append({"name": "one-too-many"})
    with pytest.raises(ValidationError) as err:
        FederatedJob.model_validate(doc)
    assert f"takes at most {MAX_PARTIES} parties" in str(err.value) and "this job has 256" in str(err.value)


def test_local_dp_and_server_optimisers_combine_with_it():
    doc = secure_job().model_dump(by_alias=True, exclude_none=True)
    doc["spec"]["privacy"]["dp"] = {
        "mode": "local",
        "clipNorm": 1,
        "noiseMultiplier": 1,
        "budget": {"epsilon": 50, "delta": 1e-5},
    }
    doc["spec"]["strategy"] = {"name": "fedadam"}
    assert FederatedJob.model_validate(doc).spec.problems() == []  # validating it raised nothing either
