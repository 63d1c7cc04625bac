"""A training round's exchanges under secure aggregation, in the pure round machine (fedtune.api.secagg).

The stage stays `training`; `status.secureAggregation.phase` says which exchange the parties are in:
keys -> shares -> train (the plain training exchange, masked) -> unmask, then the stage is
`aggregating`. Each exchange waits for every party in it until the deadline (a fresh round timeout
per exchange). A party that fails keys or shares sits the round out (a counted failure, as a missed
update); one that dealt its shares and then uploads no masked update is *dropped*: the others reveal
its mask key so its pairwise masks leave the sum. A survivor that gives no reveal still counts (the
others reveal its self mask). Fewer than t (or spec.minParties) at any exchange fails the round:
it is retried with fresh keys, and the condition SecureAggregationFailed says why. A local run resumed
mid-round starts the attempt again at keys with fresh keys, not counted as a retry (`machine.resumed`).
"""

from __future__ import annotations

from datetime import timedelta

from fedtune.api.job import FederatedJob, FederatedJobSpec
from fedtune.api.secagg import SecureAggregationStatus
from fedtune.api.status import FederatedJobStatus
from fedtune.rounds import conditions as cond
from fedtune.rounds import machine as m
from fedtune.rounds.events import Event

_WHAT = {"keys": "advertised keys", "shares": "dealt their shares", "unmask": "revealed their shares"}


def fresh(spec: FederatedJobSpec, st: FederatedJobStatus) -> SecureAggregationStatus | None:
    """The secure aggregation of a round (attempt) that starts now; None without it."""
    sa = spec.privacy.secure_aggregation
    if sa is None:
        return None
    trainers = sum(p.role == "trainer" for p in st.parties)  # the job's parties, dropped ones included
    return SecureAggregationStatus(phase="keys", threshold=sa.resolved_threshold(trainers))


def kind_for(st: FederatedJobStatus, party: str) -> str:
    """The ticket kind a party's mailbox holds in a training round: the phase, or the one it missed.

    A party that did not advertise keys keeps its keys ticket, one that did not deal its shares its shares
    ticket, one without a masked update its train ticket: it sits this round out, and its mailbox is not
    asked for work it can no longer do.
    """
    sa = st.secure_aggregation
    if sa.phase == "keys" or party not in sa.keys:
        return "keys"
    if sa.phase == "shares" or party not in sa.shares:
        return "shares"
    if sa.phase == "train" or party not in sa.survivors:
        return "train"
    return "unmask"


def step(job: FederatedJob, st: FederatedJobStatus, obs: m.Observation, events: list[Event]) -> None:
    """The keys, shares and unmask exchanges (train is the machine's own `_training`)."""
    spec, uid, rnd, sa = job.spec, job.metadata.uid, st.current_round, st.secure_aggregation
    phase = sa.phase
    for p in m._waiting(st):
        r = obs.receipts.get(p.name)
        if not m._answers(r, phase, uid, rnd, st.attempt):
            continue
        p.bytes_up += r.bytes_up
        p.bytes_down += r.bytes_down
        if phase == "unmask" and not (r.ok and r.sha256):  # its masked update is in: the others reveal its self mask
            why = r.error if not r.ok else "the unmask receipt names no object (sha256)"
            p.state, p.message = "Submitted", f"round {rnd}: gave no reveal ({why}); its update still counts"
            events.append(Event("Warning", "NoReveal", f"{p.name}: {p.message}"))
        elif r.storage_failed:
            m._storage_failed(p, f"round {rnd} ({phase}): {r.error}", events)
        elif not r.ok:
            m._party_failed(p, f"round {rnd}: secure aggregation ({phase}) failed: {r.error}", events)
        elif phase == "keys" and r.public_keys is None:
            m._party_failed(p, f"round {rnd}: the keys receipt carries no public keys", events)
        elif phase != "keys" and not r.sha256:
            m._party_failed(p, f"round {rnd}: the {phase} receipt names no object (sha256)", events)
        else:
            if phase == "keys":
                sa.keys[p.name] = r.public_keys
            elif phase == "shares":
                sa.shares[p.name] = r.sha256
            else:
                sa.reveals[p.name] = r.sha256
            p.state, p.message = "Submitted", ""
    if any(m._waiting(st)) and obs.now < st.round_deadline:
        return
    for p in m._waiting(st):
        if phase == "unmask":  # its masked update is in; the others reveal its self mask
            p.state, p.message = "Submitted", f"round {rnd}: no reveal before the deadline (its update still counts)"
        else:
            m._party_failed(
                p,
                f"round {rnd}: no answer to secure aggregation's {phase} before the deadline",
                events,
                state="Straggler",
            )
    done = len(sa.reveals) if phase == "unmask" else sum(p.state == "Submitted" for p in m.active(st))
    need = sa.threshold if phase == "unmask" else max(sa.threshold, spec.min_parties)
    if done < need:
        return below_threshold(spec, st, obs.now, f"{done} part(y/ies) {_WHAT[phase]}", need, events)
    if phase == "unmask":
        st.stage = "aggregating"
    else:
        sa.phase = "shares" if phase == "keys" else "train"
        for p in m.active(st):
            if p.state == "Submitted":
                p.state = "Training"
    st.round_deadline = obs.now + timedelta(seconds=spec.round_timeout_seconds)


def after_training(spec: FederatedJobSpec, st: FederatedJobStatus, now, events: list[Event]) -> None:
    """The masked updates are in: the survivors reveal, or the round fails below the threshold."""
    sa = st.secure_aggregation
    survivors = sorted(p.name for p in m.active(st) if p.state == "Submitted")
    if len(survivors) < sa.threshold:
        return below_threshold(spec, st, now, f"{len(survivors)} masked update(s) arrived", sa.threshold, events)
    sa.survivors, sa.dropped = survivors, sorted(set(sa.shares) - set(survivors))
    sa.phase = "unmask"
    for name in survivors:
        st.party(name).state = "Training"
    st.round_deadline = now + timedelta(seconds=spec.round_timeout_seconds)


def below_threshold(
    spec: FederatedJobSpec, st: FederatedJobStatus, now, what: str, need: int, events: list[Event]
) -> None:
    sa = st.secure_aggregation
    why = (
        f"round {st.current_round}: secure aggregation's {sa.phase} exchange: {what}, {need} needed "
        f"(threshold t={sa.threshold} of spec.privacy.secureAggregation, spec.minParties={spec.min_parties}); "
        "the sum cannot be recovered"
    )
    cond.set_condition(st, cond.SECURE_AGGREGATION_FAILED, "True", cond.BELOW_THRESHOLD, why, now)
    m._retry(spec, st, now, why, events)


def aggregated(st: FederatedJobStatus, now) -> None:
    """A round aggregated: a SecureAggregationFailed condition turns False."""
    c = st.condition(cond.SECURE_AGGREGATION_FAILED)
    if c is not None and c.status == "True":
        cond.set_condition(
            st, cond.SECURE_AGGREGATION_FAILED, "False", "Recovered", f"round {st.current_round} aggregated", now
        )
