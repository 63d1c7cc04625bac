"""The Kubernetes test harness itself: the emulated API server, and kopf running against it."""

from __future__ import annotations

import collections
import json
import threading
import time

import kopf
import pytest
import urllib3
from kube import ApiError, KubeEmulator, kube_fixture  # noqa: F401  (the `kube` fixture)

FJ = "fedtune.io/v1alpha1/federatedjobs"


def fj(name: str, ns: str = "hub", **spec: object) -> dict:
    return {
        "apiVersion": "fedtune.io/v1alpha1",
        "kind": "FederatedJob",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"rounds": 1, **spec},
    }


def watch(kube: KubeEmulator, path: str, **params: object) -> list[dict]:
    """All events of one watch request; the server ends it after timeoutSeconds."""
    params = {"watch": "true", "timeoutSeconds": 1, **params}
    query = "&".join(f"{k}={v}" for k, v in params.items())
    resp = urllib3.request("GET", f"{kube.url}{path}?{query}", preload_content=False, timeout=10)
    assert resp.status == 200
    return [json.loads(line) for line in resp if line.strip()]


def test_crud_fills_server_fields(kube: KubeEmulator) -> None:
    created = kube.create(fj("a"))
    meta = created["metadata"]
    assert meta["uid"] and meta["creationTimestamp"].endswith("Z") and meta["generation"] == 1
    assert kube.create(fj("b"))["metadata"]["resourceVersion"] > meta["resourceVersion"]
    with pytest.raises(ApiError) as exc:
        kube.create(fj("a"))
    assert exc.value.status == 409

    # Spec changes bump the generation; status goes through /status only (the subresource).
    patched = kube.patch(FJ, "hub", "a", {"spec": {"rounds": 3}, "status": {"phase": "Ignored"}})
    assert patched["metadata"]["generation"] == 2 and "status" not in patched
    status = kube.patch(FJ, "hub", "a", {"status": {"phase": "Running"}}, subresource="status")
    assert status["status"] == {"phase": "Running"} and status["metadata"]["generation"] == 2
    assert int(status["metadata"]["resourceVersion"]) > int(patched["metadata"]["resourceVersion"])
    assert kube.patch(FJ, "hub", "a", {"spec": {"rounds": 3}}) == status  # no-op: nothing changes

    # kopf's optimistic JSON patches: a failed `test` is 422, a stale precondition 409.
    rv = status["metadata"]["resourceVersion"]
    with pytest.raises(ApiError) as exc:
        kube.patch(FJ, "hub", "a", [{"op": "test", "path": "/metadata/resourceVersion", "value": "1"}])
    assert exc.value.status == 422
    with pytest.raises(ApiError) as exc:
        kube.patch(FJ, "hub", "a", {"metadata": {"resourceVersion": "1", "labels": {"x": "y"}}})
    assert exc.value.status == 409
    kube.patch(
        FJ,
        "hub",
        "a",
        [
            {"op": "test", "path": "/metadata/resourceVersion", "value": rv},
            {"op": "add", "path": "/metadata/labels", "value": {"app": "x"}},
        ],
    )

    assert [o["metadata"]["name"] for o in kube.list(FJ)] == ["a", "b"]
    assert [o["metadata"]["name"] for o in kube.list("fj", "hub", labels="app=x")] == ["a"]
    assert [o["metadata"]["name"] for o in kube.list("fj", labels="app notin (x)")] == ["b"]
    assert [o["metadata"]["name"] for o in kube.list("fj", fields="metadata.name=b")] == ["b"]
    assert kube.list(FJ, "elsewhere") == []

    # Finalizers hold the deletion; removing the last one completes it.
    kube.patch(FJ, "hub", "a", {"metadata": {"finalizers": ["test/hold"]}})
    assert kube.delete(FJ, "hub", "a")["metadata"]["deletionTimestamp"]
    assert kube.get(FJ, "hub", "a") is not None
    kube.patch(FJ, "hub", "a", {"metadata": {"finalizers": None}})
    assert kube.get(FJ, "hub", "a") is None and kube.delete(FJ, "hub", "a") is None

    # generateName, 201, and owner-reference garbage collection.
    owner = kube.get(FJ, "hub", "b")
    ref = {"apiVersion": "fedtune.io/v1alpha1", "kind": "FederatedJob", "name": "b", "uid": owner["metadata"]["uid"]}
    child = kube.request(
        "POST", "/api/v1/namespaces/hub/secrets", {"metadata": {"generateName": "b-", "ownerReferences": [ref]}}
    )
    assert child["metadata"]["name"].startswith("b-")
    kube.delete(FJ, "hub", "b")
    assert kube.get("secrets", "hub", child["metadata"]["name"]) is None

    # Namespaces (kmock alone cannot route them), and the kubernetes client library.
    kube.request("POST", "/api/v1/namespaces", {"metadata": {"name": "hub"}})
    import kubernetes

    core = kubernetes.client.CoreV1Api(kube.api_client())
    assert [n.metadata.name for n in core.list_namespace().items] == ["hub"]
    made = core.create_namespaced_secret("hub", {"metadata": {"name": "s"}, "string_data": {}})
    assert made.metadata.uid and made.metadata.resource_version


def test_watch_resumes_from_resource_versions(kube: KubeEmulator) -> None:
    first = kube.create(fj("a"))["metadata"]["resourceVersion"]
    kube.patch(FJ, "hub", "a", {"spec": {"rounds": 2}})
    kube.create(fj("other", ns="elsewhere"))
    path = "/apis/fedtune.io/v1alpha1/namespaces/hub/federatedjobs"

    # No resourceVersion: the current state as ADDED. From one: what happened after it.
    assert [(e["type"], e["object"]["spec"]["rounds"]) for e in watch(kube, path)] == [("ADDED", 2)]
    assert [e["type"] for e in watch(kube, path, resourceVersion=first)] == ["MODIFIED"]

    # Live events, filtered by field selector, while the watch is open.
    events: list[dict] = []
    t = threading.Thread(
        target=lambda: events.extend(
            watch(
                kube,
                path,
                resourceVersion=kube.list(FJ)[-1]["metadata"]["resourceVersion"],
                fieldSelector="metadata.name=b",
                timeoutSeconds=2,
            )
        )
    )
    t.start()
    time.sleep(0.3)
    kube.create(fj("b"))
    kube.create(fj("c"))
    kube.delete(FJ, "hub", "b")
    t.join()
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [("ADDED", "b"), ("DELETED", "b")]

    # A resourceVersion older than the kept history: 410 Gone, as after etcd compaction.
    kube.call(lambda: setattr(kube.server, "_history_floor", 100))
    (gone,) = watch(kube, path, resourceVersion=first)
    assert gone["type"] == "ERROR" and gone["object"]["code"] == 410


def test_bearer_tokens_are_checked() -> None:
    with KubeEmulator(tokens={"good"}) as kube:
        kube.create(fj("a"))
        kube.token = "bad"
        with pytest.raises(ApiError) as exc:
            kube.get(FJ, "hub", "a")
        assert exc.value.status == 401


def test_kopf_operator_runs_against_the_emulator(kube: KubeEmulator) -> None:
    registry = kopf.OperatorRegistry()  # throw-away handlers must not leak into kopf's default registry
    calls: collections.Counter = collections.Counter()

    @kopf.on.create("fedtune.io", "v1alpha1", "federatedjobs", registry=registry)
    def created(body, name, namespace, patch, **_):
        calls["create"] += 1
        secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": f"{name}-mailbox"}, "data": {}}
        kopf.adopt(secret, owner=body)
        kube.create(secret)
        patch.status["phase"] = "Running"

    @kopf.on.update("fedtune.io", "v1alpha1", "federatedjobs", field="spec", registry=registry)
    def updated(new, patch, **_):
        calls["update"] += 1
        patch.status["rounds"] = new["rounds"]

    @kopf.on.delete("fedtune.io", "v1alpha1", "federatedjobs", registry=registry)
    def deleted(**_):
        calls["delete"] += 1

    started = time.monotonic()
    with kube.run_kopf(registry=registry):
        kube.create(fj("job"))
        job = kube.wait_for(
            lambda: (kube.get(FJ, "hub", "job") or {}).get("status", {}).get("phase") and kube.get(FJ, "hub", "job"),
            what="the status patch",
        )
        assert job["status"]["phase"] == "Running"
        assert "kopf.zalando.org/KopfFinalizerMarker" in job["metadata"]["finalizers"]
        secret = kube.get("secrets", "hub", "job-mailbox")
        assert secret["metadata"]["ownerReferences"][0]["uid"] == job["metadata"]["uid"]

    # A restarted operator picks up where it was: no second creation, new changes handled.
    with kube.run_kopf(registry=registry):
        kube.patch(FJ, "hub", "job", {"spec": {"rounds": 5}})
        kube.wait_for(
            lambda: (kube.get(FJ, "hub", "job") or {}).get("status", {}).get("rounds") == 5, what="the update handler"
        )
        kube.delete(FJ, "hub", "job")
        kube.wait_for(lambda: kube.get(FJ, "hub", "job") is None, what="the deletion")
    assert calls == {"create": 1, "update": 1, "delete": 1}
    assert kube.get("secrets", "hub", "job-mailbox") is None  # garbage-collected with its owner
    assert time.monotonic() - started < 20
