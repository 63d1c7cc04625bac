"""The Kubernetes test harness itself (tests/kube.py, tests/kube_cluster.py): the session's real
control plane is up and enforces what a cluster does (authentication, RBAC, CRD schemas,
PodSecurity, garbage collection, namespace deletion), and kopf runs against it."""

from __future__ import annotations

import collections

import kopf
import pytest
from kube import ApiError, Identity, KubeTest

FJ = "fedtune.io/v1alpha1/federatedjobs"
ROOT = {"privileged": True, "allowPrivilegeEscalation": True, "runAsUser": 0, "runAsNonRoot": False}


def fj(name: str, namespace: str, **spec: object) -> dict:
    base = {
        "model": {"source": "file:///models/tiny", "task": "sequence-classification"},
        "rounds": 1,
        "parties": [{"name": "alice", "namespace": namespace}],
    }
    return {
        "apiVersion": "fedtune.io/v1alpha1",
        "kind": "FederatedJob",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {**base, **spec},
    }


def pod(name: str, namespace: str, **container_security: object) -> dict:
    """A pod PodSecurity `restricted` admits, unless `container_security` says otherwise."""
    security = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}, **container_security}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "securityContext": {"runAsNonRoot": True, "runAsUser": 1000, "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [{"name": "main", "image": "busybox", "securityContext": security}],
        },
    }


def test_the_control_plane_is_ready_and_checks_who_calls(kube: KubeTest) -> None:
    # What `start` waits for: the default namespace, and its ServiceAccount from the controller-manager.
    assert kube.get("namespaces", None, "default")["status"]["phase"] == "Active"
    assert kube.get("serviceaccounts", "default", "default")
    for crd in ("federatedjobs.fedtune.io", "parties.fedtune.io"):
        conditions = {c["type"]: c["status"] for c in kube.get("crd", None, crd)["status"]["conditions"]}
        assert conditions["Established"] == "True", crd
    # Unknown callers are turned away; the operator's ServiceAccount holds only the chart's rules.
    stranger = kube.as_identity(Identity("stranger", token="not-a-token"))
    with pytest.raises(ApiError) as exc:
        stranger.list("namespaces")
    assert exc.value.status == 401
    operator = kube.as_identity(kube.operator)
    assert operator.list("namespaces")  # granted: list, watch
    with pytest.raises(ApiError) as exc:
        operator.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": f"nope-{kube.test_id}"}})
    assert exc.value.status == 403 and 'cannot create resource "namespaces"' in str(exc.value)


def test_the_crd_schema_refuses_bad_specs_defaults_and_prunes_the_rest(kube: KubeTest) -> None:
    hub = kube.namespace("hub")
    with pytest.raises(ApiError) as exc:
        kube.create(fj("bad-enum", hub, model={"source": "file:///m", "task": "translation"}))
    assert exc.value.status == 422
    assert 'spec.model.task: Unsupported value: "translation": supported values: "sequence-classification", ' in str(
        exc.value
    )
    with pytest.raises(ApiError) as exc:
        kube.create(fj("bad-type", hub, rounds="three"))
    assert exc.value.status == 422 and "spec.rounds in body must be of type integer" in str(exc.value)

    # Unknown fields: pruned by default, refused under strict field validation (what kubectl asks for).
    made = kube.create(fj("extra", hub, notAField=1, training={"batchSize": 4, "alsoNot": True}))
    assert "notAField" not in made["spec"] and "alsoNot" not in made["spec"]["training"]
    # the schema's defaults, filled in by the server
    assert made["spec"]["training"]["batchSize"] == 4 and made["spec"]["training"]["learningRate"] == 0.0005
    assert made["spec"]["model"]["dtype"] == "float32"
    with pytest.raises(ApiError) as exc:
        kube.request("POST", kube.path(FJ, hub), fj("strict", hub, notAField=1), params={"fieldValidation": "Strict"})
    assert exc.value.status == 400 and 'unknown field "spec.notAField"' in str(exc.value)


def test_pod_security_restricted_refuses_a_privileged_root_pod(kube: KubeTest) -> None:
    restricted = kube.namespace("restricted")
    kube.create(pod("fine", restricted))
    with pytest.raises(ApiError) as exc:
        kube.create(pod("root", restricted, **ROOT))
    message = str(exc.value)
    assert exc.value.status == 403 and 'violates PodSecurity "restricted:latest"' in message
    assert "privileged" in message and "runAsUser=0" in message
    # The namespace label is what decides: the same pod is admitted where `privileged` is enforced.
    lax = kube.namespace("lax", labels={"pod-security.kubernetes.io/enforce": "privileged"})
    assert kube.create(pod("root", lax, **ROOT))


def test_the_garbage_collector_removes_what_a_deleted_owner_owned(kube: KubeTest) -> None:
    hub = kube.namespace("hub")
    owner = kube.create(fj("owner", hub))
    uid = owner["metadata"]["uid"]
    ref = {"apiVersion": "fedtune.io/v1alpha1", "kind": "FederatedJob", "name": "owner", "uid": uid}
    meta = {"name": "owned", "namespace": hub, "ownerReferences": [ref]}
    kube.create({"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": {"k": "v"}})
    kube.create({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "unowned", "namespace": hub}})
    kube.delete(FJ, hub, "owner")
    kube.wait_for(lambda: kube.get("configmaps", hub, "owned") is None, timeout=30, what="the owned ConfigMap's GC")
    assert kube.get("configmaps", hub, "unowned")


def test_deleting_a_namespace_deletes_what_it_holds(kube: KubeTest) -> None:
    doomed = kube.namespace("doomed")
    kube.create(fj("job", doomed))
    kube.create({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cm", "namespace": doomed}})
    kube.delete("namespaces", None, doomed)
    assert kube.get("namespaces", None, doomed)["status"]["phase"] == "Terminating"
    with pytest.raises(ApiError) as exc:  # nothing new in a terminating namespace
        kube.create({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "late", "namespace": doomed}})
    assert exc.value.status == 403 and "being terminated" in str(exc.value)
    kube.wait_for(lambda: kube.get("namespaces", None, doomed) is None, timeout=60, what="the namespace to go")
    assert kube.get(FJ, doomed, "job") is None and kube.get("configmaps", doomed, "cm") is None


def test_kopf_runs_against_the_server_and_a_restart_picks_up(kube: KubeTest) -> None:
    hub = kube.namespace("hub")
    registry = kopf.OperatorRegistry()  # throw-away handlers must not leak into kopf's default registry
    calls: collections.Counter = collections.Counter()

    @kopf.on.create("fedtune.io", "v1alpha1", "federatedjobs", registry=registry)
    def created(body, name, namespace, patch, **_):
        calls["create"] += 1
        secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": f"{name}-mailbox", "namespace": namespace}}
        kopf.adopt(secret, owner=body)
        kube.create(secret)
        patch.status["phase"] = "Running"

    @kopf.on.update("fedtune.io", "v1alpha1", "federatedjobs", field="spec", registry=registry)
    def updated(new, patch, **_):
        calls["update"] += 1
        patch.status["message"] = f"{new['rounds']} rounds"

    @kopf.on.delete("fedtune.io", "v1alpha1", "federatedjobs", registry=registry)
    def deleted(**_):
        calls["delete"] += 1

    def job() -> dict:
        return kube.get(FJ, hub, "job") or {}

    with kube.run_kopf(registry=registry, namespaces=[hub]):
        kube.create(fj("job", hub))
        kube.wait_for(lambda: job().get("status", {}).get("phase") == "Running", what="the create handler")
        assert "kopf.zalando.org/KopfFinalizerMarker" in job()["metadata"]["finalizers"]
        owners = kube.get("secrets", hub, "job-mailbox")["metadata"]["ownerReferences"]
        assert owners[0]["uid"] == job()["metadata"]["uid"]

    # A restarted operator picks up where it was: no second creation, new changes handled.
    with kube.run_kopf(registry=registry, namespaces=[hub]):
        kube.patch(FJ, hub, "job", {"spec": {"rounds": 5}})
        kube.wait_for(lambda: job().get("status", {}).get("message") == "5 rounds", what="the update handler")
        kube.delete(FJ, hub, "job")
        kube.wait_for(lambda: not job(), what="the deletion, once the delete handler released the finalizer")
    assert calls == {"create": 1, "update": 1, "delete": 1}
    # The garbage collector knows FederatedJobs from its start (kube_session installs the CRDs before the
    # controller-manager starts); one that discovered them late would collect the Secret ~40 s late.
    kube.wait_for(lambda: kube.get("secrets", hub, "job-mailbox") is None, timeout=30, what="the Secret's GC")
