"""What must hold before a FederatedJob's pods may exist: a valid accepted spec, consenting Parties,
credentials, and nodes that can hold the pods. Each failure is a `Wait` (retry later, with a
condition) or an `InvalidSpec` (permanent)."""

from __future__ import annotations

import asyncio
import base64
import json
from dataclasses import dataclass

from pydantic import ValidationError

from fedtune.api.errors import describe
from fedtune.api.job import FederatedJob
from fedtune.api.party import Party, StorageSpec
from fedtune.api.status import FederatedJobStatus
from fedtune.k8s.kube import Kube, path
from fedtune.k8s.resources import find_fitting_node, trainer_resources
from fedtune.k8s.spec_changes import review_change
from fedtune.rounds.conditions import INVALID_SPEC
from fedtune.storage.s3 import Bucket, S3Credentials

GROUP_VERSION = "fedtune.io/v1alpha1"
ACCEPTED_SPEC = "fedtune.io/accepted-spec"


class Wait(Exception):
    """A precondition does not hold yet; `reason`/`message` go into a condition."""

    def __init__(self, ctype: str, reason: str, message: str):
        super().__init__(message)
        self.ctype, self.reason, self.message = ctype, reason, message


class InvalidSpec(Exception):
    """The job cannot run as written; the user must change it."""


@dataclass
class Accepted:
    job: FederatedJob
    spec_raw: dict
    annotation: str | None  # new value for the accepted-spec annotation, when it changes
    rejected_change: str | None  # why a spec change was refused (job continues on the accepted spec)


def refused_generation(body: dict) -> int | None:
    """The generation whose spec was refused (Failed with InvalidSpec True), or None if it was not.

    The one test of "refused" for both callers: the daemon leaves a job alone while its refused
    generation is the current one, and reconcile judges an edited spec afresh.
    """
    st = body.get("status") or {}
    invalid = any(c.get("type") == INVALID_SPEC and c.get("status") == "True" for c in st.get("conditions", []))
    return st.get("observedGeneration") if invalid and st.get("phase") == "Failed" else None


def _status(body: dict) -> FederatedJobStatus | None:
    raw = {
        k: v
        for k, v in (body.get("status") or {}).items()
        if k in FederatedJobStatus.model_fields or k in {f.alias for f in FederatedJobStatus.model_fields.values()}
    }
    return FederatedJobStatus.model_validate(raw) if raw else None


def _model(body: dict, spec: dict) -> FederatedJob:
    meta = body["metadata"]
    return FederatedJob.model_validate(
        {
            "metadata": {k: meta[k] for k in ("name", "namespace", "uid", "generation") if k in meta},
            "spec": spec,
        }
    )


def accept_spec(body: dict) -> Accepted:
    """The spec the job runs on: the current one, unless a running job got a change it cannot take."""
    current = body.get("spec") or {}
    saved = (body["metadata"].get("annotations") or {}).get(ACCEPTED_SPEC)
    status = _status(body)
    if saved is None or status is None or status.phase == "Pending":
        try:
            job = _model(body, current)
        except ValidationError as exc:
            raise InvalidSpec(describe(exc, prefix="")) from None
        new = json.dumps(current, sort_keys=True)
        return Accepted(job, current, new if new != saved else None, None)
    accepted = json.loads(saved)
    if accepted == current:
        return Accepted(_model(body, accepted), accepted, None, None)
    ok, why = review_change(accepted, current, status.current_round)
    if ok:
        try:
            return Accepted(_model(body, current), current, json.dumps(current, sort_keys=True), None)
        except ValidationError as exc:
            why = describe(exc)
    return Accepted(_model(body, accepted), accepted, None, why)


async def load_parties(job: FederatedJob, kube: Kube) -> dict[str, Party]:
    """Every Party of the job, checked for existence, consent and readiness."""
    parties = {}
    for key in job.member_keys:
        ns, name = key.split("/", 1)
        raw = await kube.get(path(GROUP_VERSION, "parties", ns, name))
        if raw is None:
            field = "spec.evaluator" if key == job.evaluator_key else "spec.parties"
            raise Wait(
                "PartiesReady",
                "PartyMissing",
                f"Party {key} does not exist: onboard it (helm install the party chart in its namespace) "
                f"or fix {field}",
            )
        party = Party.model_validate({k: v for k, v in raw.items() if k != "status"})
        if not party.spec.consent.allows(ns, job.metadata.namespace):
            allowed = ", ".join(party.spec.consent.allowed_namespaces) or "only its own namespace"
            raise Wait(
                "PartiesReady",
                "ConsentDenied",
                f"Party {key} does not consent to jobs from namespace {job.metadata.namespace} "
                f"(spec.consent.allowedNamespaces: {allowed}); ask its owners to add it",
            )
        phase = (raw.get("status") or {}).get("phase")
        if phase != "Ready":
            raise Wait("PartiesReady", "PartyNotReady", f"Party {key} is not Ready yet (phase {phase or 'unknown'})")
        parties[key] = party
    return parties


async def read_credentials(kube: Kube, namespace: str, storage: StorageSpec, owner: str) -> S3Credentials:
    """S3 credentials from the Secret a storage spec names."""
    ref = storage.credentials_secret
    if ref is None:
        raise InvalidSpec(f"{owner}: spec.storage.credentialsSecret is required on Kubernetes")
    secret = await kube.get(path("v1", "secrets", namespace, ref.name))
    data = (secret or {}).get("data") or {}
    try:
        key = base64.b64decode(data[ref.access_key_field]).decode()
        sec = base64.b64decode(data[ref.secret_key_field]).decode()
    except KeyError:
        raise Wait(
            "PartiesReady",
            "CredentialsMissing",
            f"{owner}: Secret {namespace}/{ref.name} is missing or lacks keys {ref.access_key_field} "
            f"and {ref.secret_key_field}",
        ) from None
    return S3Credentials(key, sec)


async def buckets(job: FederatedJob, parties: dict[str, Party], kube: Kube) -> dict[str, Bucket]:
    """Bucket clients for every party and the coordinator, with their own credentials."""
    if job.spec.storage is None:
        raise InvalidSpec("spec.storage (the coordinator bucket, with credentialsSecret) is required on Kubernetes")
    # The first client built loads botocore's service model (~0.1 s of CPU): off the event loop.
    owner = f"FederatedJob {job.metadata.name}"
    creds = await read_credentials(kube, job.metadata.namespace, job.spec.storage, owner)
    out = {"coordinator": await asyncio.to_thread(Bucket, job.spec.storage, creds)}
    for key, party in parties.items():
        creds = await read_credentials(kube, party.metadata.namespace, party.spec.storage, f"Party {key}")
        out[key] = await asyncio.to_thread(Bucket, party.spec.storage, creds)
    return out


async def check_schedulable(job: FederatedJob, parties: dict[str, Party], kube: Kube, keys: list[str]) -> None:
    """Refuse to create pods that no node can hold: an Unschedulable condition instead of Pending forever."""
    nodes = await kube.list(path("v1", "nodes"))
    problems = []
    for key in keys:
        try:
            res = trainer_resources(job.spec, parties[key].spec.compute)
        except ValueError as exc:
            raise InvalidSpec(str(exc)) from None
        ok, reason = find_fitting_node(res, nodes, pod=f"the trainer pod of party {key}")
        if not ok:
            problems.append(reason)
    if problems:
        raise Wait("Unschedulable", "NoNodeFits", "; ".join(problems))
