"""Real clients against the session's real API server (tests/kube.py): `helm install` of both charts
(the operator chart by a cluster admin, the party chart by the organisation's namespace admin),
`kubectl get`, `explain` and `wait` on what the real operator wrote, and the server pruning status
fields the CRDs do not know. helm and kubectl log in with a kubeconfig of each identity.
"""

from __future__ import annotations

import json
import re
import subprocess
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from subprocess import CompletedProcess
from urllib.parse import urlparse

import pytest
import yaml
from kube import ROOT, Identity, Kube, KubeTest, helm, kubectl, secret_doc
from operator_world import condition, make_world, pods_of, status
from toy_data import toy_jsonl

OPERATOR_CHART, PARTY_CHART = ROOT / "helm" / "fedtune-operator", ROOT / "helm" / "fedtune-party"
RBAC = "rbac.authorization.k8s.io/v1/"
pytestmark = pytest.mark.usefixtures("fast_operator")


def run(client: Kube, tool: str, *args: str, stdin: str | None = None, timeout: float = 120) -> CompletedProcess:
    """helm or kubectl as `client`'s identity (its kubeconfig)."""
    binary = {"helm": helm(), "kubectl": kubectl()}[tool]
    return subprocess.run(
        [binary, "--kubeconfig", str(client.kubeconfig), *args],
        input=stdin, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def ok(client: Kube, tool: str, *args: str, stdin: str | None = None, timeout: float = 120) -> str:
    """stdout of a command that must succeed (else the test fails with its stderr)."""
    out = run(client, tool, *args, stdin=stdin, timeout=timeout)
    assert out.returncode == 0, f"{tool} {' '.join(args)}: {out.stderr}"
    return out.stdout


def table(text: str) -> list[dict[str, str]]:
    """kubectl's default table output as one dict per row, keyed by column header."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    header = re.split(r"\s{2,}", lines[0].strip())
    return [dict(zip(header, re.split(r"\s{2,}", ln.strip()), strict=True)) for ln in lines[1:]]


def server_dry_run(client: Kube, release: str, chart: Path, namespace: str, *args: str) -> CompletedProcess:
    """`helm install --dry-run=server`, then `kubectl apply --dry-run=server` of what it rendered.

    Helm's server dry run only looks objects up (it sends none of them: nothing is validated or
    admitted); kubectl's has the API server validate and admit each one as `client` (schemas,
    RBAC, escalation prevention, quotas), storing nothing.
    """
    release_doc = json.loads(ok(client, "helm", "install", "--dry-run=server", "-o", "json", release, str(chart),
                                "-n", namespace, *args))  # fmt: skip
    assert release_doc["info"]["status"] == "pending-install"
    return run(client, "kubectl", "apply", "--dry-run=server", "-f", "-", stdin=release_doc["manifest"])


def namespace_admin(kube: KubeTest, namespace: str) -> Kube:
    """A user whose only rights are the built-in `admin` ClusterRole bound in `namespace`: the usual
    tenant admin. (A ServiceAccount of that namespace, for a token the API server authenticates.)"""
    meta = {"name": "org-admin", "namespace": namespace}
    kube.create({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta})
    kube.create({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
        "metadata": meta,
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "admin"},
        "subjects": [{"kind": "ServiceAccount", "name": "org-admin", "namespace": namespace}],
    })  # fmt: skip
    token = kube.token_for(namespace, "org-admin")
    return kube.as_identity(Identity(f"system:serviceaccount:{namespace}:org-admin", token=token))


# --- helm: both charts, as a cluster admin and an organisation's admin install them ---------------


@dataclass
class Install:
    """What `install_charts` made: namespaces, names, and the party's admin."""

    ops: str  # the operator chart's namespace
    hub: str  # the coordinator namespace the operator serves
    org: str  # alice's namespace, where her admin installed the party chart
    operator: str  # the operator chart's full name (ServiceAccount, ClusterRoles, Deployment…)
    prefix: str  # where alice's data is in her bucket
    org_admin: Kube

    @property
    def operator_identity(self) -> Identity:
        return Identity(f"system:serviceaccount:{self.ops}:{self.operator}")


def party_values(kube: KubeTest, s3world, ops: str, operator: str, hub: str, prefix: str) -> Path:
    """The party chart's values for alice: her bucket on the test S3 server, consent for the hub."""
    values = {
        "name": "alice",
        "displayName": "Alice's clinic",
        "storage": {"endpoint": s3world.endpoint, "bucket": "alice-bkt", "credentialsSecret": {"name": "s3"}},
        "data": {"trainKey": f"{prefix}/train.jsonl", "evalKey": f"{prefix}/eval.jsonl"},
        "compute": {"cpu": "1", "memory": "1Gi"},
        "consent": {"allowedNamespaces": [hub]},
        "operatorAccess": {"serviceAccount": {"namespace": ops, "name": operator}},
        "networkPolicy": {
            "storageEndpoints": [{"cidr": "127.0.0.1/32", "port": urlparse(s3world.endpoint).port}],
            "apiServerEndpoints": [{"cidr": "127.0.0.1/32", "port": urlparse(kube.url).port}],
        },
    }
    path = kube.workdir / "alice-values.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def install_charts(kube: KubeTest, s3world) -> Install:
    """The operator chart by the cluster admin (namespaced RBAC: it serves the hub and alice's
    namespace), then the party chart by alice's namespace admin, each after a server dry run."""
    ops, hub, org = kube.namespace("ops"), kube.namespace("hub"), kube.namespace("org-alice")
    operator, prefix = f"fedtune-operator-{kube.test_id}", f"helm-{uuid.uuid4().hex[:8]}"
    # Cluster-scoped objects of the release, removed at the end even if the test fails before uninstall.
    kube.objects += [(f"{RBAC}clusterroles", None, f"{operator}{s}") for s in ("", "-view", "-edit", "-admin")]
    kube.objects += [(f"{RBAC}clusterrolebindings", None, operator)]
    operator_args = [
        "--set", f"fullnameOverride={operator}",
        "--set", "rbac.clusterWide=false",
        "--set-json", f"watchNamespaces={json.dumps([hub, org])}",
        "--set-json", f"rbac.coordinatorNamespaces={json.dumps([hub])}",
    ]  # fmt: skip
    dry = server_dry_run(kube, f"op-{kube.test_id}", OPERATOR_CHART, ops, *operator_args)
    assert dry.returncode == 0, dry.stderr
    assert f"clusterrole.rbac.authorization.k8s.io/{operator} created (server dry run)" in dry.stdout
    assert kube.get("serviceaccounts", ops, operator) is None  # nothing stored
    ok(kube, "helm", "install", f"op-{kube.test_id}", str(OPERATOR_CHART), "-n", ops, *operator_args)

    # Every optional feature of the party chart passes the server: the cluster admin's dry run.
    all_features = ("-f", str(PARTY_CHART / "ci" / "all-features-values.yaml"))
    dry = server_dry_run(kube, "hospital", PARTY_CHART, org, *all_features)
    assert dry.returncode == 0 and "party.fedtune.io/hospital-a created (server dry run)" in dry.stdout, dry.stderr
    # Alice's admin may not cap her own namespace: the chart's quota options are for cluster admins.
    # (A server dry run cannot check her RoleBinding: the Role it binds is not stored, so not found.)
    org_admin = namespace_admin(kube, org)
    dry = server_dry_run(org_admin, "hospital", PARTY_CHART, org, *all_features)
    assert dry.returncode != 0 and 'cannot create resource "resourcequotas"' in dry.stderr, dry.stderr
    assert 'cannot create resource "limitranges"' in dry.stderr and kube.get("parties", org, "hospital-a") is None

    # Alice's admin installs the chart: the Secret out of band (the chart never needs the keys), then
    # the release; the operator chart added Parties to the `admin` role she holds here.
    creds = s3world.creds("alice")
    ok(org_admin, "kubectl", "create", "secret", "generic", "s3", "-n", org,
       f"--from-literal=accessKeyId={creds.access_key_id}",
       f"--from-literal=secretAccessKey={creds.secret_access_key}")  # fmt: skip
    alice = ("-f", str(PARTY_CHART / "ci" / "minimal-values.yaml"),
             "-f", str(party_values(kube, s3world, ops, operator, hub, prefix)))  # fmt: skip
    ok(org_admin, "helm", "install", "alice", str(PARTY_CHART), "-n", org, *alice)
    for split, n, seed in (("train", 48, 0), ("eval", 16, 100)):
        s3world.bucket("alice").put_bytes(f"{prefix}/{split}.jsonl", toy_jsonl(n, seed=seed))
    return Install(ops, hub, org, operator, prefix, org_admin)


def test_helm_installs_both_charts_and_the_server_stores_what_they_render(kube, s3world):
    inst = install_charts(kube, s3world)

    # The operator chart: its ServiceAccount, a read-only ClusterRole bound to it, a Role in the hub.
    assert kube.get("serviceaccounts", inst.ops, inst.operator)
    cluster_role = kube.get(f"{RBAC}clusterroles", None, inst.operator)
    assert {v for r in cluster_role["rules"] for v in r["verbs"]} <= {"get", "list", "watch"}
    binding = kube.get(f"{RBAC}clusterrolebindings", None, inst.operator)
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": inst.operator, "namespace": inst.ops}]
    hub_role = kube.get(f"{RBAC}roles", inst.hub, inst.operator)
    assert any("federatedjobs/status" in r["resources"] and "patch" in r["verbs"] for r in hub_role["rules"])
    assert kube.get(f"{RBAC}roles", inst.org, inst.operator) is None  # the party chart grants that one
    # ... and fedtune's resources in the built-in roles, once the aggregation controller has merged them.
    kube.wait_for(
        lambda: any("parties" in r.get("resources", []) and "create" in r["verbs"]
                    for r in kube.get(f"{RBAC}clusterroles", None, "admin")["rules"]),
        what="Parties in the built-in admin role",
    )  # fmt: skip
    # A job's status is the operator's: no namespace admin may write it (nor does the party chart's
    # Role in alice's namespace, where no job lives, ask it for the operator).
    admin_rules = kube.get(f"{RBAC}clusterroles", None, "admin")["rules"]
    assert not [r for r in admin_rules if "federatedjobs/status" in r.get("resources", []) and "patch" in r["verbs"]]
    party_role = kube.get(f"{RBAC}roles", inst.org, "alice-fedtune-operator")
    assert not [r for r in party_role["rules"] if "federatedjobs/status" in r["resources"]]

    # The Deployment is stored (nothing runs it here); its pod passes PodSecurity `restricted`, which
    # the API server enforces on pods only: a server-side dry run of the pod in the chart's namespace.
    deployment = kube.get("deployments", inst.ops, inst.operator)
    # Two replicas by default, electing their leader through a Lease their Role names, in their namespace.
    assert deployment["spec"]["replicas"] == 2 and deployment["spec"]["strategy"]["type"] == "RollingUpdate"
    lease_role = kube.get(f"{RBAC}roles", inst.ops, f"{inst.operator}-leader-election")
    assert [r.get("resourceNames") for r in lease_role["rules"]] == [None, [inst.operator]]
    assert {"coordination.k8s.io"} == {g for r in lease_role["rules"] for g in r["apiGroups"]}
    template = deployment["spec"]["template"]
    assert template["spec"]["serviceAccountName"] == inst.operator
    assert template["spec"]["containers"][0]["args"][1:] == [f"--namespace={inst.hub}", f"--namespace={inst.org}"]
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "operator", **template["metadata"]},
           "spec": template["spec"]}  # fmt: skip
    kube.request("POST", kube.path("pods", inst.ops), pod, params={"dryRun": "All"})
    assert kube.get("pods", inst.ops, "operator") is None

    # The party chart: the Party as the CRD schema accepted it, its fence, and the operator's Role.
    party = kube.get("parties", inst.org, "alice")
    assert party["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "Helm"
    assert party["spec"]["storage"] == {
        "endpoint": s3world.endpoint, "bucket": "alice-bkt", "region": "us-east-1",
        "credentialsSecret": {"name": "s3", "accessKeyField": "accessKeyId", "secretKeyField": "secretAccessKey"},
    }  # fmt: skip
    assert party["spec"]["consent"] == {"allowedNamespaces": [inst.hub]}
    assert party["spec"]["compute"]["gpusPerPod"] == 0 and party["spec"]["displayName"] == "Alice's clinic"
    fence = kube.get("networkpolicies", inst.org, "alice-trainers")
    assert fence["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "trainer"
    assert fence["spec"]["policyTypes"] == ["Ingress", "Egress"] and not fence["spec"].get("ingress")
    grant = kube.get(f"{RBAC}rolebindings", inst.org, "alice-fedtune-operator")
    assert grant["subjects"] == [{"kind": "ServiceAccount", "name": inst.operator, "namespace": inst.ops}]
    assert ok(inst.org_admin, "helm", "list", "-n", inst.org, "-q").split() == ["alice"]

    # helm uninstall removes what it installed, cluster-scoped objects included (the CRDs stay).
    ok(inst.org_admin, "helm", "uninstall", "alice", "-n", inst.org, "--wait")
    ok(kube, "helm", "uninstall", f"op-{kube.test_id}", "-n", inst.ops, "--wait")
    assert kube.get("parties", inst.org, "alice") is None
    assert kube.get("networkpolicies", inst.org, "alice-trainers") is None
    assert kube.get(f"{RBAC}rolebindings", inst.org, "alice-fedtune-operator") is None
    assert kube.get(f"{RBAC}clusterroles", None, inst.operator) is None
    assert kube.get(f"{RBAC}clusterroles", None, f"{inst.operator}-admin") is None
    assert kube.get("deployments", inst.ops, inst.operator) is None
    assert kube.get("crd", None, "federatedjobs.fedtune.io")


def hub_job(inst: Install, s3world, model: Path) -> dict:
    """A one-party, one-round FederatedJob in the hub over alice's data."""
    return {
        "apiVersion": "fedtune.io/v1alpha1",
        "kind": "FederatedJob",
        "metadata": {"name": "fj1", "namespace": inst.hub},
        "spec": {
            "model": {"source": f"file://{model}", "task": "sequence-classification"},
            "peft": {"method": "lora", "config": {"r": 4, "target_modules": ["query", "value"]}},
            "data": {"labels": ["negative", "positive"], "maxLength": 16},
            "training": {"localEpochs": 1, "batchSize": 8, "learningRate": 0.01},
            "storage": {"endpoint": s3world.endpoint, "bucket": "hub-bkt", "credentialsSecret": {"name": "hub-s3"}},
            "rounds": 1,
            "minParties": 1,
            "roundTimeoutSeconds": 120,
            "parties": [{"name": "alice", "namespace": inst.org}],
        },
    }


def test_the_operator_runs_a_job_with_only_what_the_two_charts_grant_it(kube, s3world, tiny_model):
    # Namespaced mode: the operator chart's ClusterRole (read-only) and its Role in the hub, the party
    # chart's Role in alice's namespace, enforced by the server's RBAC. The cluster admin caps alice's
    # namespace with a quota: every pod there must state its CPU and memory.
    inst = install_charts(kube, s3world)
    ok(kube, "kubectl", "create", "quota", "cap", "-n", inst.org,
       "--hard=requests.cpu=4,requests.memory=8Gi,limits.memory=8Gi,pods=4")  # fmt: skip
    kube.wait_for(lambda: (kube.get("resourcequotas", inst.org, "cap").get("status") or {}).get("hard"), what="quota")
    kube.node(f"cpu-{kube.test_id}")
    creds = s3world.creds("hub")
    kube.create(secret_doc(inst.hub, "hub-s3", {"accessKeyId": creds.access_key_id,
                                                "secretAccessKey": creds.secret_access_key}))  # fmt: skip
    identity = replace(inst.operator_identity, token=kube.token_for(inst.ops, inst.operator))
    with (
        pods_of(kube) as pods,
        kube.run_kopf("fedtune.k8s.operator", identity=identity, namespaces=[inst.hub, inst.org]),
    ):
        ok(kube, "kubectl", "wait", "--for=condition=Ready", "party/alice", "-n", inst.org, "--timeout=60s")
        kube.create(hub_job(inst, s3world, tiny_model))
        ok(kube, "kubectl", "wait", "--for=condition=Ready", "fj/fj1", "-n", inst.hub, "--timeout=180s", timeout=200)
        assert not pods.errors, pods.errors
    job = kube.get("fj", inst.hub, "fj1")
    assert job["status"]["phase"] == "Succeeded" and [h["round"] for h in job["status"]["history"]] == [0, 1]
    assert any(p.startswith(f"{inst.org}/") for p in pods.started)  # admitted under alice's quota
    parties = table(ok(inst.org_admin, "kubectl", "get", "parties", "-n", inst.org))
    age = parties[0]["AGE"]
    assert parties == [{"NAME": "alice", "PHASE": "Ready", "BUCKET": "alice-bkt", "GPUS": "0", "AGE": age}]


# --- kubectl on what the operator wrote -----------------------------------------------------------


def test_kubectl_get_and_wait_show_what_the_operator_wrote(kube, s3world, tiny_model):
    with pods_of(kube), kube.run_kopf("fedtune.k8s.operator"):
        w = make_world(kube, s3world, tiny_model)
        for party in ("alice", "bob"):
            ok(kube, "kubectl", "wait", "--for=condition=Ready", "parties", "--all", "-n", w.ns(party), "--timeout=60s")
        ok(kube, "kubectl", "wait", "--for=condition=Ready", "fj/fj1", "-n", w.hub, "--timeout=240s", timeout=260)
    st = status(w)
    assert st["phase"] == "Succeeded" and condition(w, "Ready")["reason"] == "Succeeded"

    # Every printer column of the CRD, filled by the operator (the Age column by the server).
    (row,) = table(ok(kube, "kubectl", "get", "fj", "-n", w.hub))
    assert row == {
        "NAME": "fj1", "PHASE": "Succeeded", "ROUND": str(st["currentRound"]), "ROUNDS": "2",
        "READY": st["partiesReady"], "METRIC": st["lastMetric"], "AGE": row["AGE"],
    }  # fmt: skip
    assert st["currentRound"] == 2 and st["partiesReady"] == "2/2" and st["lastMetric"].startswith("acc=")
    assert re.fullmatch(r"\d+s", row["AGE"])
    assert table(ok(kube, "kubectl", "get", "fedtune", "-n", w.hub))[0]["NAME"] == "federatedjob.fedtune.io/fj1"
    (alice,) = table(ok(kube, "kubectl", "get", "parties", "-n", w.ns("alice")))
    assert alice == {"NAME": "alice", "PHASE": "Ready", "BUCKET": "alice-bkt", "GPUS": "0", "AGE": alice["AGE"]}


def test_kubectl_explain_documents_the_job_fields_from_the_api_models(kube):
    from fedtune.api.job import TrainingSpec

    text = " ".join(ok(kube, "kubectl", "explain", "federatedjob.spec.training").split())
    assert f"DESCRIPTION: {TrainingSpec.__doc__}" in text
    for name, field in TrainingSpec.model_fields.items():
        assert f" {field.alias} <" in text, name
        assert " ".join(field.description.split()) in text, name
    assert "precision <string> enum: fp32, bf16, fp16" in text


def test_the_server_prunes_status_fields_the_crd_does_not_know_and_the_job_still_completes(kube, s3world, tiny_model):
    # The operator reads its status back into models that refuse unknown fields: it relies on the
    # server to keep only what the CRD schema knows, whoever writes the status.
    with pods_of(kube), kube.run_kopf("fedtune.k8s.operator"):
        w = make_world(kube, s3world, tiny_model, parties=("alice",), minParties=1)
        kube.wait_for(lambda: status(w).get("parties"), timeout=60, what="the operator's first status")
        fj = ["fj", "fj1", "-n", w.hub, "--subresource=status"]
        top = run(kube, "kubectl", "patch", *fj, "--type=merge", "-p", '{"status": {"notAField": {"x": 1}}}')
        nested = run(kube, "kubectl", "patch", *fj, "--type=json",
                     "-p", '[{"op": "add", "path": "/status/parties/0/notAField", "value": 1}]')  # fmt: skip
        assert top.returncode == nested.returncode == 0, top.stderr + nested.stderr
        assert 'Warning: unknown field "status.notAField"' in top.stderr
        assert 'Warning: unknown field "status.parties[0].notAField"' in nested.stderr
        stored = status(w)
        assert "notAField" not in stored and "notAField" not in stored["parties"][0]
        # A known field of the wrong type is refused outright, with the field named.
        wrong = run(kube, "kubectl", "patch", *fj, "--type=merge", "-p", '{"status": {"currentRound": "two"}}')
        assert wrong.returncode != 0 and "status.currentRound: Invalid value" in wrong.stderr
        kube.wait_for(lambda: status(w).get("phase") in ("Succeeded", "Failed"), timeout=240, what="the job to end")
    st = status(w)
    assert st["phase"] == "Succeeded", st
    assert [h["round"] for h in st["history"]] == [0, 1, 2] and st["parties"][0]["lastRound"] == 2
