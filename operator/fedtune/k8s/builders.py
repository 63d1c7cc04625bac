"""Pure builders of the Kubernetes objects behind one trainer or aggregator pod.

Each pod gets its own ServiceAccount, a mailbox Secret, and a Role + RoleBinding allowing that
ServiceAccount to read and write that one Secret and nothing else. Pods hold no storage
credentials: work arrives as a ticket with presigned URLs in the mailbox, read through the API
(never mounted, so the operator's writes are seen at once and no Secret volume exists).

Builders return plain manifest dicts and take a `PodContext`. They set no ownerReferences: the
handler adopts same-namespace children (`kopf.adopt`, or `owner_reference` below), while trainer
pods live in party namespaces, where an owner reference to the job cannot point (owner refs are
namespace-local); those are found by `names.job_selector` labels and removed by the job's finalizer.
"""

from __future__ import annotations

import base64
import copy
import json
from dataclasses import dataclass
from typing import Any, Literal

from fedtune.api.job import FederatedJob
from fedtune.api.launch import pod_command
from fedtune.api.party import Party
from fedtune.k8s import names
from fedtune.k8s.resources import PodResources, aggregator_resources, trainer_resources

TICKET_KEY = "ticket.json"
RECEIPT_KEY = "receipt.json"
RUN_AS = 1000
CACHE_DIR = "/var/cache/fedtune"
PodRole = Literal["party", "aggregator"]


@dataclass(frozen=True)
class PodContext:
    """What the builders need to know about one pod (role as in `python -m fedtune_trainer ROLE`)."""

    role: PodRole
    display_name: str  # FEDTUNE_NAME: prefixes the pod's log lines, as in local mode
    names: names.ChildNames
    labels: dict[str, str]
    image: str
    resources: PodResources


def trainer_context(job: FederatedJob, party: Party) -> PodContext:
    """Context of `party`'s trainer pod in `job` (ValueError when the batch does not fit its GPUs)."""
    meta = job.metadata
    return PodContext(
        role="party",
        display_name=party.metadata.name,
        names=names.trainer_names(meta.namespace, meta.name, party.key),
        labels=names.trainer_labels(meta.namespace, meta.name, meta.uid, party.key),
        image=job.spec.trainer_image,
        resources=trainer_resources(job.spec, party.spec.compute, model_params=job.spec.model.parameters),
    )


def aggregator_context(job: FederatedJob) -> PodContext:
    """Context of the job's aggregator pod."""
    meta = job.metadata
    return PodContext(
        role="aggregator",
        display_name="aggregator",
        names=names.aggregator_names(meta.namespace, meta.name),
        labels=names.aggregator_labels(meta.namespace, meta.name, meta.uid),
        image=job.spec.trainer_image,
        resources=aggregator_resources(job.spec.aggregator),
    )


def _metadata(ctx: PodContext, name: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "namespace": ctx.names.namespace, "labels": dict(ctx.labels), **extra}


def owner_reference(owner: dict[str, Any]) -> dict[str, Any]:
    """A controller ownerReference to `owner` (a manifest dict), for children in its namespace."""
    meta = owner.get("metadata") or {}
    if not meta.get("uid"):
        raise ValueError(f"{owner.get('kind')} {meta.get('name')!r} has no metadata.uid yet; read it back first")
    return {
        "apiVersion": owner["apiVersion"],
        "kind": owner["kind"],
        "name": meta["name"],
        "uid": meta["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def build_service_account(ctx: PodContext) -> dict[str, Any]:
    """The pod's own identity. No token is mounted by default; only the pod opts in."""
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": _metadata(ctx, ctx.names.service_account),
        "automountServiceAccountToken": False,
    }


def build_mailbox_role(ctx: PodContext) -> dict[str, Any]:
    """get/watch/patch/update on the pod's mailbox Secret only.

    `resourceNames` also authorises `watch` when the request names the object with
    `fieldSelector=metadata.name=<secret>` (a plain watch of all Secrets is refused); the pod
    resumes from the resourceVersion of a `get`, so it needs no `list`.
    """
    rule = {
        "apiGroups": [""],
        "resources": ["secrets"],
        "resourceNames": [ctx.names.secret],
        "verbs": ["get", "watch", "patch", "update"],
    }
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": _metadata(ctx, ctx.names.role),
        "rules": [rule],
    }


def build_role_binding(ctx: PodContext) -> dict[str, Any]:
    """Binds the mailbox Role to the pod's ServiceAccount."""
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": _metadata(ctx, ctx.names.role_binding),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": ctx.names.role},
        "subjects": [{"kind": "ServiceAccount", "name": ctx.names.service_account, "namespace": ctx.names.namespace}],
    }


def _encode(doc: dict[str, Any]) -> str:
    # Canonical JSON, so the same ticket always encodes to the same bytes (no-op re-applies).
    return base64.b64encode(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()).decode()


def build_ticket_patch(ticket: dict[str, Any]) -> dict[str, Any]:
    """A merge patch replacing the ticket and leaving the pod's receipt alone."""
    return {"data": {TICKET_KEY: _encode(ticket)}}


def build_mailbox_secret(ctx: PodContext, ticket: dict[str, Any] | None = None) -> dict[str, Any]:
    """The pod's mailbox, optionally holding its first ticket.

    `data` (base64) rather than `stringData`: stringData is write-only, so an object read back
    would never equal what was built. The receipt key is never written here, so re-applying
    the Secret cannot erase an answer the pod already gave.
    """
    writers = f"{TICKET_KEY}: the fedtune operator; {RECEIPT_KEY}: pod {ctx.names.pod}"
    secret: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": _metadata(ctx, ctx.names.secret, annotations={"fedtune.io/mailbox-writers": writers}),
        "type": "Opaque",
    }
    if ticket is not None:
        secret["data"] = build_ticket_patch(ticket)["data"]
    return secret


def _env(ctx: PodContext) -> list[dict[str, str]]:
    env = {
        "FEDTUNE_NAME": ctx.display_name,
        "FEDTUNE_CACHE": CACHE_DIR,
        # The root filesystem is read-only: every library that caches must write under CACHE_DIR.
        "HOME": "/tmp",
        "XDG_CACHE_HOME": CACHE_DIR,
        "HF_HOME": f"{CACHE_DIR}/huggingface",
        "TORCH_HOME": f"{CACHE_DIR}/torch",
        "TORCH_EXTENSIONS_DIR": f"{CACHE_DIR}/torch_extensions",  # DeepSpeed compiles ops here
        "TRITON_CACHE_DIR": f"{CACHE_DIR}/triton",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONUNBUFFERED": "1",  # log lines reach `kubectl logs` as they happen
        **ctx.resources.env,
    }
    return [{"name": k, "value": v} for k, v in sorted(env.items())]


def _volumes(ctx: PodContext) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    volumes: list[dict[str, Any]] = [{"name": "tmp", "emptyDir": {}}, {"name": "cache", "emptyDir": {}}]
    mounts = [{"name": "tmp", "mountPath": "/tmp"}, {"name": "cache", "mountPath": CACHE_DIR}]
    if ctx.resources.shm_size:
        volumes.append({"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": ctx.resources.shm_size}})
        mounts.append({"name": "shm", "mountPath": "/dev/shm"})
    return volumes, mounts


def _build_pod(ctx: PodContext, role: PodRole) -> dict[str, Any]:
    if ctx.role != role:
        raise ValueError(f"a {ctx.role} context cannot build the {role} pod")
    res = ctx.resources
    volumes, mounts = _volumes(ctx)
    container = {
        "name": "trainer" if role == "party" else "aggregator",
        "image": ctx.image,
        "imagePullPolicy": "IfNotPresent",
        "command": pod_command(role, ctx.names.mailbox_uri, res.world_size),
        "env": _env(ctx),
        "resources": res.container_resources(),
        "volumeMounts": mounts,
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "privileged": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
        },
    }
    spec: dict[str, Any] = {
        "serviceAccountName": ctx.names.service_account,
        # The token is the pod's only credential, and its Role reaches the mailbox alone.
        "automountServiceAccountToken": True,
        # Never: a failed pod stays failed, and the operator decides whether to recreate it
        # (with its own backoff) or to drop the party, instead of the kubelet restarting it
        # behind the round state machine's back.
        "restartPolicy": "Never",
        # Service links would inject every Service of the party's namespace as env vars.
        "enableServiceLinks": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUN_AS,
            "runAsGroup": RUN_AS,
            "fsGroup": RUN_AS,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": volumes,
    }
    if res.node_selector:
        spec["nodeSelector"] = dict(res.node_selector)
    if res.tolerations:
        spec["tolerations"] = [dict(t) for t in res.tolerations]
    if res.affinity:
        spec["affinity"] = copy.deepcopy(res.affinity)
    return {"apiVersion": "v1", "kind": "Pod", "metadata": _metadata(ctx, ctx.names.pod), "spec": spec}


def build_trainer_pod(ctx: PodContext) -> dict[str, Any]:
    """A party's long-lived trainer pod (model loaded once for the whole job)."""
    return _build_pod(ctx, "party")


def build_aggregator_pod(ctx: PodContext) -> dict[str, Any]:
    """The job's aggregator pod: CPU only, modest resources from spec.aggregator."""
    return _build_pod(ctx, "aggregator")


def build_pod_objects(ctx: PodContext, ticket: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every object of one pod, in creation order: identity and mailbox exist before the pod reads them."""
    pod = build_trainer_pod(ctx) if ctx.role == "party" else build_aggregator_pod(ctx)
    return [
        build_service_account(ctx),
        build_mailbox_role(ctx),
        build_role_binding(ctx),
        build_mailbox_secret(ctx, ticket),
        pod,
    ]
