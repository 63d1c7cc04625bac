"""One level-triggered reconcile of a FederatedJob: the local runner's loop, over Kubernetes objects.

observe mailboxes -> advance the shared round state machine -> ensure pods -> write tickets.
Everything is rebuilt from the job object (status + accepted-spec annotation) and the mailbox
Secrets on every pass, so an operator restart continues where the last one stopped.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from fedtune.api.job import FederatedJob
from fedtune.api.party import Party
from fedtune.api.protocol import AggregatorReceipt, TrainerReceipt
from fedtune.api.receipts import Rejections
from fedtune.api.status import FederatedJobStatus
from fedtune.k8s import preconditions as pre
from fedtune.k8s.builders import (
    aggregator_context,
    build_pod_objects,
    build_ticket_patch,
    owner_reference,
    trainer_context,
)
from fedtune.k8s.kube import Kube, object_path, path
from fedtune.k8s.mailbox_secrets import held_ticket, read_secret_receipt
from fedtune.k8s.names import ChildNames, aggregator_names, trainer_names
from fedtune.k8s.settings import OperatorSettings
from fedtune.rounds import conditions as cond
from fedtune.rounds.intents import (
    COORDINATOR,
    aggregator_intent,
    build_aggregator_ticket,
    build_trainer_ticket,
    trainer_intents,
    url_ttl,
)
from fedtune.rounds.machine import Event, Observation, advance, members, new_status
from fedtune.rounds.outage import AVAILABLE as STORAGE_AVAILABLE
from fedtune.storage import layout
from fedtune.storage.final import export_final
from fedtune.storage.model_files import ModelSourceError, model_file_urls
from fedtune.storage.probe import endpoint_url, unavailable
from fedtune.storage.s3 import Bucket
from fedtune.storage.signer import BucketSigner

log = logging.getLogger(__name__)

AGGREGATOR = "aggregator"
RECEIPT_REJECTED = "ReceiptRejected"  # the event saying a pod's receipt was refused, and why
ROUND_IN_PROGRESS = "RoundInProgress"  # Ready's reason while a round runs (conditions.mark_running)


@dataclass
class Outcome:
    """What one reconcile decided: the status to write, events to post, annotations to set."""

    status: FederatedJobStatus
    events: list[Event] = field(default_factory=list)
    annotations: dict[str, str] = field(default_factory=dict)


def pending_status(body: dict, now: datetime) -> FederatedJobStatus:
    st = pre._status(body) or FederatedJobStatus()
    st.observed_generation = body["metadata"].get("generation")
    return st


async def reconcile(
    body: dict, kube: Kube, settings: OperatorSettings, now: datetime, rejections: Rejections | None = None
) -> Outcome:
    """One pass. Raises pre.InvalidSpec for specs that cannot run; returns Pending statuses for waits.

    `rejections` remembers the refused receipts already reported (the job's daemon keeps one), so
    each is an event once, not at every pass."""
    refused = pre.refused_generation(body)
    if refused is not None and refused != body["metadata"].get("generation"):
        body = {**body, "status": None}  # the refused spec was edited: judge it afresh, from the start
    acc = pre.accept_spec(body)
    job = acc.job
    out = Outcome(status=pending_status(body, now))
    if acc.annotation is not None:
        out.annotations[pre.ACCEPTED_SPEC] = acc.annotation
    st = out.status
    if acc.rejected_change:
        cond.set_condition(st, "SpecChangeRejected", "True", "FrozenField", acc.rejected_change, now)
    elif st.condition("SpecChangeRejected") is not None:
        cond.set_condition(st, "SpecChangeRejected", "False", "Accepted", "", now)
    if st.phase in ("Succeeded", "Failed"):
        await _write_tickets(job, st, {}, kube, None, now)
        return out
    try:
        parties = await pre.load_parties(job, kube)
        buckets = await pre.buckets(job, parties, kube)
        if st.phase == "Pending":
            await asyncio.to_thread(buckets[COORDINATOR].ensure, True)
        missing = [k for k in job.member_keys if await kube.get(_pod_path(job, k)) is None]
        if missing and st.phase == "Pending" and settings.check_nodes:
            await pre.check_schedulable(job, parties, kube, missing)
    except pre.Wait as wait:
        cond.set_condition(
            st, wait.ctype, "True" if wait.ctype == "Unschedulable" else "False", wait.reason, wait.message, now
        )
        if wait.ctype == "Unschedulable" and st.condition("PartiesReady") is not None:
            # the parties were checked before the nodes: an earlier PartiesReady=False is stale now
            cond.set_condition(st, "PartiesReady", "True", "AllGood", "", now)
        cond.set_condition(st, cond.READY, "False", wait.reason, wait.message, now)
        cond.set_condition(st, cond.RECONCILING, "True", wait.reason, wait.message, now)
        st.message = wait.message
        return out
    for ctype in ("PartiesReady", "Unschedulable"):
        if st.condition(ctype) is not None:
            cond.set_condition(st, ctype, "True" if ctype == "PartiesReady" else "False", "AllGood", "", now)
    _back_to_running(job, st, now)
    if st.phase == "Pending":
        fresh = new_status(job, now)
        fresh_types = {c.type for c in fresh.conditions}
        fresh.conditions = [c for c in st.conditions if c.type not in fresh_types] + fresh.conditions
        st = out.status = fresh
        out.events.append(Event("Normal", "Started", f"{len(parties)} parties, {job.spec.rounds} rounds"))
    st.observed_generation = job.metadata.generation
    await _ensure_pods(job, body, parties, st, kube, settings, now, out.events)
    secrets = await _mailboxes(job, kube)
    obs = _observe(job, secrets, now, rejections or Rejections(), out.events)
    obs.storage_error = await storage_error(buckets)
    st, events = advance(job, st, obs)
    out.status, out.events = st, out.events + events
    for e in events:
        if e.reason in (cond.STORAGE_UNAVAILABLE, STORAGE_AVAILABLE):
            log.warning("FederatedJob %s/%s: %s", job.metadata.namespace, job.metadata.name, e.message)
    if obs.storage_error is not None and st.phase not in ("Succeeded", "Failed"):
        return out  # the round waits for the storage; the tickets already out stand
    await _finalize(job, st, buckets)
    try:
        await _write_tickets(job, st, parties, kube, BucketSigner(buckets), now, secrets)
    except ModelSourceError as exc:  # the pods wait for tickets until the model files are where the spec says
        cond.set_condition(st, "ModelSourceReady", "False", "ModelFilesMissing", str(exc), now)
        return out
    if st.condition("ModelSourceReady") is not None:
        cond.set_condition(st, "ModelSourceReady", "True", "ModelFilesFound", "", now)
    return out


async def storage_error(buckets: dict[str, Bucket]) -> str | None:
    """Why an object store of the job does not answer (the first, with the buckets it holds); None when all do.

    Each endpoint is asked once per pass (storage/probe.py), all at once, off the event loop.
    """
    holders: dict[str, list[str]] = {}
    for key, bucket in buckets.items():
        owner = "the coordinator" if key == COORDINATOR else f"party {key}"
        holders.setdefault(endpoint_url(bucket.endpoint, bucket.region), []).append(f"bucket {bucket.name} of {owner}")
    answers = await asyncio.gather(*(asyncio.to_thread(unavailable, url) for url in holders))
    for (url, held), why in zip(holders.items(), answers):
        if why is not None:
            return f"S3 endpoint {url} ({', '.join(held)}) does not answer: {why}"
    return None


def _back_to_running(job: FederatedJob, st: FederatedJobStatus, now: datetime) -> None:
    """A running job's Ready and Reconciling say the round is in progress (machine.py sets them when a
    round starts). A refusal (reason Forbidden: the operator's RBAC lacked a verb) or a wait (a Party
    not Ready) since then replaced them, with `message`; once a pass gets past both, put them back,
    or they would describe the old trouble until the next round starts. (A Pending job gets fresh
    conditions when it starts.)"""
    ready = st.condition(cond.READY)
    if st.phase != "Running" or ready is None or ready.reason == ROUND_IN_PROGRESS:
        return
    if st.message == ready.message:
        st.message = ""
    if st.stage == "init" and st.attempt == 0:
        doing = "loading the base model on every party"
    else:
        doing = f"round {st.current_round}/{job.spec.rounds}, attempt {st.attempt}"
    cond.mark_running(st, doing, now)


def _names(job: FederatedJob, key: str) -> ChildNames:
    ns, name = job.metadata.namespace, job.metadata.name
    return aggregator_names(ns, name) if key == AGGREGATOR else trainer_names(ns, name, key)


def _pod_path(job: FederatedJob, key: str) -> str:
    n = _names(job, key)
    return path("v1", "pods", n.namespace, n.pod)


async def _ensure_pods(
    job: FederatedJob,
    body: dict,
    parties: dict[str, Party],
    st: FederatedJobStatus,
    kube: Kube,
    settings: OperatorSettings,
    now: datetime,
    events: list[Event],
) -> None:
    """Create missing pods; recreate failed ones with bounded, doubling backoff."""
    wanted = [p.name for p in members(st)] + [AGGREGATOR]
    for key in wanted:
        ctx = aggregator_context(job) if key == AGGREGATOR else trainer_context(job, parties[key])
        pod = await kube.get(_pod_path(job, key))
        phase = ((pod or {}).get("status") or {}).get("phase")
        restarts = st.aggregator_restarts if key == AGGREGATOR else st.party(key).pod_restarts
        retry_at = st.aggregator_retry_at if key == AGGREGATOR else st.party(key).pod_retry_at
        if pod is not None and phase != "Failed":
            continue
        if pod is not None or (restarts or retry_at):  # it failed, or was deleted after starting once
            if restarts >= settings.max_pod_restarts:
                continue  # left failed: the state machine drops the party or fails the job on quorum
            if retry_at is None:
                retry_at = now + timedelta(seconds=settings.pod_backoff_seconds * 2**restarts)
                _set_retry(st, key, restarts, retry_at)
                events.append(
                    Event(
                        "Warning",
                        "PodFailed",
                        f"{ctx.names.pod} failed or vanished; recreating after {retry_at:%H:%M:%S}",
                    )
                )
                if pod is not None:
                    await kube.delete(object_path(pod))
                continue
            if now < retry_at:
                continue
            if pod is not None:
                await kube.delete(object_path(pod))
            _set_retry(st, key, restarts + 1, None)
        for obj in build_pod_objects(ctx):
            if obj["metadata"].get("namespace") == job.metadata.namespace:
                obj["metadata"]["ownerReferences"] = [owner_reference(body)]
            if obj["kind"] == "Pod" and await kube.get(object_path(obj)) is not None:
                continue
            await kube.create(obj)


def _set_retry(st: FederatedJobStatus, key: str, restarts: int, retry_at: datetime | None) -> None:
    if key == AGGREGATOR:
        st.aggregator_restarts, st.aggregator_retry_at = restarts, retry_at
    else:
        p = st.party(key)
        p.pod_restarts, p.pod_retry_at = restarts, retry_at


async def _mailboxes(job: FederatedJob, kube: Kube) -> dict[str, dict | None]:
    out = {}
    for key in [*job.member_keys, AGGREGATOR]:
        n = _names(job, key)
        out[key] = await kube.get(path("v1", "secrets", n.namespace, n.secret))
    return out


def _observe(
    job: FederatedJob, secrets: dict[str, dict | None], now: datetime, rejections: Rejections, events: list[Event]
) -> Observation:
    """The receipts in the mailbox Secrets; a refused one counts as none, and is reported once."""
    uid = job.metadata.uid
    reads = {k: read_secret_receipt(secrets.get(k), TrainerReceipt, job=uid, party=k) for k in job.member_keys}
    aggregator = read_secret_receipt(secrets.get(AGGREGATOR), AggregatorReceipt, job=uid)
    for key, read in [*reads.items(), (AGGREGATOR, aggregator)]:
        n = _names(job, key)
        if (note := rejections.report(f"pod {n.namespace}/{n.pod}", read)) is not None:
            log.warning("FederatedJob %s/%s: %s", job.metadata.namespace, job.metadata.name, note)
            events.append(Event("Warning", RECEIPT_REJECTED, note))
    receipts = {k: read.receipt for k, read in reads.items() if read.receipt is not None}
    return Observation(now=now, receipts=receipts, aggregator=aggregator.receipt)


async def _finalize(job: FederatedJob, st: FederatedJobStatus, buckets: dict) -> None:
    """Copy the last global adapter to final/ (PEFT layout, or transformers layout for full fine-tuning)
    once, with the coordinator's credentials."""
    if st.final_adapter is not None or st.stage not in ("evaluating", "done") or st.phase == "Failed":
        return
    uid, coord = job.metadata.uid, buckets[COORDINATOR]
    for note in await asyncio.to_thread(export_final, job, coord, st.current_round):
        log.warning("FederatedJob %s/%s: %s", job.metadata.namespace, job.metadata.name, note)
    st.final_adapter = coord.uri(layout.final_prefix(uid))


async def _write_tickets(
    job: FederatedJob,
    st: FederatedJobStatus,
    parties: dict[str, Party],
    kube: Kube,
    signer: BucketSigner | None,
    now: datetime,
    secrets: dict | None = None,
) -> None:
    """Patch each mailbox whose ticket differs from what the status asks for (a no-op when in sync)."""
    if secrets is None:
        secrets = await _mailboxes(job, kube)
    intents: dict[str, object] = dict(trainer_intents(job, st))
    agg = aggregator_intent(job, st)
    if agg is not None:
        intents[AGGREGATOR] = agg
    model_files: dict[str, str] | None = None  # s3:// model sources: listed once per pass
    for key, intent in intents.items():
        secret = secrets.get(key)
        held = held_ticket(secret)
        if secret is None or (held is not None and held.id == intent.id):
            continue
        if intent.kind == "exit" or signer is None:
            ticket = {"kind": "exit", "job": job.metadata.uid, "round": intent.round, "attempt": intent.attempt}
        elif key == AGGREGATOR:  # presigning is boto3 work: off the event loop
            ticket = (await asyncio.to_thread(build_aggregator_ticket, job, intent, st, signer, now)).to_wire()
        else:
            source = job.spec.party_model.source  # offsite tuning: the emulator, never the full model
            if model_files is None and source.startswith("s3://"):
                ttl = url_ttl(intent.deadline, now)
                model_files = await asyncio.to_thread(model_file_urls, source, signer.buckets, ttl)
            built = await asyncio.to_thread(
                build_trainer_ticket, job, intent, parties[key], st, signer, now, model_files
            )
            ticket = built.to_wire()
        n = _names(job, key)
        await kube.patch(path("v1", "secrets", n.namespace, n.secret), build_ticket_patch(ticket))
