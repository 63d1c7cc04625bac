"""The operator's RBAC table is exact: the real operator, run through jobs against the API emulator,
requests nothing `fedtune.k8s.permissions.PERMISSIONS` lacks, and every verb in it (but the
justified `unrequested` ones). test_helm_chart.py checks that the charts grant that table.

The operator (kopf and fedtune's own client) authenticates with its own token, as its
ServiceAccount would in a cluster; the test harness keeps the emulator's token and the pods send
none, so the emulator's request log tells the operator's requests apart, as an audit log would.
"""

from __future__ import annotations

import json
from pathlib import Path

import fedtune.k8s.operator as operator_module
import kopf
import pytest
from fedtune.k8s.permissions import PERMISSIONS, cluster_rows, granted, triples
from fedtune.k8s.settings import OperatorSettings
from kube import KubeEmulator
from kube_emulator import RecordedRequest
from pod_executor import PodExecutor
from test_operator import HUB, make_world, status
from tiny_models import make_tiny_model

OPERATOR_TOKEN = "fedtune-operator"
SERVED = (HUB, "org-alice")  # what the namespaced operator serves (`fedtune operator --namespace`)


class OperatorIdentity(KubeEmulator):
    """The emulator, with the operator under test authenticating as itself (see the module doc)."""

    @property
    def kubeconfig(self) -> Path:  # what fedtune's own client reads (KUBECONFIG)
        path = super().kubeconfig.with_name("operator-kubeconfig")
        if not path.exists():
            cfg = json.loads(super().kubeconfig.read_text())
            cfg["users"][0]["user"]["token"] = OPERATOR_TOKEN
            path.write_text(json.dumps(cfg))
        return path

    def connection_info(self) -> kopf.ConnectionInfo:  # what kopf logs in with
        return kopf.ConnectionInfo(server=self.url, scheme="Bearer", token=OPERATOR_TOKEN, insecure=True)

    def record(self) -> list[RecordedRequest]:
        log: list[RecordedRequest] = []
        self.call(setattr, self.server, "request_log", log)
        return log


def _cluster_wide_run(s3world, model: Path, tmp: Path) -> list[RecordedRequest]:
    """A one-party, one-round job to success, a trainer pod lost on the way, then deleted."""
    with OperatorIdentity() as kube:
        log = kube.record()
        with PodExecutor(kube, tmp / "pods"), kube.run_kopf("fedtune.k8s.operator"):
            make_world(kube, s3world, model, parties=("alice",), rounds=1, minParties=1)
            # A vanished pod is recreated: its ServiceAccount, Role, RoleBinding and mailbox then
            # answer 409 and are read back (the `get` verbs on them).
            pod = kube.wait_for(lambda: kube.list("pods", "org-alice"), timeout=30, what="the trainer pod")[0]
            kube.delete("pods", "org-alice", pod["metadata"]["name"])
            kube.wait_for(lambda: status(kube).get("phase") in ("Succeeded", "Failed"), timeout=120, what="the end")
            assert status(kube)["phase"] == "Succeeded", status(kube)
            kube.delete("fj", HUB, "fj1")
            kube.wait_for(lambda: kube.get("fj", HUB, "fj1") is None, timeout=30, what="the job's deletion")
        return list(log)


def _namespaced_run(s3world, model: Path) -> list[RecordedRequest]:
    """The operator serving SERVED only: a job up to its pods (not run), then deleted."""
    with OperatorIdentity() as kube:
        for ns in SERVED:
            kube.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
        log = kube.record()
        with kube.run_kopf("fedtune.k8s.operator", namespaces=list(SERVED)):
            make_world(kube, s3world, model, parties=("alice",), rounds=1, minParties=1)
            kube.wait_for(lambda: len(kube.list("pods")) == 2, timeout=30, what="the trainer and aggregator pods")
            kube.delete("fj", HUB, "fj1")
            kube.wait_for(lambda: not kube.list("pods"), timeout=30, what="the job's pods to be deleted")
        return list(log)


@pytest.fixture(scope="module")
def requests_by_mode(s3world, tmp_path_factory) -> dict[str, list[RecordedRequest]]:
    """Every request of both runs, by operator mode (the whole log: filter with `by_operator`)."""
    tmp = tmp_path_factory.mktemp("rbac")
    model = make_tiny_model(tmp / "bert", "sequence-classification")
    settings = OperatorSettings(resync_seconds=0.5, metrics_port=0, pod_backoff_seconds=0.5)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(operator_module, "SETTINGS", settings)
        return {"cluster-wide": _cluster_wide_run(s3world, model, tmp), "namespaced": _namespaced_run(s3world, model)}


def by_operator(log: list[RecordedRequest]) -> list[RecordedRequest]:
    return [r for r in log if r.token == OPERATOR_TOKEN]


def test_the_log_tells_the_operator_from_the_pods_and_the_harness(requests_by_mode):
    log = requests_by_mode["cluster-wide"]
    agents = {r.user_agent.split("/")[0] for r in by_operator(log)}
    assert "kopf" in agents and len(agents) == 2, agents  # kopf, and fedtune's client (urllib3)
    pods = [r for r in log if r.token is None]
    assert pods and {r.resource for r in pods} == {"secrets"}, "pods reach their mailbox Secret only"


def _mailbox_roles() -> list[dict]:
    """The Roles the operator creates for a trainer and an aggregator pod (examples/k8s job)."""
    import yaml
    from fedtune.api.job import FederatedJob
    from fedtune.api.party import Party
    from fedtune.k8s import builders

    root = Path(__file__).resolve().parents[1] / "examples" / "k8s"
    files = ("federatedjob.yaml", "party-hospital-a.yaml")
    docs = [d for f in files for d in yaml.safe_load_all((root / f).read_text())]
    job = FederatedJob.model_validate(next(d for d in docs if d["kind"] == "FederatedJob"))
    party = Party.model_validate(next(d for d in docs if d["kind"] == "Party"))
    ctxs = (builders.trainer_context(job, party), builders.aggregator_context(job))
    return [o for ctx in ctxs for o in builders.build_pod_objects(ctx) if o["kind"] == "Role"]


def test_the_operator_holds_every_verb_it_grants_and_pods_use_only_their_mailbox(requests_by_mode):
    """RBAC escalation prevention (which the emulator does not enforce): creating and binding a Role
    needs every verb of it held by the creator. Pods ask only what their mailbox Role grants."""
    roles = _mailbox_roles()
    assert len(roles) == 2
    granted_to_pods = set()
    for role in roles:
        for rule in role["rules"]:
            for group in rule["apiGroups"]:
                for res in rule["resources"]:
                    missing = [v for v in rule["verbs"] if not granted(group, res, v)]
                    assert not missing, f"the operator could not create {role['metadata']['name']}: lacks {missing}"
                    granted_to_pods |= {(group, res, v) for v in rule["verbs"]}
            assert rule.get("resourceNames"), "a mailbox Role names its one Secret"
    pods = [r for r in requests_by_mode["cluster-wide"] if r.token is None]
    assert pods and {(r.group, r.resource, r.verb) for r in pods} <= granted_to_pods
    named = [r for r in pods if r.verb != "watch"]  # a watch names its Secret by fieldSelector
    assert named and all("/secrets/" in r.path for r in named), "pods address their mailbox by name"


@pytest.mark.parametrize("mode", ["cluster-wide", "namespaced"])
def test_every_operator_request_is_granted(requests_by_mode, mode):
    ops = by_operator(requests_by_mode[mode])
    asked = {(r.verb, r.group, r.resource) for r in ops if r.resource}
    denied = sorted((verb, group, res) for verb, group, res in asked if not granted(group, res, verb))
    assert not denied, f"the operator needs more than PERMISSIONS: {denied}"
    # Outside resources, only discovery: readable by every authenticated user (system:discovery).
    assert {(r.verb, r.path.split("/")[1]) for r in ops if not r.resource} <= {("get", "api"), ("get", "apis")}


def test_every_permission_is_requested_or_justified(requests_by_mode):
    used = {(r.group, r.resource, r.verb) for log in requests_by_mode.values() for r in by_operator(log) if r.resource}
    held_only = {(p.group, p.resource, v) for p in PERMISSIONS for v in p.unrequested}
    assert all(p.why for p in PERMISSIONS if p.unrequested)
    never = sorted(triples() - held_only - used)
    assert not never, f"PERMISSIONS grants what the operator never asks for: {never}"
    assert held_only & used == set(), "a verb marked unrequested is requested after all"


def test_a_namespaced_operator_needs_only_roles_in_the_namespaces_it_serves(requests_by_mode):
    """What makes rbac.clusterWide=false work: namespaced requests stay in the served namespaces,
    and cluster-scoped ones are the cluster rows (read-only) of the table."""
    ops = [r for r in by_operator(requests_by_mode["namespaced"]) if r.resource]
    cluster = {p.resource for p in cluster_rows()}
    namespaced = [r for r in ops if r.resource.split("/")[0] not in cluster]
    outside = sorted({(r.verb, r.resource, r.namespace) for r in namespaced if r.namespace not in SERVED})
    assert not outside, f"namespaced operator went outside {SERVED}: {outside}"
    assert {"namespaces", "nodes", "customresourcedefinitions"} == {r.resource for r in ops if r.namespace is None}
