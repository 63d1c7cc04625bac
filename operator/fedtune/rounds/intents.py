"""What every mailbox should hold, derived from the status alone, and the tickets that say it.

`trainer_intents` / `aggregator_intent` are pure. `build_*_ticket` turn an intent into a wire
ticket with presigned URLs through a `Signer`, so the same code serves local mode and the
operator. Presigning is local crypto, no network; only adapters above MULTIPART_THRESHOLD cost
requests to the store (starting their multipart uploads; where that fails, a single PUT instead).
URLs expire shortly after the stage's deadline.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from fedtune.api.job import FederatedJob
from fedtune.api.methods import FEDKSEED, FULL, OFFSITE, SERVER_STATE_COPIES
from fedtune.api.party import Party
from fedtune.api.protocol import AggregatorTicket, Download, Multipart, TrainerConfig, TrainerTicket, UpdateIn, Upload
from fedtune.api.secagg import ObjectIn, SecureAggregation, SecureTicket
from fedtune.api.status import FederatedJobStatus
from fedtune.rounds import secure_rounds
from fedtune.rounds.machine import active, designated_initialiser, evaluator_task
from fedtune.storage import layout
from fedtune.storage.s3 import StorageError

log = logging.getLogger(__name__)

COORDINATOR = "coordinator"
URL_GRACE_SECONDS = 120  # uploads that start just before the deadline may still finish
# Objects expected above the threshold go up in parts, each retried alone: a dropped connection
# costs one part, not the whole adapter. S3 wants parts of at least 5 MiB and at most 10,000 of them.
# Every part URL (~0.4-1.2 KB) travels in the ticket, whose mailbox is a Secret (1 MiB at most), so
# parts grow beyond PART_SIZE to keep an object within MAX_PARTS (+1 spare) whatever its size.
MULTIPART_THRESHOLD = 64 * 1024 * 1024
PART_SIZE = 16 * 1024 * 1024
MAX_PARTS = 256
_MIB = 1024 * 1024


@dataclass(frozen=True)
class TrainerIntent:
    party: str
    kind: str
    round: int
    attempt: int
    deadline: datetime
    upload_global0: bool = False

    @property
    def id(self) -> str:
        return f"{self.kind}-r{self.round}-a{self.attempt}"


@dataclass(frozen=True)
class AggregatorIntent:
    kind: str
    round: int
    attempt: int
    deadline: datetime
    updates: tuple[tuple[str, str, int], ...] = ()  # (party, sha256, num_samples)

    @property
    def id(self) -> str:
        return f"{self.kind}-r{self.round}-a{self.attempt}"


class Signer(Protocol):
    """Mints presigned URLs with the credentials of `owner` (a party key or COORDINATOR)."""

    def presign_get(self, owner: str, key: str, expires_s: int) -> str: ...

    def presign_put(self, owner: str, key: str, expires_s: int) -> str: ...

    def start_multipart(self, owner: str, key: str, parts: int, part_size: int, expires_s: int) -> Multipart: ...


def trainer_intents(job: FederatedJob, st: FederatedJobStatus) -> dict[str, TrainerIntent]:
    """The ticket each party's mailbox should hold now."""
    deadline = st.round_deadline
    if st.phase in ("Succeeded", "Failed") or st.stage == "done":
        return {p.name: TrainerIntent(p.name, "exit", st.current_round, 0, deadline) for p in st.parties}
    kind = {"init": "init", "training": "train", "aggregating": "train", "evaluating": "eval"}[st.stage]
    lead = designated_initialiser(st) if st.stage == "init" else None
    out = {
        p.name: TrainerIntent(p.name, kind, st.current_round, st.attempt, deadline, upload_global0=p.name == lead)
        for p in active(st)
    }
    if st.secure_aggregation is not None and st.stage in ("training", "aggregating"):
        for p in active(st):  # a round's exchanges: keys, shares, train, unmask
            out[p.name] = TrainerIntent(
                p.name, secure_rounds.kind_for(st, p.name), st.current_round, st.attempt, deadline
            )
    ev, task = st.evaluator, evaluator_task(st)
    if ev is not None and ev.state != "Dropped" and task is not None:
        out[ev.name] = TrainerIntent(ev.name, task[0], task[1], 0, deadline)  # asked once per round
    for p in st.parties:
        if p.state == "Dropped":
            out[p.name] = TrainerIntent(p.name, "exit", st.current_round, 0, deadline)
    return out


def aggregator_intent(job: FederatedJob, st: FederatedJobStatus) -> AggregatorIntent | None:
    """The ticket the aggregator's mailbox should hold now (None: leave it as it is)."""
    if st.phase in ("Succeeded", "Failed") or st.stage == "done":
        return AggregatorIntent("exit", st.current_round, 0, st.round_deadline)
    if st.stage != "aggregating":
        return None
    sa = st.secure_aggregation
    offered = sa.survivors if sa is not None else [p.name for p in active(st) if p.state == "Submitted"]
    ups = tuple((p.name, p.update_sha256, p.num_samples) for p in map(st.party, offered))
    return AggregatorIntent("aggregate", st.current_round, st.attempt, st.round_deadline, ups)


def trainer_config(job: FederatedJob, party: Party) -> TrainerConfig:
    """The constant part of a party's tickets."""
    spec = job.spec
    mu = spec.strategy.resolved().get("mu", 0.0) if spec.strategy.name == "fedprox" else 0.0
    return TrainerConfig(
        model=spec.party_model,  # under offsite tuning the emulator: a party never learns the full model's source
        peft=spec.peft,
        data=spec.data,
        training=spec.training,
        deepspeed=spec.deepspeed,
        world_size=spec.world_size(party.spec.compute.gpus_per_pod),
        prox_mu=mu,
        dp=spec.privacy.dp if spec.privacy.dp and spec.privacy.dp.mode == "local" else None,
        dp_sgd=spec.privacy.dp_sgd,
        personalization=spec.personalization,
    )


def url_ttl(deadline: datetime, now: datetime) -> int:
    """Seconds a URL for a stage ending at `deadline` stays valid: until shortly after it."""
    return max(60, int((deadline - now).total_seconds()) + URL_GRACE_SECONDS)


def part_size_for(expected_bytes: int) -> int:
    """PART_SIZE, or larger (whole MiB) so that `expected_bytes` fits in MAX_PARTS parts."""
    needed = -(-expected_bytes // MAX_PARTS)
    return max(PART_SIZE, -(-needed // _MIB) * _MIB)


def upload_target(signer: Signer, owner: str, key: str, ttl: int, expected_bytes: int | None) -> Upload:
    """A single presigned PUT, or a multipart upload when the object is expected above MULTIPART_THRESHOLD.

    The part count has one spare part: an update's header may be a little larger than the global
    adapter's it was sized from (and a pod with still more data uses larger parts).
    """
    if expected_bytes is None or expected_bytes <= MULTIPART_THRESHOLD:
        return Upload(url=signer.presign_put(owner, key, ttl))
    part_size = part_size_for(expected_bytes)
    parts = -(-expected_bytes // part_size) + 1
    try:
        return Upload(multipart=signer.start_multipart(owner, key, parts, part_size, ttl))
    except StorageError as exc:
        # Starting an upload talks to the store; its failure must not abort a reconcile or end a
        # local run. A single PUT still works (S3 accepts single PUTs of up to 5 GiB), without
        # per-part retries. StorageError's text names bucket, endpoint and fix, never a signature.
        log.warning("falling back to a single PUT for %s: %s", key, exc)
        return Upload(url=signer.presign_put(owner, key, ttl))


def build_trainer_ticket(
    job: FederatedJob,
    intent: TrainerIntent,
    party: Party,
    st: FederatedJobStatus,
    signer: Signer,
    now: datetime,
    model_files: dict[str, str] | None = None,
) -> TrainerTicket:
    """A party's ticket with URLs scoped to single objects."""
    uid, owner = job.metadata.uid, party.key
    ttl = url_ttl(intent.deadline, now)
    config = trainer_config(job, party)
    if model_files:
        config.model_files = model_files
    t = TrainerTicket(
        kind=intent.kind,
        job=uid,
        party=owner,
        round=intent.round,
        attempt=intent.attempt,
        deadline=intent.deadline,
        config=config,
    )
    if intent.kind == "exit":
        return t
    if st.secure_aggregation is not None and intent.kind in ("keys", "shares", "train", "unmask"):
        t.secure = _secure_ticket(job, intent, owner, st, signer, ttl)
        if intent.kind != "train":
            return t  # the exchanges besides training move small objects only
    # Init tickets carry the data too: a party reads and tokenizes it while the others load, and a
    # schema mistake is an init failure, not a round-1 one. The evaluator's only split is its test set.
    t.eval_data = Download(url=signer.presign_get(owner, party.spec.data.eval_key, ttl))
    if intent.kind in ("init", "train") and party.key != job.evaluator_key:
        t.train_data = Download(url=signer.presign_get(owner, party.spec.data.train_key, ttl))
    if intent.kind == "init":
        if intent.upload_global0:  # its size is not known yet: a single PUT
            t.update_out = Upload(url=signer.presign_put(COORDINATOR, layout.global_key(uid, 0), ttl))
            if job.spec.peft.method in (FULL, FEDKSEED):  # a transformers model, not an adapter: its files
                t.model_files_out = signer.presign_put(COORDINATOR, layout.model_files_key(uid), ttl)
            elif job.spec.peft.method != OFFSITE:  # offsite's final/ says how to plug it in (fedtune.storage.final)
                t.adapter_config_out = signer.presign_put(COORDINATOR, layout.adapter_config_key(uid), ttl)
        return t
    # A train ticket of round r starts from global r-1; an eval ticket reads the global of its round
    # (the evaluator's: r-1 while round r trains; everyone's at the end: the last).
    global_round = intent.round - 1 if intent.kind == "train" else intent.round
    t.global_in = Download(
        url=signer.presign_get(COORDINATOR, layout.global_key(uid, global_round), ttl), sha256=st.global_sha256
    )
    if intent.kind == "train":
        t.update_out = upload_target(signer, owner, layout.update_key(uid, intent.round), ttl, st.adapter_bytes)
        t.receipt_out = signer.presign_put(owner, layout.party_receipt_key(uid, intent.round), ttl)
    if job.spec.personalization is not None and party.key != job.evaluator_key:
        _personal_urls(t, intent, owner, st, signer, ttl)
    return t


def _personal_urls(
    t: TrainerTicket, intent: TrainerIntent, owner: str, st: FederatedJobStatus, signer: Signer, ttl: int
) -> None:
    """Personalization: the party's personal part, read from and written to its own bucket only (its credentials)."""
    me = st.party(owner)
    if me.personal_object and me.personal_sha256:
        t.personal_in = Download(url=signer.presign_get(owner, me.personal_object, ttl), sha256=me.personal_sha256)
    out = (
        layout.personal_key(t.job, intent.round, intent.attempt)
        if intent.kind == "train"
        else layout.final_personal_key(t.job)
    )
    t.personal_out = signer.presign_put(owner, out, ttl)


def _weighted(job: FederatedJob) -> bool:
    """Whether updates are weighted by samples: not with differential privacy (its mean is unweighted)."""
    return job.spec.privacy.dp is None


def _secure_ticket(
    job: FederatedJob, intent: TrainerIntent, owner: str, st: FederatedJobStatus, signer: Signer, ttl: int
) -> SecureTicket:
    """What a party needs for one exchange of secure aggregation: public keys, URLs, the survivors."""
    uid, rnd, a, sa = job.metadata.uid, intent.round, intent.attempt, st.secure_aggregation
    t = SecureTicket(threshold=sa.threshold, weighted=_weighted(job))
    if intent.kind == "shares":
        t.roster = dict(sorted(sa.keys.items()))
        t.shares_out = signer.presign_put(owner, layout.shares_key(uid, rnd, a), ttl)
    elif intent.kind == "train":
        t.roster = sa.roster()
        t.shares_in = _shares_in(signer, uid, rnd, a, sa.shares, ttl)
    elif intent.kind == "unmask":
        t.roster, t.survivors, t.dropped = sa.roster(), list(sa.survivors), list(sa.dropped)
        t.reveal_out = signer.presign_put(owner, layout.reveal_key(uid, rnd, a), ttl)
    return t


def _shares_in(signer: Signer, uid: str, rnd: int, a: int, digests: dict[str, str], ttl: int) -> dict[str, ObjectIn]:
    """GET URLs of each party's shares object (minted with its owner's credentials) and its sha256."""
    return {
        p: ObjectIn(url=signer.presign_get(p, layout.shares_key(uid, rnd, a), ttl), sha256=sha)
        for p, sha in sorted(digests.items())
    }


def build_aggregator_ticket(
    job: FederatedJob, intent: AggregatorIntent, st: FederatedJobStatus, signer: Signer, now: datetime
) -> AggregatorTicket:
    """The aggregator's ticket: GET URLs of the updates (each minted by its party), PUT URL of global r."""
    spec, uid, rnd = job.spec, job.metadata.uid, intent.round
    t = AggregatorTicket(kind=intent.kind, job=uid, round=rnd, attempt=intent.attempt, deadline=intent.deadline)
    if intent.kind == "exit":
        return t
    ttl = url_ttl(intent.deadline, now)
    t.strategy, t.strategy_params = spec.strategy.name, spec.strategy.resolved()
    t.lora_mode, t.min_updates, t.dp = spec.aggregator.lora_mode, spec.min_parties, spec.privacy.dp
    t.robust = spec.aggregator.robust
    t.global_in = Download(
        url=signer.presign_get(COORDINATOR, layout.global_key(uid, rnd - 1), ttl), sha256=st.global_sha256
    )
    if st.server_state_sha256:
        t.state_in = Download(
            url=signer.presign_get(COORDINATOR, layout.state_key(uid, rnd - 1), ttl), sha256=st.server_state_sha256
        )
    t.updates = [
        UpdateIn(party=p, url=signer.presign_get(p, layout.update_key(uid, rnd), ttl), sha256=sha, num_samples=n)
        for p, sha, n in intent.updates
    ]
    if (sa := st.secure_aggregation) is not None:
        a = intent.attempt
        t.secure = SecureAggregation(
            threshold=sa.threshold,
            weighted=_weighted(job),
            roster=sa.roster(),
            dropped=list(sa.dropped),
            shares_in=_shares_in(signer, uid, rnd, a, sa.shares, ttl),
            reveals_in={
                p: ObjectIn(url=signer.presign_get(p, layout.reveal_key(uid, rnd, a), ttl), sha256=sha)
                for p, sha in sorted(sa.reveals.items())
            },
        )
    size = st.adapter_bytes
    t.global_out = upload_target(signer, COORDINATOR, layout.global_key(uid, rnd), ttl, size)
    # Stateless strategies get a single (unused) PUT URL: an unused multipart upload would linger.
    state_size = size * SERVER_STATE_COPIES.get(spec.strategy.name, 0) if size else None
    t.state_out = upload_target(signer, COORDINATOR, layout.state_key(uid, rnd), ttl, state_size)
    t.receipt_out = signer.presign_put(COORDINATOR, layout.global_receipt_key(uid, rnd), ttl)
    return t
