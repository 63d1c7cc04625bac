"""GitOps: how Argo CD and Flux read fedtune's health, on statuses the operator's own code writes.

- Argo CD: examples/gitops/argocd-health.lua runs in a real Lua 5.1 (lupa), sandboxed the way
  Argo CD runs custom health scripts (util/lua/lua.go: base, table and a reduced os library only;
  `obj` decoded from the object's JSON; anything but a table with a known status code is Unknown),
  behind Argo CD's own checks (no object: Missing; deletionTimestamp: "Pending deletion").
- Flux: a small reference of kstatus (sigs.k8s.io/cli-utils pkg/kstatus/status, what Flux's
  health checks and `wait: true` compute) on the same objects.
- The statuses come from the operator: `reconcile` and `reconcile_party` (waits, consent,
  rejected spec changes, storage errors, against a real SeaweedFS), the round machine's
  `new_status`, and the condition helpers `mark_running` / `mark_succeeded` / `mark_halted`.
- The Argo CD Application, Flux Kustomization and argocd-cm patch parse, name what they must,
  and point at FederatedJob manifests that validate against the CRD.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from fedtune.api.job import FederatedJob
from fedtune.api.status import FederatedJobStatus
from fedtune.rounds import conditions as cond
from fedtune.rounds.machine import new_status
from test_crds import schema_errors

lupa = pytest.importorskip("lupa.lua51", reason="lupa is in the dev extra: pip install -e .[dev]")

ROOT = Path(__file__).resolve().parents[1]
GITOPS = ROOT / "examples" / "gitops"
SCRIPT = (GITOPS / "argocd-health.lua").read_text()
JOB_FILE = GITOPS / "jobs" / "triage-classifier.yaml"
PARTY_FILE = ROOT / "examples" / "k8s" / "party-hospital-a.yaml"
NOW = datetime(2025, 3, 4, 5, 6, 7, tzinfo=UTC)
ARGO_CODES = {"Healthy", "Progressing", "Degraded", "Suspended", "Missing", "Unknown"}


# -- Argo CD: the health script in Argo CD's Lua sandbox -------------------------------------------


def _to_lua(rt: Any, value: Any) -> Any:
    """JSON -> Lua the way Argo CD's decodeValue does: objects and arrays become tables, numbers doubles."""
    if isinstance(value, dict):
        table = rt.table()
        for k, v in value.items():
            if v is not None:
                table[k] = _to_lua(rt, v)
        return table
    if isinstance(value, list):
        table = rt.table()
        for i, v in enumerate(value, 1):
            table[i] = _to_lua(rt, v)
        return table
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return value


def run_health_script(obj: dict[str, Any], script: str = SCRIPT) -> dict[str, str]:
    """The script's answer for `obj`, or Unknown as Argo CD reports a failing or invalid script."""
    rt = lupa.LuaRuntime()
    # Argo CD opens only base, table, package and a "safe" os (time, date, clock): no string,
    # math, io, debug or coroutine, and so no string methods either.
    rt.execute(
        "getmetatable('').__index = nil "
        "os = {time = os.time, date = os.date, clock = os.clock} "
        "string, math, io, debug, coroutine = nil, nil, nil, nil, nil"
    )
    rt.globals().obj = _to_lua(rt, json.loads(json.dumps(obj)))
    try:
        result = rt.execute(script)
    except lupa.LuaError as exc:
        return {"status": "Unknown", "message": str(exc)}
    if lupa.lua_type(result) != "table":
        return {"status": "Unknown", "message": f"expect table output from Lua script, not {lupa.lua_type(result)}"}
    answer = {str(k): str(v) for k, v in result.items()}
    if answer.get("status") not in ARGO_CODES:
        return {"status": "Unknown", "message": "Lua returned an invalid health status"}
    return answer


def argo_health(obj: dict[str, Any] | None) -> dict[str, str]:
    """Argo CD's resource health: its own checks first (gitops-engine pkg/health), then the script."""
    if obj is None:
        return {"status": "Missing", "message": ""}
    if obj["metadata"].get("deletionTimestamp"):
        return {"status": "Progressing", "message": "Pending deletion"}
    return run_health_script(obj)


# -- Flux: kstatus ---------------------------------------------------------------------------------


def kstatus(obj: dict[str, Any] | None) -> str:
    """kstatus' status of a custom resource (status.Compute; no type-specific rules for our kinds)."""
    if obj is None:
        return "NotFound"
    meta, status = obj["metadata"], obj.get("status") or {}
    if meta.get("deletionTimestamp"):
        return "Terminating"
    observed = status.get("observedGeneration")
    if meta.get("generation") is not None and observed is not None and observed != meta["generation"]:
        return "InProgress"
    conditions = status.get("conditions") or []
    for c in conditions:  # in list order, as kstatus does
        if c["type"] == "Reconciling" and c["status"] == "True":
            return "InProgress"
        if c["type"] == "Stalled" and c["status"] == "True":
            return "Failed"
    for c in conditions:
        if c["type"] == "Ready":
            return "Current" if c["status"] == "True" else "InProgress"
    return "Current"  # no known condition at all: kstatus assumes the object is current


# -- objects with statuses the operator writes ------------------------------------------------------


class FakeKube:
    """The operator's Kube API, answering `get` from a dict of REST paths (the objects that exist)."""

    def __init__(self, objects: dict[str, dict] | None = None):
        self.objects = objects or {}

    async def get(self, path: str) -> dict | None:
        return copy.deepcopy(self.objects.get(path))


def job_body(status: FederatedJobStatus | dict | None = None, generation: int = 1) -> dict[str, Any]:
    """The GitOps example job as the API server returns it, with `status` (written by the operator)."""
    body = yaml.safe_load(JOB_FILE.read_text())
    body["metadata"].update(uid="0f1e2d3c-job", generation=generation)
    if status is not None:
        body["status"] = status if isinstance(status, dict) else status.to_wire()
    return body


def job_model() -> FederatedJob:
    return FederatedJob.model_validate({k: v for k, v in job_body().items() if k != "status"})


def party_body(status: dict | None = None, generation: int = 1, **storage: Any) -> dict[str, Any]:
    docs = list(yaml.safe_load_all(PARTY_FILE.read_text()))
    body = next(d for d in docs if d["kind"] == "Party")
    body["metadata"].update(uid="9a8b7c6d-party", generation=generation)
    body["spec"]["storage"].update(storage)
    if status is not None:
        body["status"] = status
    return body


def secret(namespace: str, name: str, access_key: str, secret_key: str) -> tuple[str, dict]:
    from fedtune.k8s.kube import path

    data = {k: base64.b64encode(v.encode()).decode() for k, v in
            {"accessKeyId": access_key, "secretAccessKey": secret_key}.items()}  # fmt: skip
    return path("v1", "secrets", namespace, name), {"metadata": {"name": name, "namespace": namespace}, "data": data}


def reconciled_job(body: dict[str, Any], objects: dict[str, dict] | None = None) -> dict[str, Any]:
    """`body` with the status one operator reconcile writes (for the paths that stop before any pod)."""
    pytest.importorskip("kubernetes", reason="the operator extra: pip install -e .[operator]")
    from fedtune.k8s.reconcile import reconcile
    from fedtune.k8s.settings import OperatorSettings

    out = asyncio.run(reconcile(body, FakeKube(objects), OperatorSettings(), NOW))
    return {**body, "status": out.status.to_wire()}


def reconciled_party(body: dict[str, Any], objects: dict[str, dict] | None = None) -> dict[str, Any]:
    """`body` with the status the operator's Party handler writes."""
    pytest.importorskip("kubernetes", reason="the operator extra: pip install -e .[operator]")
    from fedtune.k8s.party_status import reconcile_party

    st = asyncio.run(reconcile_party(body, FakeKube(objects), NOW))
    return {**body, "status": st.to_wire()}


def running(round_: int = 2) -> FederatedJobStatus:
    st = new_status(job_model(), NOW)
    st.current_round, st.stage = round_, "training"
    cond.mark_running(st, f"round {round_}/8, attempt 0", NOW)
    return st


def succeeded() -> FederatedJobStatus:
    st = running(8)
    st.stage, st.final_adapter = "done", "s3://coordinator-fedtune/fedtune/0f1e2d3c-job/final/"
    cond.mark_succeeded(st, f"8 round(s) done; final adapter at {st.final_adapter}", NOW)
    return st


def quorum_lost() -> FederatedJobStatus:
    st = running(3)
    msg = "1 parties left, spec.minParties=2"
    cond.set_condition(st, cond.QUORUM_LOST, "True", cond.QUORUM_LOST, msg, NOW)
    cond.mark_halted(st, "Failed", cond.QUORUM_LOST, msg, NOW)
    return st


def invalid_spec() -> FederatedJobStatus:
    """What the operator writes for a spec it cannot run (operator._fail_invalid)."""
    st = FederatedJobStatus(observed_generation=1)
    msg = "spec.storage (the coordinator bucket, with credentialsSecret) is required on Kubernetes"
    cond.set_condition(st, cond.INVALID_SPEC, "True", cond.INVALID_SPEC, msg, NOW)
    cond.mark_halted(st, "Failed", cond.INVALID_SPEC, msg, NOW)
    return st


def parties_dropped() -> FederatedJobStatus:
    st = running(4)
    cond.set_condition(st, cond.DEGRADED, "True", "PartiesDropped", "dropped: hospital-b/hospital-b", NOW)
    return st


def party_missing() -> dict[str, Any]:
    return reconciled_job(job_body())


def consent_denied() -> dict[str, Any]:
    from fedtune.k8s.kube import path

    party = party_body()
    party["spec"]["consent"] = {"allowedNamespaces": ["another-coordinator"]}
    return reconciled_job(job_body(), {path("fedtune.io/v1alpha1", "parties", "hospital-a", "hospital-a"): party})


def spec_change_rejected() -> dict[str, Any]:
    """A running job whose model was changed in Git: the operator keeps the accepted spec."""
    from fedtune.k8s.preconditions import ACCEPTED_SPEC

    body = job_body(running(3), generation=2)
    body["metadata"]["annotations"] = {ACCEPTED_SPEC: json.dumps(body["spec"], sort_keys=True)}
    body["spec"]["model"]["source"] = "s3://research-models/deberta-v3-large/"
    return reconciled_job(body)


def stale(status: FederatedJobStatus) -> dict[str, Any]:
    return job_body(status, generation=2)  # spec edited after the operator wrote this status


def deleting(status: FederatedJobStatus) -> dict[str, Any]:
    body = job_body(status)
    body["metadata"].update(deletionTimestamp="2025-03-04T06:00:00Z", finalizers=["fedtune.io/cleanup"])
    return body


JOB_CASES = {
    # name: (object factory, Argo CD health, kstatus, a fragment of Argo CD's message)
    "created, no status yet": (lambda: job_body(), "Progressing", "Current", "waiting for the fedtune operator"),
    "pending: party missing": (party_missing, "Progressing", "InProgress", "does not exist"),
    "pending: consent denied": (consent_denied, "Progressing", "InProgress", "does not consent"),
    "running: loading models": (lambda: job_body(new_status(job_model(), NOW)), "Progressing", "InProgress", "loading"),
    "running: round 2": (lambda: job_body(running()), "Progressing", "InProgress", "Running: round 2/8"),
    "running: a party dropped": (lambda: job_body(parties_dropped()), "Progressing", "InProgress", "dropped:"),
    "succeeded": (lambda: job_body(succeeded()), "Healthy", "Current", "final adapter at s3://"),
    "failed: quorum lost": (lambda: job_body(quorum_lost()), "Degraded", "Failed", "spec.minParties=2"),
    "failed: invalid spec": (lambda: job_body(invalid_spec()), "Degraded", "Failed", "spec.storage"),
    # kstatus has no notion of a refused change: Flux sees the job still running.
    "spec change rejected": (spec_change_rejected, "Degraded", "InProgress", "spec change rejected"),
    "stale status": (lambda: stale(succeeded()), "Progressing", "InProgress", "generation 2"),
    "deleting": (lambda: deleting(running()), "Progressing", "Terminating", "Pending deletion"),
    "not in the cluster": (lambda: None, "Missing", "NotFound", ""),
}


@pytest.mark.parametrize("name", list(JOB_CASES))
def test_federatedjob_health(name):
    factory, argo, flux, fragment = JOB_CASES[name]
    obj = factory()
    health = argo_health(obj)
    assert (health["status"], kstatus(obj)) == (argo, flux), health
    assert fragment in health["message"], health


def test_federatedjob_statuses_are_what_the_crd_keeps():
    """The statuses above are real: the CRD's schema accepts each (nothing would be pruned)."""
    for name, (factory, *_) in JOB_CASES.items():
        obj = factory()
        if obj is not None:
            assert schema_errors("FederatedJob", obj) == [], name


def test_party_health(s3world):
    alice, bob = s3world.creds("alice"), s3world.creds("bob")
    storage = {"endpoint": s3world.endpoint, "bucket": "alice-bkt", "region": "us-east-1"}
    good = dict([secret("hospital-a", "s3-credentials", alice.access_key_id, alice.secret_access_key)])
    wrong = dict([secret("hospital-a", "s3-credentials", bob.access_key_id, bob.secret_access_key)])
    cases = [
        # (object, Argo CD health, kstatus, message fragment)
        (party_body(**storage), "Progressing", "Current", "waiting for the fedtune operator"),
        (reconciled_party(party_body(**storage), good), "Healthy", "Current", "reachable"),
        # a broken Party is Stalled: Flux fails it at once instead of waiting for its timeout
        (reconciled_party(party_body(**storage)), "Degraded", "Failed", "is missing"),
        (reconciled_party(party_body(**storage), wrong), "Degraded", "Failed", "alice-bkt"),
        ({**reconciled_party(party_body(**storage), good), "metadata": {**party_body()["metadata"], "generation": 3}},
         "Progressing", "InProgress", "generation 3"),
    ]  # fmt: skip
    for obj, argo, flux, fragment in cases:
        health = argo_health(obj)
        assert (health["status"], kstatus(obj)) == (argo, flux), (health, obj.get("status"))
        assert fragment in health["message"], health
        assert schema_errors("Party", obj) == []


def test_sandbox_is_argo_cds():
    """The harness is not laxer than Argo CD: string/math libraries are absent, bad answers are Unknown."""
    obj = job_body(running())
    assert run_health_script(obj, "return {status = string.format('%s', 'Healthy')}")["status"] == "Unknown"
    assert run_health_script(obj, "return {status = ('x'):upper()}")["status"] == "Unknown"
    assert run_health_script(obj, "return {status = 'Fine'}") == {
        "status": "Unknown",
        "message": "Lua returned an invalid health status",
    }
    assert run_health_script(obj, "return 'Healthy'")["status"] == "Unknown"
    assert run_health_script(obj, "return {status = 'Healthy', message = tostring(os.time() > 0)}")["status"] == (
        "Healthy"
    )


def test_script_names_every_condition_it_reads_as_the_operator_does():
    for ctype in (cond.READY, cond.RECONCILING, cond.STALLED, cond.DEGRADED, "SpecChangeRejected"):
        assert f'"{ctype}"' in SCRIPT, ctype


# -- the manifests ---------------------------------------------------------------------------------


def documents(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((GITOPS / name).read_text()) if d]


def test_argocd_cm_patch_embeds_the_script_for_both_kinds():
    (cm,) = documents("argocd-cm-patch.yaml")
    assert (cm["apiVersion"], cm["kind"], cm["metadata"]["name"]) == ("v1", "ConfigMap", "argocd-cm")
    assert cm["data"] == {
        "resource.customizations.health.fedtune.io_FederatedJob": SCRIPT,
        "resource.customizations.health.fedtune.io_Party": SCRIPT,
    }, "argocd-cm-patch.yaml differs from argocd-health.lua: paste the script into both keys again"
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    kubernetes_validate.validate(cm, "1.30", strict=True)


def job_manifests(path: Path) -> list[dict[str, Any]]:
    """The documents of a job file, or of every job file in a directory: FederatedJobs only."""
    files = sorted(path.glob("*.yaml")) if path.is_dir() else [path]
    docs = [d for f in files for d in yaml.safe_load_all(f.read_text()) if d]
    assert docs and all(d["kind"] == "FederatedJob" for d in docs), path
    return docs


def test_argocd_application():
    (app,) = documents("argocd-application.yaml")
    assert (app["apiVersion"], app["kind"]) == ("argoproj.io/v1alpha1", "Application")
    assert app["metadata"]["name"] and app["metadata"]["namespace"] == "argocd"
    spec = app["spec"]
    assert spec["project"] and spec["source"]["repoURL"] and spec["source"]["targetRevision"]
    assert spec["destination"]["server"] or spec["destination"]["name"]
    jobs = job_manifests(ROOT / spec["source"]["path"])
    assert {j["metadata"]["namespace"] for j in jobs} == {spec["destination"]["namespace"]}
    assert set(spec["syncPolicy"]["automated"]) <= {"prune", "selfHeal", "allowEmpty"}


def test_flux_kustomization():
    docs = {d["kind"]: d for d in documents("flux-kustomization.yaml")}
    repo, ks = docs["GitRepository"], docs["Kustomization"]
    assert repo["apiVersion"] == "source.toolkit.fluxcd.io/v1"
    assert repo["spec"]["url"] and repo["spec"]["interval"] and repo["spec"]["ref"]
    assert ks["apiVersion"] == "kustomize.toolkit.fluxcd.io/v1"
    spec = ks["spec"]
    for key in ("interval", "sourceRef", "path", "prune", "timeout"):  # interval, sourceRef, prune: required
        assert key in spec, key
    assert spec["sourceRef"] == {"kind": "GitRepository", "name": repo["metadata"]["name"]}
    assert spec["path"].startswith("./")
    job_manifests(ROOT / spec["path"])
    checked = spec.get("wait") or any(h["kind"] == "FederatedJob" for h in spec.get("healthChecks", []))
    assert checked, "the Kustomization must health-check its FederatedJobs (wait: true or healthChecks)"
    (app,) = documents("argocd-application.yaml")
    assert (repo["spec"]["url"], spec["path"].removeprefix("./")) == (
        app["spec"]["source"]["repoURL"],
        app["spec"]["source"]["path"],
    ), "Argo CD and Flux examples should sync the same repository path"


@pytest.mark.parametrize("path", sorted((GITOPS / "jobs").glob("*.yaml")), ids=lambda p: p.name)
def test_gitops_jobs_validate(path):
    for doc in job_manifests(path):
        assert schema_errors("FederatedJob", doc) == []
        FederatedJob.model_validate(doc)  # what the operator parses
