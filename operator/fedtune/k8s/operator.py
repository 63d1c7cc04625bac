"""The fedtune operator: kopf handlers only. Run with `kopf run -A -m fedtune.k8s.operator`.

Each handler parses, delegates to pure/async modules, and applies the result:
- Party: create/resume/update -> `party_status.reconcile_party` (bucket reachable with its credentials).
- FederatedJob: a daemon per job runs `reconcile.reconcile` whenever a mailbox Secret or a pod of
  the job changes (watch events), and at least every `resync_seconds` (deadlines).
- FederatedJob delete: children in every party namespace are removed (finalizer), since owner
  references cannot cross namespaces.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable
from datetime import UTC, datetime

import kopf
from kubernetes.client.rest import ApiException

from fedtune.api.receipts import Rejections
from fedtune.k8s import metrics
from fedtune.k8s.kube import Kube, api_client, path
from fedtune.k8s.names import LABEL_JOB, LABEL_JOB_NAMESPACE, LABEL_MANAGED_BY, job_selector
from fedtune.k8s.party_status import reconcile_party
from fedtune.k8s.preconditions import InvalidSpec, refused_generation
from fedtune.k8s.reconcile import pending_status, reconcile
from fedtune.k8s.settings import OperatorSettings
from fedtune.rounds import conditions as cond

GROUP, VERSION = "fedtune.io", "v1alpha1"
FORBIDDEN = "Forbidden"  # the reason on a job's Ready/Reconciling while the API server refuses the operator
SETTINGS = OperatorSettings.from_env()
log = logging.getLogger("fedtune.operator")
_wakers: dict[tuple[str, str], asyncio.Event] = {}
_kube: Kube | None = None


def utcnow() -> datetime:
    return datetime.now(UTC)


def kube() -> Kube:
    global _kube
    if _kube is None:
        _kube = Kube(api_client(SETTINGS.kube_api))
    return _kube


if SETTINGS.kube_api:  # development and tests: an insecure API server URL instead of kubeconfig

    @kopf.on.login()
    def login(**_) -> kopf.ConnectionInfo:
        return kopf.ConnectionInfo(server=SETTINGS.kube_api, insecure=True)


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, **_) -> None:
    global _kube
    _kube = None  # a fresh client per operator run (a restarted operator may face another API server)
    settings.persistence.finalizer = "fedtune.io/cleanup"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="fedtune.io")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix="fedtune.io")
    settings.watching.server_timeout = SETTINGS.watch_server_timeout
    settings.watching.client_timeout = SETTINGS.watch_client_timeout
    settings.posting.level = logging.WARNING
    if SETTINGS.metrics_port:
        metrics.serve(SETTINGS.metrics_port)
    metrics.LEADER.set(1)  # kopf runs: this replica drives jobs (the only one, with leader election)


@kopf.on.probe(id="jobs")
def probe_jobs(**_) -> int:
    """Liveness detail: how many jobs this operator is driving."""
    return len(_wakers)


@kopf.on.resume(GROUP, VERSION, "parties")
@kopf.on.create(GROUP, VERSION, "parties")
@kopf.on.update(GROUP, VERSION, "parties", field="spec")
async def party_changed(body: kopf.Body, patch: kopf.Patch, **_) -> None:
    st = await reconcile_party(dict(body), kube(), utcnow())
    patch.status.update(st.to_wire())
    metrics.PARTY_READY.labels(party=f"{body.metadata.namespace}/{body.metadata.name}").set(st.phase == "Ready")
    if st.phase != "Ready":
        raise kopf.TemporaryError(st.conditions[-1].message, delay=30)


@kopf.on.event("", "v1", "secrets", labels={LABEL_MANAGED_BY: "fedtune-operator"})
@kopf.on.event("", "v1", "pods", labels={LABEL_MANAGED_BY: "fedtune-operator"})
def child_changed(body: kopf.Body, **_) -> None:
    """A mailbox or pod of a job changed: wake that job's daemon now instead of at the next resync."""
    labels = body.metadata.labels
    waker = _wakers.get((labels.get(LABEL_JOB_NAMESPACE, ""), labels.get(LABEL_JOB, "")))
    if waker is not None:
        waker.set()


@kopf.daemon(GROUP, VERSION, "federatedjobs", cancellation_timeout=10)
async def drive_job(name: str, namespace: str, stopped: kopf.DaemonStopped, **_) -> None:
    """Reconcile the job until it ends; level-triggered, so a restart simply carries on."""
    key = (namespace, name)
    waker = _wakers.setdefault(key, asyncio.Event())
    rejections = Rejections()  # the job's refused receipts, each an event once
    first = True
    try:
        while not stopped:
            body = None
            try:
                body = await kube().get(path(f"{GROUP}/{VERSION}", "federatedjobs", namespace, name))
                if body is None or body["metadata"].get("deletionTimestamp"):
                    return
                if first:
                    _say_taking_over(body)
                    first = False
                refused = refused_generation(body)
                if refused is not None and refused == body["metadata"].get("generation"):
                    done = False  # refused and not edited since: nothing to do until it is
                else:
                    done = await _reconcile_once(body, rejections)
            except InvalidSpec as exc:
                # Said once per generation (condition + event); the daemon stays to see a corrected spec.
                await _reported(_fail_invalid(body, str(exc)), namespace, name)
                done = False
            except ApiException as exc:
                if exc.status not in (401, 403):  # a hiccup (429, 5xx, a conflict): retry at the next resync
                    log.warning(
                        "reconcile of %s/%s: the API server answered %s (%s); retrying in %.1fs",
                        namespace,
                        name,
                        exc.status,
                        _api_message(exc),
                        SETTINGS.resync_seconds,
                    )
                elif body is not None:
                    await _reported(_report_forbidden(body, exc), namespace, name)
                else:
                    log.error("the operator may not read FederatedJob %s/%s: %s", namespace, name, _api_message(exc))
                done = False
            except Exception:  # noqa: BLE001 - an API or S3 hiccup: retry at the next resync, not after kopf's 60 s
                log.exception("reconcile of %s/%s failed; retrying in %.1fs", namespace, name, SETTINGS.resync_seconds)
                done = False
            if done:
                return
            waker.clear()
            try:
                await asyncio.wait_for(waker.wait(), timeout=SETTINGS.resync_seconds)
            except TimeoutError:
                pass
    finally:
        _wakers.pop(key, None)


def _say_taking_over(body: dict) -> None:
    """A job already running when this operator starts driving it was left by another operator run (it was
    restarted, killed, or replaced): say where it is taken over, for the log to explain the gap."""
    st = body.get("status") or {}
    if st.get("phase") == "Running":
        meta = body["metadata"]
        log.info(
            "FederatedJob %s/%s was Running before this operator drove it: taking over at round %s/%s (%s, attempt %s)",
            meta["namespace"],
            meta["name"],
            st.get("currentRound", 0),
            (body.get("spec") or {}).get("rounds", "?"),
            st.get("stage", "?"),
            st.get("attempt", 0),
        )


async def _reconcile_once(body: dict, rejections: Rejections) -> bool:
    """One reconcile and its writes. True when the job is over and every pod was told to exit."""
    meta = body["metadata"]
    out = await reconcile(body, kube(), SETTINGS, utcnow(), rejections)
    url = path(f"{GROUP}/{VERSION}", "federatedjobs", meta["namespace"], meta["name"])
    new, old = out.status.to_wire(), body.get("status") or {}
    if new != old:
        # A merge patch keeps the keys it does not name: a field the status cleared (None, left out of
        # the wire form) is named null, or it would come back at the next pass (storageUnavailableSince).
        cleared = {key: None for key in old if key not in new}
        await kube().patch(url + "/status", {"status": {**new, **cleared}})
    if out.annotations:
        await kube().patch(url, {"metadata": {"annotations": out.annotations}})
    for e in out.events:
        kopf.event(body, type=e.type, reason=e.reason, message=e.message[:1000])
    metrics.observe_job(meta["namespace"], meta["name"], out.status, out.events)
    return out.status.phase in ("Succeeded", "Failed") and out.status.stage == "done"


async def _fail_invalid(body: dict, message: str) -> None:
    meta = body["metadata"]
    st = dict(body.get("status") or {})
    from fedtune.api.status import FederatedJobStatus

    status = FederatedJobStatus(observed_generation=meta.get("generation"))
    now = utcnow()
    cond.set_condition(status, cond.INVALID_SPEC, "True", cond.INVALID_SPEC, message, now)
    cond.mark_halted(status, "Failed", cond.INVALID_SPEC, message, now)
    if st.get("phase") in (None, "Pending", "Failed"):  # never over a running job's status
        url = path(f"{GROUP}/{VERSION}", "federatedjobs", meta["namespace"], meta["name"])
        await kube().patch(url + "/status", {"status": status.to_wire()})
    kopf.event(body, type="Warning", reason=cond.INVALID_SPEC, message=message[:1000])


def _api_message(exc: ApiException) -> str:
    """The API server's own words for a refusal (its Status message), else the HTTP reason."""
    try:
        return json.loads(exc.body)["message"]
    except (TypeError, ValueError, KeyError):
        return f"HTTP {exc.status} {exc.reason or ''}".strip()


async def _reported(report: Awaitable[None], namespace: str, name: str) -> None:
    """Write a report onto the job. One that fails itself (refused too, an API hiccup, anything) is
    logged in a line and tried again at the next resync, instead of ending the daemon into kopf's backoff."""
    try:
        await report
    except Exception as exc:  # noqa: BLE001 - the daemon must go on: the next pass reports again
        why = _api_message(exc) if isinstance(exc, ApiException) else f"{type(exc).__name__}: {exc}"
        log.error("could not record that on FederatedJob %s/%s: %s", namespace, name, why)


async def _report_forbidden(body: dict, exc: ApiException) -> None:
    """The API server refused the operator something (RBAC): say so on the job, not only in the log.

    The job's other conditions would otherwise keep describing an earlier wait; Ready=False with
    reason Forbidden names what was refused and the fix (reconcile puts them back once a pass gets
    through). A job that has ended keeps its outcome: the log says what was refused."""
    meta = body["metadata"]
    message = (
        f"the API server refused the operator: {_api_message(exc)}; grant it with the operator chart's RBAC "
        "(rbac.create) or, with rbac.clusterWide=false, the party chart's operatorAccess in that namespace"
    )
    log.error("reconcile of %s/%s: %s", meta["namespace"], meta["name"], message)
    if (body.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
        return
    now = utcnow()
    status = pending_status(body, now)
    cond.set_condition(status, cond.READY, "False", FORBIDDEN, message, now)
    cond.set_condition(status, cond.RECONCILING, "True", FORBIDDEN, message, now)
    status.message = message
    new = status.to_wire()
    if new != body.get("status"):
        url = path(f"{GROUP}/{VERSION}", "federatedjobs", meta["namespace"], meta["name"])
        await kube().patch(url + "/status", {"status": new})


@kopf.on.delete(GROUP, VERSION, "federatedjobs")
async def job_deleted(name: str, namespace: str, spec: kopf.Spec, **_) -> None:
    """Remove the job's children in every namespace (owner references cannot cross namespaces)."""
    selector = job_selector(namespace, name)
    members = [*spec.get("parties", []), *([spec["evaluator"]] if spec.get("evaluator") else [])]
    party_namespaces = {p.get("namespace") or namespace for p in members} | {namespace}
    for ns in sorted(party_namespaces):
        for plural, api in (
            ("pods", "v1"),
            ("secrets", "v1"),
            ("rolebindings", "rbac.authorization.k8s.io/v1"),
            ("roles", "rbac.authorization.k8s.io/v1"),
            ("serviceaccounts", "v1"),
        ):
            for obj in await kube().list(path(api, plural, ns), labels=selector):
                await kube().delete(path(api, plural, ns, obj["metadata"]["name"]))
    metrics.forget_job(namespace, name)
