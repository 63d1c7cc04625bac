"""The operator's RBAC table is exact, and the real API server enforces it.

The operator runs as a ServiceAccount bound by exactly the operator chart's RBAC (`helm template`
of helm/fedtune-operator), one release per run so that its username is its own, through jobs
against the session's kube-apiserver (tests/kube.py). The server's audit log then tells what it
asked and what it was answered: every request is granted by `fedtune.k8s.permissions.PERMISSIONS`
and none was refused, every verb of the table was asked for (but the justified `unrequested`
ones), the namespaced mode stays in its namespaces, pods reach their own mailbox Secret and
nothing else, and a chart missing one verb stops the job, says so on it, and lets it go on once
granted again. test_helm_chart.py checks that the charts grant that table.
"""

from __future__ import annotations

import copy
import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

import fedtune.k8s.operator as operator_module
import pytest
import yaml
from fedtune.k8s import names
from fedtune.k8s.permissions import PERMISSIONS, cluster_rows, granted, party_rows, triples
from kube import (
    OPERATOR_NAMESPACE,
    ROOT,
    ApiError,
    Identity,
    Kube,
    KubeTest,
    Session,
    apply_server_side,
    helm,
    kube_test,
    operator_rbac,
    wait_bindings_effective,
)
from operator_world import FAST_SETTINGS, World, condition, ended, job_pods, make_world, pods_of, status
from pod_executor import PodExecutor


def resource(entry: dict) -> str:
    """The audit entry's resource as PERMISSIONS names it ("federatedjobs/status"); "" if none."""
    ref = entry.get("objectRef") or {}
    res = ref.get("resource", "")
    return f"{res}/{ref['subresource']}" if res and ref.get("subresource") else res


def group(entry: dict) -> str:
    return (entry.get("objectRef") or {}).get("apiGroup", "")


def code(entry: dict) -> int:
    return (entry.get("responseStatus") or {}).get("code", 0)


def namespace(entry: dict) -> str | None:
    return (entry.get("objectRef") or {}).get("namespace")


@dataclass
class Run:
    """One operator run: its username, the audit log's ResponseComplete entries of its requests and
    of its pods' ServiceAccounts, the namespaces it served (the hub, then the party's), and the
    mailbox Roles it made."""

    user: str
    operator: list[dict]
    pods: list[dict]
    namespaces: tuple[str, ...]
    roles: dict[str, dict]  # pod ServiceAccount username -> the Role bound to it


def pod_users(kube: KubeTest, namespaces: tuple[str, ...]) -> set[str]:
    return {
        f"system:serviceaccount:{ns}:{sa['metadata']['name']}"
        for ns in namespaces
        for sa in kube.list("serviceaccounts", ns, labels="fedtune.io/job=fj1")
    }


def mailbox_roles(kube: KubeTest, namespaces: tuple[str, ...]) -> dict[str, dict]:
    """The Role bound to each pod ServiceAccount of the job (read while the job's children exist)."""
    out = {}
    for ns in namespaces:
        roles = {r["metadata"]["name"]: r for r in kube.list("roles", ns, labels="fedtune.io/job=fj1")}
        for binding in kube.list("rolebindings", ns, labels="fedtune.io/job=fj1"):
            for subject in binding["subjects"]:
                out[f"system:serviceaccount:{ns}:{subject['name']}"] = roles[binding["roleRef"]["name"]]
    return out


def _cluster_wide_run(session: Session, s3world, model: Path) -> Run:
    """A one-party, one-round job to success, a trainer pod lost on the way, then deleted."""
    with kube_test(session, "rbac") as kube:
        operator = kube.install_operator(f"rbac-cw-{kube.test_id}")
        audit = kube.audit()
        with PodExecutor(kube, kube.workdir / "pods", namespaces=kube.namespaces) as pods:
            with kube.run_kopf("fedtune.k8s.operator", identity=operator):
                w = make_world(kube, s3world, model, parties=("alice",), rounds=1, minParties=1)
                served = (w.hub, w.ns("alice"))
                # A vanished pod is recreated: its ServiceAccount, Role, RoleBinding and mailbox then
                # answer 409 and are read back (the `get` verbs on them).
                trainer = kube.wait_for(
                    lambda: [p for p in pods.started if p.startswith(f"{w.ns('alice')}/")], timeout=60, what="a trainer"
                )[0]
                kube.delete("pods", w.ns("alice"), trainer.split("/")[1])
                kube.wait_for(lambda: len(pods.started) >= 3, timeout=60, what="the trainer pod recreated and run")
                roles = mailbox_roles(kube, served)
                users = pod_users(kube, served)
                kube.wait_for(lambda: status(w).get("phase") in ("Succeeded", "Failed"), timeout=180, what="the end")
                assert status(w)["phase"] == "Succeeded", status(w)
                kube.delete("fj", w.hub, "fj1")
                kube.wait_for(lambda: kube.get("fj", w.hub, "fj1") is None, timeout=30, what="the job's deletion")
            assert not pods.errors, pods.errors
        pod_entries = [e for user in users for e in audit.completed(user)]
        return Run(operator.name, audit.completed(operator.name), pod_entries, served, roles)


def party_operator_access(party_namespace: str, operator_service_account: str) -> list[dict]:
    """The Role and RoleBinding the fedtune-party chart gives the operator in its namespace."""
    values = {
        "storage.bucket": "alice-bkt",
        "storage.credentialsSecret.name": "s3",
        "operatorAccess.serviceAccount.name": operator_service_account,
        "operatorAccess.serviceAccount.namespace": OPERATOR_NAMESPACE,
        "networkPolicy.enabled": False,  # no CNI here; the chart then needs no endpoints
    }
    args = [helm(), "template", "alice", str(ROOT / "helm" / "fedtune-party"), "--namespace", party_namespace]
    for key, value in values.items():
        args += ["--set-json", f"{key}={json.dumps(value)}"]
    out = subprocess.run(args, capture_output=True, text=True, check=True, timeout=60).stdout
    docs = [d for d in yaml.safe_load_all(out) if d and d["kind"] in ("Role", "RoleBinding")]
    assert len(docs) == 2, [d["kind"] for d in docs]
    return docs


def _namespaced_run(session: Session, s3world, model: Path) -> Run:
    """rbac.clusterWide=false, serving the hub and alice's namespace only (coordinator Role from the
    operator chart, party Role from the fedtune-party chart): a job up to its pods, then deleted."""
    with kube_test(session, "rbac") as kube:
        # The world first (the operator is not running yet): the chart must name its namespaces.
        w = make_world(kube, s3world, model, parties=("alice",), rounds=1, minParties=1)
        served = (w.hub, w.ns("alice"))
        release = f"rbac-ns-{kube.test_id}"
        values = {"rbac.clusterWide": False, "watchNamespaces": list(served), "rbac.coordinatorNamespaces": [w.hub]}
        operator = kube.install_operator(release, values)
        party_rbac = party_operator_access(w.ns("alice"), release)
        apply_server_side(kube, party_rbac)
        wait_bindings_effective(kube, party_rbac)
        audit = kube.audit()
        with kube.run_kopf("fedtune.k8s.operator", identity=operator, namespaces=list(served)):
            kube.wait_for(lambda: len(job_pods(kube, served)) == 2, timeout=60, what="the trainer and aggregator pods")
            roles = mailbox_roles(kube, served)
            kube.delete("fj", w.hub, "fj1")
            kube.wait_for(lambda: not job_pods(kube, served), timeout=30, what="the job's pods to be deleted")
        return Run(operator.name, audit.completed(operator.name), [], served, roles)


@pytest.fixture(scope="module")
def runs(kube_session: Session, s3world, tiny_model) -> dict[str, Run]:
    """Both runs, by operator mode."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(operator_module, "SETTINGS", FAST_SETTINGS)
        return {
            "cluster-wide": _cluster_wide_run(kube_session, s3world, tiny_model),
            "namespaced": _namespaced_run(kube_session, s3world, tiny_model),
        }


def test_the_log_tells_the_operator_from_its_pods(runs):
    """Each run's ServiceAccount is its own username; pods have theirs (the harness is the admin)."""
    run = runs["cluster-wide"]
    assert run.user.startswith(f"system:serviceaccount:{OPERATOR_NAMESPACE}:rbac-cw-")
    agents = {e["userAgent"].split("/")[0] for e in run.operator}
    assert agents == {"kopf", "python-urllib3"}, agents  # kopf, and fedtune's client (its own headers)
    assert run.pods and {resource(e) for e in run.pods} == {"secrets"}, "pods reach their mailbox Secret only"
    assert len({e["user"]["username"] for e in run.pods}) == 2, "the trainer (both of its pods) and the aggregator"


@pytest.mark.parametrize("mode", ["cluster-wide", "namespaced"])
def test_every_operator_request_is_granted_and_none_refused(runs, mode):
    ops = runs[mode].operator
    asked = {(e["verb"], group(e), resource(e)) for e in ops if resource(e)}
    denied = sorted((verb, grp, res) for verb, grp, res in asked if not granted(grp, res, verb))
    assert not denied, f"the operator needs more than PERMISSIONS: {denied}"
    refused = sorted({(e["verb"], resource(e), namespace(e), code(e)) for e in ops if code(e) in (401, 403)})
    assert not refused, f"the API server refused the operator (its chart RBAC lacks these): {refused}"
    # Outside resources, only discovery: readable by every authenticated user (system:discovery).
    non_resource = {(e["verb"], e["requestURI"].split("?")[0]) for e in ops if not e.get("objectRef")}
    assert {path.split("/")[1] for _, path in non_resource} <= {"api", "apis"}, non_resource
    assert {verb for verb, _ in non_resource} <= {"get"}, non_resource


def test_every_permission_is_requested_or_justified(runs):
    used = {(group(e), resource(e), e["verb"]) for run in runs.values() for e in run.operator if resource(e)}
    held_only = {(p.group, p.resource, v) for p in PERMISSIONS for v in p.unrequested}
    assert all(p.why for p in PERMISSIONS if p.unrequested)
    never = sorted(triples() - held_only - used)
    assert not never, f"PERMISSIONS grants what the operator never asks for: {never}"
    assert held_only & used == set(), "a verb marked unrequested is requested after all"


def test_mailbox_roles_were_created_under_escalation_prevention_and_pods_use_only_them(runs):
    """That the operator holds every verb of the Roles it creates is the server's to enforce (RBAC
    escalation prevention refuses a Role granting what its creator lacks: see
    test_a_chart_missing_a_verb_stops_the_job[secrets-update]), so no table check stands in for it
    here. What is left: the runs did create the mailbox Roles (the server checked them), each names
    its one Secret, and every request of a pod was within the Role bound to its ServiceAccount."""
    for run in runs.values():
        made = [e for e in run.operator if resource(e) == "roles" and e["verb"] == "create" and code(e) == 201]
        assert made, "the operator created no Role: escalation prevention was not exercised"
        for role in run.roles.values():
            assert all(rule.get("resourceNames") for rule in role["rules"]), "a mailbox Role names its one Secret"
    run = runs["cluster-wide"]
    assert run.pods
    for e in run.pods:
        role = run.roles[e["user"]["username"]]
        allowed = any(
            group(e) in rule["apiGroups"]
            and resource(e) in rule["resources"]
            and e["verb"] in rule["verbs"]
            and e["objectRef"].get("name") in rule["resourceNames"]
            for rule in role["rules"]
        )
        assert allowed and namespace(e) == role["metadata"]["namespace"], (e["verb"], e["requestURI"])
        assert code(e) < 400, (e["verb"], e["requestURI"], code(e))


def test_a_namespaced_operator_needs_only_roles_in_the_namespaces_it_serves(runs):
    """What makes rbac.clusterWide=false work: namespaced requests stay in the served namespaces,
    those in a party's namespace within its Role's rows (`party_rows`: on FederatedJobs only kopf's
    watch), and cluster-scoped ones are the cluster rows (read-only) of the table."""
    run = runs["namespaced"]
    ops = [e for e in run.operator if resource(e)]
    cluster = {p.resource for p in cluster_rows()}
    namespaced = [e for e in ops if resource(e).split("/")[0] not in cluster]
    outside = sorted({(e["verb"], resource(e), namespace(e)) for e in namespaced if namespace(e) not in run.namespaces})
    assert not outside, f"namespaced operator went outside {run.namespaces}: {outside}"
    # In the party's namespace (the hub is the first served), the party chart's narrower rows suffice.
    party = {(group(e), resource(e), e["verb"]) for e in namespaced if namespace(e) in run.namespaces[1:]}
    assert party and not party - triples(party_rows()), sorted(party - triples(party_rows()))
    assert {v for g, r, v in party if g == "fedtune.io" and r.startswith("federatedjobs")} == {"list", "watch"}
    assert {"namespaces", "nodes", "customresourcedefinitions"} == {resource(e) for e in ops if namespace(e) is None}


# --- a pod's token ---------------------------------------------------------------------------------


def mailbox_of(pod: dict) -> str:
    """The mailbox Secret a pod is told to read (`--mailbox k8s://<namespace>/<secret>`)."""
    (uri,) = [a for a in pod["spec"]["containers"][0]["command"] if a.startswith("k8s://")]
    return uri.rsplit("/", 1)[1]


def pod_client(kube: KubeTest, pod: dict) -> Kube:
    """A client holding the pod's token: a TokenRequest bound to the pod and its ServiceAccount,
    as the kubelet asks it (and the pod executor does)."""
    ns, sa = pod["metadata"]["namespace"], pod["spec"]["serviceAccountName"]
    return kube.as_identity(Identity(f"system:serviceaccount:{ns}:{sa}", token=kube.token_for(ns, sa, pod=pod)))


def status_of(call) -> int:
    try:
        call()
    except ApiError as exc:
        return exc.status
    return 200


def test_a_pod_token_reaches_its_own_mailbox_and_nothing_else(kube, s3world, tiny_model, fast_operator):
    """Two jobs on one party: two trainer pods side by side in alice's namespace, and two
    aggregators in the hub. The operator makes them (and stops); each pod's token is then tried."""
    with kube.run_kopf("fedtune.k8s.operator"):
        w = make_world(kube, s3world, tiny_model, parties=("alice",), rounds=1, minParties=1)
        spec = w.job["spec"]
        kube.create(
            {
                "apiVersion": "fedtune.io/v1alpha1",
                "kind": "FederatedJob",
                "metadata": {"name": "fj2", "namespace": w.hub},
                "spec": spec,
            }
        )
        kube.wait_for(lambda: len(job_pods(kube, (w.hub, w.ns("alice")))) == 4, timeout=60, what="four pods")
    alice = w.ns("alice")
    trainers = {
        job: kube.get("pods", alice, names.trainer_names(w.hub, job, w.key("alice")).pod) for job in ("fj1", "fj2")
    }
    aggregator = kube.get("pods", w.hub, names.aggregator_names(w.hub, "fj1").pod)
    pod = trainers["fj1"]
    mine, neighbour = mailbox_of(pod), mailbox_of(trainers["fj2"])
    assert mine != neighbour
    client = pod_client(kube, pod)
    audit = kube.audit()

    # Its own mailbox: get, patch (a receipt), and watch it by name from the version it read.
    before = client.get("secrets", alice, mine)["metadata"]["resourceVersion"]
    client.patch("secrets", alice, mine, {"data": {"receipt.json": "e30="}})
    watch = {"watch": "true", "fieldSelector": f"metadata.name={mine}", "resourceVersion": before, "timeoutSeconds": 1}
    event = client.request("GET", client.path("secrets", alice), params=watch)
    assert event["type"] == "MODIFIED" and event["object"]["data"]["receipt.json"] == "e30="

    # Nothing else: the neighbour's mailbox, the aggregator's, the party's S3 credentials, any listing.
    refused = {
        "get the neighbour's mailbox": lambda: client.get("secrets", alice, neighbour),
        "patch the neighbour's mailbox": lambda: client.patch("secrets", alice, neighbour, {"data": {"x": "eA=="}}),
        "watch the neighbour's mailbox": lambda: client.request(
            "GET", client.path("secrets", alice), params={**watch, "fieldSelector": f"metadata.name={neighbour}"}
        ),
        "get the aggregator's mailbox": lambda: client.get("secrets", w.hub, mailbox_of(aggregator)),
        "get the S3 credentials": lambda: client.get("secrets", alice, "s3"),
        "list Secrets": lambda: client.list("secrets", alice),
        "watch every Secret": lambda: client.request(
            "GET", client.path("secrets", alice), params={"watch": "true", "timeoutSeconds": 1}
        ),
        "list pods": lambda: client.list("pods", alice),
    }
    answers = {what: status_of(call) for what, call in refused.items()}
    assert answers == dict.fromkeys(refused, 403), answers
    entries = audit.completed(client.identity.name)
    assert sorted(code(e) for e in entries) == [200] * 3 + [403] * len(refused)
    # The token is the pod's: the server knows which pod asked, and it dies with the pod.
    assert {tuple(e["user"]["extra"]["authentication.kubernetes.io/pod-name"]) for e in entries} == {
        (pod["metadata"]["name"],)
    }
    kube.delete("pods", alice, pod["metadata"]["name"], grace=0)
    kube.wait_for(
        lambda: status_of(lambda: client.get("secrets", alice, mine)) == 401,
        timeout=10,
        what="the deleted pod's token to be rejected",
    )
    # The aggregator's token likewise reaches its mailbox, not the trainer's.
    boss = pod_client(kube, aggregator)
    assert status_of(lambda: boss.get("secrets", w.hub, mailbox_of(aggregator))) == 200
    assert status_of(lambda: boss.get("secrets", alice, neighbour)) == 403


# --- a chart missing a verb --------------------------------------------------------------------------


def without_verb(docs: list[dict], api_group: str, resource_name: str, verb: str) -> list[dict]:
    """The chart's RBAC documents with `verb` on `resource_name` taken out of the operator's ClusterRole
    (not those the chart aggregates into the built-in user roles)."""
    docs = copy.deepcopy(docs)
    aggregated = "rbac.authorization.k8s.io/aggregate-to-"
    (role,) = [
        d for d in docs
        if d["kind"] == "ClusterRole" and not any(k.startswith(aggregated) for k in d["metadata"].get("labels", {}))
    ]  # fmt: skip
    rules, removed = [], False
    for rule in role["rules"]:
        if api_group in rule["apiGroups"] and resource_name in rule["resources"] and verb in rule["verbs"]:
            assert rule["apiGroups"] == [api_group]
            removed = True
            if rest := [r for r in rule["resources"] if r != resource_name]:
                rules.append({**rule, "resources": rest})
            if verbs := [v for v in rule["verbs"] if v != verb]:
                rules.append({**rule, "resources": [resource_name], "verbs": verbs})
        else:
            rules.append(rule)
    assert removed, f"the chart does not grant {verb} on {resource_name}"
    role["rules"] = rules
    return docs


@pytest.mark.parametrize(
    ("api_group", "resource_name", "verb", "refused", "makes_pods"),
    [
        # The operator's own request is refused: no pod.
        ("", "pods", "create", ("create", "pods"), False),
        # Never requested, yet needed: escalation prevention refuses the mailbox Role (it grants
        # update on the Secret) to an operator without it. What `unrequested` and its `why` stand for.
        ("", "secrets", "update", ("create", "roles"), False),
        # The pods are made, but the job's status, where its rounds advance, is never written.
        ("fedtune.io", "federatedjobs/status", "patch", ("patch", "federatedjobs/status"), True),
    ],
    ids=["pods-create", "secrets-update", "federatedjobs-status-patch"],
)
def test_a_chart_missing_a_verb_stops_the_job(
    kube, s3world, tiny_model, fast_operator, api_group, resource_name, verb, refused, makes_pods
):
    """The chart's ClusterRole minus one verb the operator needs: the server refuses it (403 in the
    audit log) and the job does not progress, so a chart missing a verb fails a test."""
    release = f"rbac-less-{kube.test_id}"
    docs = without_verb(operator_rbac({"fullnameOverride": release}, release), api_group, resource_name, verb)
    operator = kube.install_operator(release, docs=docs)
    audit = kube.audit()
    with kube.run_kopf("fedtune.k8s.operator", identity=operator):
        w: World = make_world(kube, s3world, tiny_model, parties=("alice",), rounds=1, minParties=1)
        served = (w.hub, w.ns("alice"))

        def attempts() -> list[dict]:
            return [e for e in audit.entries(operator.name) if (e["verb"], resource(e)) == refused]

        kube.wait_for(lambda: len(attempts()) >= 3, timeout=60, what=f"three attempts at {refused}")
        assert {code(e) for e in attempts()} == {403}, "every attempt refused, retries (resync 0.5 s) alike"
        assert {namespace(e) for e in attempts()} <= set(served)
        # The party was fine (its status is written): the missing verb is what holds the job.
        assert kube.get("parties", w.ns("alice"), "alice")["status"]["phase"] == "Ready"
        pods = job_pods(kube, served)
        if makes_pods:
            assert len(pods) == 2 and status(w) == {}, status(w)
        else:
            assert not pods and status(w).get("phase") in (None, "Pending"), status(w)
            # ... and the job says so itself, in the API server's words, with the fix
            ready = kube.wait_for(
                lambda: next((c for c in status(w).get("conditions", []) if c["reason"] == "Forbidden"), None),
                timeout=30,
                what="a Forbidden condition on the job",
            )
            assert ready["type"] == "Ready" and ready["status"] == "False", ready
            assert "forbidden" in ready["message"] and refused[1] in ready["message"], ready
            assert "operator chart's RBAC" in ready["message"], ready
        assert status(w).get("currentRound", 0) == 0

        # The chart as it is, applied again: once the server grants the verb, the job goes on and
        # its status no longer speaks of a refusal.
        apply_server_side(kube, operator_rbac({"fullnameOverride": release}, release))
        kube.wait_for(
            lambda: may(kube, operator.name, verb, api_group, resource_name, w.hub), timeout=10, what="the verb back"
        )
        kube.wait_for(
            lambda: len(job_pods(kube, served)) == 2 and status(w).get("phase") == "Running",
            timeout=60,
            what="the job's pods and its Running status once the verb is granted",
        )
        st = status(w)
        assert not [c for c in st["conditions"] if c["reason"] == "Forbidden"] and not st.get("message"), st


def test_a_verb_lost_while_a_job_runs_shows_on_it_and_clears_once_granted_again(
    kube, s3world, tiny_model, fast_operator
):
    """The operator loses `get` on pods (every pass reads the job's pods) while a job runs: Ready says
    Forbidden. Granted again, Ready and Reconciling say the round is in progress at the next pass,
    not only when a round next starts (no pod runs meanwhile, so none starts), and the job runs on."""
    release = f"rbac-lost-{kube.test_id}"
    full = operator_rbac({"fullnameOverride": release}, release)
    operator = kube.install_operator(release, docs=full)
    with kube.run_kopf("fedtune.k8s.operator", identity=operator):
        w = make_world(kube, s3world, tiny_model, parties=("alice",), rounds=1, minParties=1)
        kube.wait_for(
            lambda: status(w).get("phase") == "Running" and len(job_pods(kube)) == 2,
            timeout=60,
            what="the job Running, with its pods",
        )
        apply_server_side(kube, without_verb(full, "", "pods", "get"))
        kube.wait_for(lambda: not may(kube, operator.name, "get", "", "pods", w.hub), timeout=10, what="get revoked")
        ready = kube.wait_for(
            lambda: (c := condition(w, "Ready")) is not None and c["reason"] == "Forbidden" and c,
            timeout=30,
            what="Forbidden on the running job",
        )
        assert status(w)["phase"] == "Running" and 'cannot get resource "pods"' in ready["message"], ready
        assert status(w)["message"] == ready["message"]

        apply_server_side(kube, full)
        kube.wait_for(lambda: may(kube, operator.name, "get", "", "pods", w.hub), timeout=10, what="get granted")
        ready = kube.wait_for(
            lambda: (c := condition(w, "Ready")) is not None and c["reason"] == "RoundInProgress" and c,
            timeout=30,
            what="Ready to say the round is in progress again",
        )
        assert ready["status"] == "False" and ready["message"] == "loading the base model on every party", ready
        assert condition(w, "Reconciling")["reason"] == "RoundInProgress" and not status(w).get("message")
        assert status(w)["stage"] == "init"  # put back by the pass itself, not by a new round
        with pods_of(kube) as pods:
            kube.wait_for(lambda: ended(w), timeout=240, what="the job to end")
        assert not pods.errors, pods.errors
    assert status(w)["phase"] == "Succeeded", status(w)


def may(kube: Kube, user: str, verb: str, api_group: str, resource_name: str, namespace: str) -> bool:
    """Whether the API server's RBAC allows `user` (a ServiceAccount) `verb` on `resource_name` (with
    "/<subresource>") in `namespace` now: a SubjectAccessReview, answered from the cache the server
    authorizes requests by."""
    res, _, sub = resource_name.partition("/")
    attrs = {"verb": verb, "group": api_group, "resource": res, "subresource": sub, "namespace": namespace}
    review = {
        "apiVersion": "authorization.k8s.io/v1",
        "kind": "SubjectAccessReview",
        "spec": {"user": user, "groups": ["system:serviceaccounts"], "resourceAttributes": attrs},
    }
    answer = kube.request("POST", "/apis/authorization.k8s.io/v1/subjectaccessreviews", review)
    return bool(answer["status"].get("allowed"))
