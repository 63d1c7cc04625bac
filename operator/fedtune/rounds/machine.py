"""The round state machine (DESIGN §3). Pure: no I/O, no clock; `now` comes in with the observation.

`advance(job, status, observation)` reads the receipts found in the mailboxes and returns the
next status plus events. What each mailbox should hold is derived from the status alone
(see `fedtune.rounds.intents`), so a restarted controller rebuilds everything from the
persisted status and the mailboxes, and never loses or repeats a round.

Stages of a job: init (every party loads the model; one uploads global 0) -> training of
round r (parties evaluate global r-1, train, upload) -> aggregating r -> … -> evaluating
(parties evaluate the last global) -> done.

A job may name an evaluator (spec.evaluator): a party that holds a held-out test set and never
trains. It evaluates global r-1 while the parties train round r, and the last global with them at
the end. It never counts towards quorum; the stage waits for its answer until the deadline, and
an evaluator that keeps failing is dropped without failing the job (condition Degraded).

With differential privacy (spec.privacy.dp) every aggregated round records the ε spent so far, and the
job ends early, Succeeded with the global adapter of the last round its budget allowed and the condition
PrivacyBudgetExhausted, instead of starting a round that would spend more than the budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from fedtune.api import privacy
from fedtune.api.job import FederatedJob, FederatedJobSpec
from fedtune.api.protocol import AggregatorReceipt, TrainerReceipt
from fedtune.api.status import MAX_HISTORY, FederatedJobStatus, Metrics, PartyState, RoundRecord
from fedtune.rounds import conditions as cond
from fedtune.rounds import outage, secure_rounds
from fedtune.rounds.events import Event
from fedtune.storage import layout

__all__ = ["Event", "Observation", "active", "advance", "members", "new_status", "resumed"]

WAITING = ("Pending", "Training")
STORAGE_FAILED = "StorageFailed"  # a party whose ticket failed on the storage: not its fault, not counted


@dataclass
class Observation:
    """What the controller saw: the latest receipt in each mailbox, the time, and whether the storage answers.

    `storage_error` says which storage does not answer and why (naming its endpoint); None when every
    object store of the job answers.
    """

    now: datetime
    receipts: dict[str, TrainerReceipt] = field(default_factory=dict)
    aggregator: AggregatorReceipt | None = None
    storage_error: str | None = None


def new_status(job: FederatedJob, now: datetime) -> FederatedJobStatus:
    """The status of a job that starts now: every party asked to load its model."""
    st = FederatedJobStatus(
        observed_generation=job.metadata.generation,
        phase="Running",
        stage="init",
        parties=[PartyState(name=k) for k in job.party_keys]
        + ([PartyState(name=job.evaluator_key, role="evaluator")] if job.evaluator_key else []),
    )
    st.round_started_at = now
    st.round_deadline = now + timedelta(seconds=job.spec.round_timeout_seconds)
    st.privacy = _privacy_status(job.spec, 0)
    cond.mark_running(st, "loading the base model on every party", now)
    return st


def last_round(spec: FederatedJobSpec) -> int:
    """The round the job ends with: spec.rounds, or fewer where the privacy budget allows fewer."""
    dp = spec.privacy.dp
    return spec.rounds if dp is None else privacy.rounds_allowed(dp, spec.rounds)


def _privacy_status(spec: FederatedJobSpec, rounds_done: int) -> privacy.PrivacyStatus | None:
    dp = spec.privacy.dp
    if dp is None:
        return None
    return privacy.PrivacyStatus(
        mode=dp.mode,
        epsilon=privacy.spent(dp, rounds_done),
        delta=dp.budget.delta,
        budget_epsilon=dp.budget.epsilon,
        rounds_allowed=last_round(spec),
    )


def resumed(job: FederatedJob, status: FederatedJobStatus, now: datetime) -> FederatedJobStatus:
    """The status of a job picked up again after its controller was away (local mode's resume).

    Completed rounds stay completed; the current stage goes on where it was, with a fresh deadline:
    the time the controller was away is nobody's fault. Receipts already in the mailboxes still count,
    except in a training round under secure aggregation: its secrets lived in the last run's party
    processes, so its attempt starts again from the keys exchange with fresh keys (a new attempt
    number, as keys and object keys are bound to it), neither a retry counted against
    spec.maxRoundRetries nor a failure counted against any party.
    """
    st = status.model_copy(deep=True)
    if st.phase in ("Succeeded", "Failed"):
        return st
    st.phase, st.message = "Running", ""  # a Stopped run runs again
    st.round_deadline = now + timedelta(seconds=job.spec.round_timeout_seconds)
    outage.cleared_for_resume(st, now)
    if st.stage == "training" and st.secure_aggregation is not None:
        st.attempt += 1
        st.resume_restarts += 1  # not a retry: `_retry` leaves it out of the count
        _reset_round(job.spec, st, now)
        again = f", attempt {st.attempt} from secure aggregation's keys exchange (not counted as a retry)"
    else:
        again = ""
    cond.mark_running(st, f"resumed: {st.stage}, round {st.current_round}/{job.spec.rounds}{again}", now)
    return st


def active(status: FederatedJobStatus) -> list[PartyState]:
    """Training parties still taking part (not dropped)."""
    return [p for p in status.parties if p.state != "Dropped" and p.role == "trainer"]


def members(status: FederatedJobStatus) -> list[PartyState]:
    """Every party still taking part, the evaluator included: each needs its pod."""
    return [p for p in status.parties if p.state != "Dropped"]


def evaluator_task(status: FederatedJobStatus) -> tuple[str, int] | None:
    """(ticket kind, round) the evaluator works on now: global r-1 while round r trains, the last at the end.

    While the parties initialise it loads its model too (nobody waits for that: its eval tickets would load it).
    """
    if status.stage == "init":
        return "init", 0
    if status.stage in ("training", "aggregating"):
        return "eval", status.current_round - 1
    if status.stage == "evaluating":
        return "eval", status.current_round
    return None


def designated_initialiser(status: FederatedJobStatus) -> str | None:
    """The party that uploads global 0; rotates on retries so one broken party cannot block the job."""
    act = active(status)
    return act[status.attempt % len(act)].name if act else None


def advance(job: FederatedJob, status: FederatedJobStatus, obs: Observation) -> tuple[FederatedJobStatus, list[Event]]:
    """One level-triggered step. Returns a new status (the input is not modified) and events."""
    st = status.model_copy(deep=True)
    events: list[Event] = []
    if st.phase in ("Succeeded", "Failed"):
        return st, events
    if outage.paused(job.spec, st, obs.storage_error, obs.now, events):
        _summarise(st)  # receipts wait in the mailboxes: those written meanwhile count once it answers
        return st, events
    _held_out(job, st, obs, events)
    step = {"init": _init, "training": _training, "aggregating": _aggregating, "evaluating": _evaluating}[st.stage]
    step(job, st, obs, events)
    _summarise(st)
    return st, events


# --- stages -------------------------------------------------------------------------------


def _init(job: FederatedJob, st: FederatedJobStatus, obs: Observation, events: list[Event]) -> None:
    spec, uid = job.spec, job.metadata.uid
    first = designated_initialiser(st)
    for p in _waiting(st):
        r = obs.receipts.get(p.name)
        if not _answers(r, "init", uid, 0, st.attempt):
            continue
        if r.storage_failed:
            _storage_failed(p, f"could not start: {r.error}", events)
        elif r.ok:
            p.state, p.message = "Ready", ""
            if p.name == first:
                st.global_sha256, st.adapter_bytes = r.sha256, r.update_bytes
                st.base_model_fingerprint = r.base_model_fingerprint
                p.message = "uploaded the initial adapter"
            p.fingerprint = r.base_model_fingerprint  # compared below once the reference is known
            extra = f"; {p.message}" if p.message else ""
            events.append(
                Event("Normal", "PartyReady", f"{p.name}: base model loaded in {r.timings.load_seconds:.1f}s{extra}")
            )
        else:
            _party_failed(p, f"could not start: {r.error}", events)
    lead = st.party(first) if first else None
    if lead is None:
        return
    if lead.state in ("Failed", STORAGE_FAILED):
        return _retry(spec, st, obs.now, f"{first} could not produce the initial adapter", events)
    if obs.now < st.round_deadline and (lead.state != "Ready" or any(_waiting(st))):
        return
    if lead.state != "Ready":  # deadline passed without global 0: another party initialises next attempt
        _party_failed(lead, "did not upload the initial adapter before the deadline", events, state="Straggler")
        return _retry(spec, st, obs.now, f"{first} did not produce the initial adapter in time", events)
    for p in active(st):
        if p.state == "Ready" and p.fingerprint != st.base_model_fingerprint:
            _party_failed(
                p,
                "its base model differs from the others' (fingerprint mismatch): "
                "check spec.model.source resolves to the same weights everywhere",
                events,
            )
        elif p.state in WAITING:
            _party_failed(p, "did not load the model before the deadline", events, state="Straggler")
    ready = [p for p in active(st) if p.state == "Ready"]
    if len(ready) < spec.min_parties:
        return _retry(spec, st, obs.now, f"only {len(ready)} of {spec.min_parties} required parties are ready", events)
    _record(st, RoundRecord(round=0, participants=[first], finished_at=obs.now))
    _start_round(spec, st, 1, obs.now, events)


def _training(job: FederatedJob, st: FederatedJobStatus, obs: Observation, events: list[Event]) -> None:
    spec, uid, rnd = job.spec, job.metadata.uid, st.current_round
    if st.secure_aggregation is not None and st.secure_aggregation.phase != "train":
        return secure_rounds.step(job, st, obs, events)  # keys, shares, unmask
    for p in _waiting(st):
        r = obs.receipts.get(p.name)
        if not _answers(r, "train", uid, rnd, st.attempt):
            continue
        if r.storage_failed:
            _storage_failed(p, f"round {rnd}: {r.error}", events)
        elif not r.ok:
            _party_failed(p, f"round {rnd} failed: {r.error}", events)
        elif r.base_model_fingerprint != st.base_model_fingerprint:
            _party_failed(p, "update refused: trained on a different base model (fingerprint mismatch)", events)
        elif not r.sha256 or r.num_samples < 1:
            _party_failed(p, "update refused: the receipt names no update or no samples", events)
        else:
            p.state, p.message = "Submitted", ""
            p.update_sha256, p.num_samples, p.num_eval_samples = r.sha256, r.num_samples, r.num_eval_samples
            p.metrics = r.metrics
            p.bytes_up, p.bytes_down = p.bytes_up + r.bytes_up, p.bytes_down + r.bytes_down
            p.train_seconds = r.timings.train_seconds
            if r.sample_epsilon is not None:  # never lower: a restarted pod's accountant counts from zero again
                p.sample_epsilon = max(r.sample_epsilon, p.sample_epsilon or 0.0)
            # Its personal part, in its own bucket: the next round's ticket reads it back once this round is
            # aggregated (committed in _aggregating); a retried attempt starts from the last committed one.
            p.round_personal_sha256 = r.personal_sha256
    if (any(_waiting(st)) or _evaluator_waiting(st)) and obs.now < st.round_deadline:
        return
    for p in _waiting(st):
        _party_failed(p, f"no update for round {rnd} before the deadline", events, state="Straggler")
    _evaluator_late(st, events)
    _drop_failing(spec, st, obs.now, events)
    if st.phase == "Failed":
        return
    submitted = [p for p in active(st) if p.state == "Submitted"]
    if len(submitted) < spec.min_parties:
        return _retry(
            spec, st, obs.now, f"round {rnd}: {len(submitted)} update(s), {spec.min_parties} required", events
        )
    # Parties evaluated global r-1 before training on it: that is round r-1's quality.
    _record_eval(st, rnd - 1, submitted)
    if st.secure_aggregation is not None:
        return secure_rounds.after_training(spec, st, obs.now, events)  # the survivors unmask the sum
    st.stage = "aggregating"
    st.round_deadline = obs.now + timedelta(seconds=spec.round_timeout_seconds)


def _aggregating(job: FederatedJob, st: FederatedJobStatus, obs: Observation, events: list[Event]) -> None:
    spec, rnd, a = job.spec, st.current_round, obs.aggregator
    if not (a is not None and a.answers_round(job.metadata.uid, rnd, st.attempt)):
        if obs.now >= st.round_deadline:
            _retry(spec, st, obs.now, f"round {rnd}: the aggregator did not answer before the deadline", events)
        return
    sa = st.secure_aggregation  # with it, the survivors' masked updates: whatever each did since
    offered = set(sa.survivors) if sa is not None else {p.name for p in active(st) if p.state == "Submitted"}
    strangers = sorted((set(a.accepted) | set(a.rejected)) - offered)
    if strangers:  # the aggregator's pod wrote that receipt: its names are checked like the rest of it
        named = ", ".join(strangers)[:200]
        why = f"round {rnd}: the aggregator answered about updates it was not sent: {named}"
        return _retry(spec, st, obs.now, why, events)
    for name, reason in a.rejected.items():
        p = st.party(name)
        _party_failed(
            p, f"update rejected by the aggregator: {reason}", events, state="Failed", reason="UpdateRejected"
        )
    if not a.ok:
        why = f"round {rnd}: aggregation failed: {a.error}"
        return _retry(spec, st, obs.now, why, events, storage=a.storage_failed)
    accepted = [st.party(n) for n in a.accepted]
    for p in accepted:
        p.failures, p.last_round = 0, rnd
        if p.round_personal_sha256:  # personalization: the personal part trained beside the aggregated update
            p.personal_object = layout.personal_key(job.metadata.uid, rnd, st.attempt)
            p.personal_sha256, p.round_personal_sha256 = p.round_personal_sha256, None
    _record(
        st,
        RoundRecord(
            round=rnd,
            attempt=st.attempt,
            participants=list(a.accepted),
            rejected=dict(a.rejected),
            stragglers=[p.name for p in active(st) if p.state == "Straggler"],
            bytes_up=sum(p.bytes_up for p in accepted) + a.bytes_up,
            bytes_down=sum(p.bytes_down for p in accepted) + a.bytes_down,
            duration_seconds=(obs.now - st.round_started_at).total_seconds() if st.round_started_at else 0.0,
            slowest_train_seconds=max((p.train_seconds for p in accepted), default=0.0),
            metrics=Metrics(
                train_loss=_weighted([(p.metrics.train_loss if p.metrics else None, p.num_samples) for p in accepted]),
                train_distill_loss=_weighted(
                    [(p.metrics.train_distill_loss if p.metrics else None, p.num_samples) for p in accepted]
                ),
            ),
            lora_residual=a.lora_residual,
            epsilon=privacy.spent(spec.privacy.dp, rnd) if spec.privacy.dp else None,
            sample_epsilon=max((p.sample_epsilon for p in accepted if p.sample_epsilon is not None), default=None),
            finished_at=obs.now,
        ),
    )
    st.privacy = _privacy_status(spec, rnd)
    if st.secure_aggregation is not None:
        secure_rounds.aggregated(st, obs.now)
    st.global_sha256, st.server_state_sha256 = a.sha256, a.state_sha256
    events.append(Event("Normal", "RoundCompleted", f"round {rnd}/{spec.rounds}: aggregated {len(accepted)} update(s)"))
    _drop_failing(spec, st, obs.now, events)
    if st.phase == "Failed":
        return
    if rnd >= last_round(spec):
        if rnd < spec.rounds:
            _budget_exhausted(spec, st, rnd, obs.now, events)
        st.stage, st.attempt = "evaluating", 0
        st.storage_retries, st.storage_retry_since, st.resume_restarts = 0, None, 0
        st.round_deadline = obs.now + timedelta(seconds=spec.round_timeout_seconds)
        for p in members(st):
            p.state = "Pending"
    else:
        _start_round(spec, st, rnd + 1, obs.now, events)


def _evaluating(job: FederatedJob, st: FederatedJobStatus, obs: Observation, events: list[Event]) -> None:
    rnd, uid = st.current_round, job.metadata.uid
    for p in _waiting(st):
        r = obs.receipts.get(p.name)
        if _answers(r, "eval", job.metadata.uid, rnd, st.attempt):
            if r.ok:
                p.state, p.metrics, p.num_eval_samples = "Done", r.metrics, r.num_eval_samples
                if r.personal_sha256:  # the final personal part, at a fixed key of its own bucket
                    p.personal_object, p.personal_sha256 = layout.final_personal_key(uid), r.personal_sha256
            elif r.storage_failed:
                _storage_failed(p, f"final evaluation: {r.error}", events)
            else:
                p.state, p.message = "Failed", f"final evaluation failed: {r.error}"
    if ((any(_waiting(st)) or _evaluator_waiting(st)) and obs.now < st.round_deadline) or st.final_adapter is None:
        return
    for p in _waiting(st):
        p.state, p.message = "Straggler", "no final evaluation before the deadline"
    _evaluator_late(st, events)
    _record_eval(st, rnd, [p for p in active(st) if p.state == "Done"])
    st.stage = "done"
    spent = f"; ε={st.privacy.epsilon:.3f} (δ={st.privacy.delta:g}) spent" if st.privacy else ""
    early = f" of {job.spec.rounds} (privacy budget exhausted)" if rnd < job.spec.rounds else ""
    cond.mark_succeeded(st, f"{rnd} round(s){early} done{spent}; final adapter at {st.final_adapter}", obs.now)
    events.append(Event("Normal", "Succeeded", f"final adapter at {st.final_adapter}"))


def _budget_exhausted(spec: FederatedJobSpec, st: FederatedJobStatus, rnd: int, now: datetime, events: list) -> None:
    """Round rnd + 1 would spend more ε than the budget: the job ends with round rnd's adapter, saying why."""
    dp = spec.privacy.dp
    msg = (
        f"stopped after round {rnd} of {spec.rounds}: round {rnd + 1} would spend ε={privacy.spent(dp, rnd + 1):.3f} "
        f"(δ={dp.budget.delta:g}), more than spec.privacy.dp.budget.epsilon={dp.budget.epsilon:g}; "
        f"spent ε={privacy.spent(dp, rnd):.3f}. The final adapter is round {rnd}'s"
    )
    cond.set_condition(st, cond.PRIVACY_BUDGET_EXHAUSTED, "True", cond.PRIVACY_BUDGET_EXHAUSTED, msg, now)
    events.append(Event("Warning", cond.PRIVACY_BUDGET_EXHAUSTED, msg))


# --- the evaluator ------------------------------------------------------------------------


def _held_out(job: FederatedJob, st: FederatedJobStatus, obs: Observation, events: list[Event]) -> None:
    """Take the evaluator's answer to its current task, if it gave one."""
    ev, task = st.evaluator, evaluator_task(st)
    if ev is None or task is None or ev.state not in (*WAITING, "Straggler"):
        return
    kind, rnd = task
    r = obs.receipts.get(ev.name)
    if not _answers(r, kind, job.metadata.uid, rnd, 0):
        return
    if r.storage_failed:
        _storage_failed(
            ev, f"{'could not start' if kind == 'init' else f'held-out evaluation of round {rnd}'}: {r.error}", events
        )
        return
    if kind == "init":  # nobody waits for it; a failure (its test set unreadable, say) is said at once
        if not r.ok:
            _party_failed(ev, f"could not start: {r.error}", events)
        return
    if not r.ok:
        _party_failed(ev, f"held-out evaluation of round {rnd} failed: {r.error}", events)
    elif r.base_model_fingerprint != st.base_model_fingerprint:
        _party_failed(ev, "held-out evaluation refused: a different base model (fingerprint mismatch)", events)
    else:
        ev.state, ev.message, ev.failures = "Done", "", 0
        ev.metrics, ev.num_eval_samples, ev.fingerprint = r.metrics, r.num_eval_samples, r.base_model_fingerprint
        rec = _history(st, rnd)
        rec.held_out, rec.held_out_samples = r.metrics.model_copy(), r.num_eval_samples
        what = f"held-out test set, global adapter of round {rnd}: {_shown(r.metrics)}"
        events.append(Event("Normal", "HeldOutEvaluated", what))


def _evaluator_waiting(st: FederatedJobStatus) -> bool:
    ev, task = st.evaluator, evaluator_task(st)
    return ev is not None and ev.state in WAITING and task is not None and task[0] == "eval"


def _evaluator_late(st: FederatedJobStatus, events: list[Event]) -> None:
    if _evaluator_waiting(st):
        task = evaluator_task(st)
        _party_failed(
            st.evaluator, f"no held-out evaluation of round {task[1]} before the deadline", events, state="Straggler"
        )


def _shown(m: Metrics) -> str:
    """A receipt's metrics in a line; any of them may be missing (receipts come from other organisations)."""
    parts = [
        f"{name} {format(v, fmt)}"
        for name, v, fmt in (
            ("acc", m.eval_accuracy, ".3f"),
            ("ppl", m.eval_perplexity, ".2f"),
            ("loss", m.eval_loss, ".4f"),
        )
        if v is not None
    ]
    return ", ".join(parts) or "no metrics"


# --- helpers ------------------------------------------------------------------------------


def _answers(r: TrainerReceipt | None, kind: str, uid: str | None, rnd: int, attempt: int) -> bool:
    return r is not None and (r.kind, r.job, r.round, r.attempt) == (kind, uid, rnd, attempt)


def _waiting(st: FederatedJobStatus) -> list[PartyState]:
    return [p for p in active(st) if p.state in WAITING]


def _party_failed(
    p: PartyState, message: str, events: list[Event], state: str = "Failed", reason: str = "PartyFailed"
) -> None:
    p.state, p.message = state, message
    p.failures += 1
    events.append(Event("Warning", reason, f"{p.name}: {message}"))


def _storage_failed(p: PartyState, message: str, events: list[Event]) -> None:
    """A ticket the storage failed: the party waits for the next one, and no failure counts against it."""
    p.state, p.message = STORAGE_FAILED, message
    events.append(Event("Warning", STORAGE_FAILED, f"{p.name}: {message} (the storage's failure, not the party's)"))


def _start_round(spec: FederatedJobSpec, st: FederatedJobStatus, rnd: int, now: datetime, events: list[Event]) -> None:
    st.current_round, st.attempt, st.stage = rnd, 0, "training"
    st.storage_retries, st.storage_retry_since, st.resume_restarts = 0, None, 0
    if (ev := st.evaluator) is not None and ev.state != "Dropped":  # asked once per round, whatever the retries
        ev.state = "Training"
    _reset_round(spec, st, now)
    events.append(Event("Normal", "RoundStarted", f"round {rnd}/{spec.rounds} started with {len(active(st))} parties"))


def _reset_round(spec: FederatedJobSpec, st: FederatedJobStatus, now: datetime) -> None:
    st.round_started_at = now
    st.round_deadline = now + timedelta(seconds=spec.round_timeout_seconds)
    waiting = "Pending" if st.stage == "init" else "Training"
    for p in active(st):
        p.state = waiting
        p.update_sha256, p.num_eval_samples, p.round_personal_sha256 = None, None, None
        p.bytes_up = p.bytes_down = 0
        p.train_seconds = 0.0
    st.secure_aggregation = secure_rounds.fresh(spec, st) if st.stage == "training" else None
    cond.mark_running(st, f"round {st.current_round}/{spec.rounds}, attempt {st.attempt}", now)


def _retry(
    spec: FederatedJobSpec, st: FederatedJobStatus, now: datetime, why: str, events: list[Event], storage: bool = False
) -> None:
    """Run the current round again (bounded), or fail the job with QuorumLost.

    A round some party (or the aggregator) could not do because the storage failed runs again without
    counting against spec.maxRoundRetries, within the storage outage bound (`outage.free_retry`).
    """
    # The parties' answers decide init and training; an aggregation failure is the aggregator's to attribute.
    counting = st.stage in ("init", "training")
    failed_on_storage = sorted((p for p in active(st) if counting and p.state == STORAGE_FAILED), key=lambda p: p.name)
    if failed_on_storage:
        first = failed_on_storage[0]  # its words name the storage and the endpoint it could not reach
        names = ", ".join(p.name for p in failed_on_storage)
        why += f"; the storage failed for {names} ({first.name}: {first.message[:300]})"
    if storage or failed_on_storage:
        if outage.free_retry(spec, st, why, now, events):
            _again(
                spec, st, now, f"{why}; retrying (attempt {st.attempt + 1}, not counted: the storage failed)", events
            )
        return
    counted = st.attempt - st.storage_retries - st.resume_restarts  # restarts for a resume are free
    if counted >= spec.max_round_retries:
        msg = f"{why}; gave up after {counted + 1} attempt(s) (spec.maxRoundRetries={spec.max_round_retries})"
        cond.set_condition(st, cond.QUORUM_LOST, "True", cond.QUORUM_LOST, msg, now)
        cond.mark_halted(st, "Failed", cond.QUORUM_LOST, msg, now)
        st.stage = "done"
        events.append(Event("Warning", cond.QUORUM_LOST, msg))
        return
    _again(spec, st, now, f"{why}; retrying (attempt {st.attempt + 1})", events)


def _again(spec: FederatedJobSpec, st: FederatedJobStatus, now: datetime, message: str, events: list[Event]) -> None:
    st.attempt += 1
    if st.stage != "init":
        st.stage = "training"
    _reset_round(spec, st, now)
    events.append(Event("Warning", "RoundRetry", message))


def _drop_failing(spec: FederatedJobSpec, st: FederatedJobStatus, now: datetime, events: list[Event]) -> None:
    for p in active(st):
        if p.failures >= spec.max_party_failures:
            p.state = "Dropped"
            p.message = f"dropped after {p.failures} consecutive failed rounds; last: {p.message}"
            events.append(Event("Warning", "PartyDropped", f"{p.name}: {p.message}"))
    ev = st.evaluator
    if ev is not None and ev.state != "Dropped" and ev.failures >= spec.max_party_failures:
        ev.state = "Dropped"
        ev.message = f"evaluator dropped after {ev.failures} consecutive failures; last: {ev.message}"
        events.append(Event("Warning", "PartyDropped", f"{ev.name}: {ev.message}; the job goes on without it"))
    dropped = [p.name for p in st.parties if p.state == "Dropped"]
    if dropped:
        cond.set_condition(st, cond.DEGRADED, "True", "PartiesDropped", f"dropped: {', '.join(dropped)}", now)
    if len(active(st)) < spec.min_parties:
        msg = f"{len(active(st))} parties left, spec.minParties={spec.min_parties}"
        cond.set_condition(st, cond.QUORUM_LOST, "True", cond.QUORUM_LOST, msg, now)
        cond.mark_halted(st, "Failed", cond.QUORUM_LOST, msg, now)
        st.stage = "done"
        events.append(Event("Warning", cond.QUORUM_LOST, msg))


def _weighted(pairs: list[tuple[float | None, int | None]]) -> float | None:
    """The weighted mean of the values that are there; None when there are none, or when it overflows
    (pods report the values: a mean of 1e308s is no number a Kubernetes status can hold)."""
    pairs = [(v, w) for v, w in pairs if v is not None and w]
    total = sum(w for _, w in pairs)
    mean = sum(v * w for v, w in pairs) / total if total else None
    return mean if mean is None or math.isfinite(mean) else None


EVAL_KEYS = ("eval_loss", "eval_accuracy", "eval_perplexity", "global_eval_loss", "global_eval_accuracy")


def _record(st: FederatedJobStatus, rec: RoundRecord) -> None:
    """Insert or replace a round's record, keeping eval metrics already known, bounded in size."""
    old = next((h for h in st.history if h.round == rec.round), None)
    if old is not None:
        for k in EVAL_KEYS:
            if getattr(rec.metrics, k) is None:
                setattr(rec.metrics, k, getattr(old.metrics, k))
        rec.party_eval = rec.party_eval or old.party_eval
        if rec.held_out is None:
            rec.held_out, rec.held_out_samples = old.held_out, old.held_out_samples
        st.history.remove(old)
    st.history.append(rec)
    st.history.sort(key=lambda h: h.round)
    del st.history[:-MAX_HISTORY]


def _history(st: FederatedJobStatus, rnd: int) -> RoundRecord:
    """Round `rnd`'s record, created if the round has none yet."""
    rec = next((h for h in st.history if h.round == rnd), None)
    if rec is None:
        rec = RoundRecord(round=rnd)
        _record(st, rec)
    return rec


def _record_eval(st: FederatedJobStatus, rnd: int, parties: list[PartyState]) -> None:
    rec = _history(st, rnd)
    for k in EVAL_KEYS:
        setattr(
            rec.metrics,
            k,
            _weighted([(getattr(p.metrics, k) if p.metrics else None, p.num_eval_samples) for p in parties]),
        )
    # Personalization: each party's own numbers, personalised beside global (a mean hides the skew).
    personal = [p for p in parties if p.metrics and p.metrics.global_eval_loss is not None]
    if personal:
        rec.party_eval = {
            p.name: p.metrics.model_copy(update={"train_loss": None}) for p in sorted(personal, key=lambda p: p.name)
        }


def _summarise(st: FederatedJobStatus) -> None:
    act = active(st)
    st.parties_ready = f"{sum(p.state not in WAITING for p in act)}/{len(act)}"
    for h in reversed(st.history):
        m = h.metrics
        if m.eval_accuracy is not None:
            st.last_metric = f"acc={m.eval_accuracy:.3f}"
            break
        if m.eval_perplexity is not None:
            st.last_metric = f"ppl={m.eval_perplexity:.2f}"
            break
