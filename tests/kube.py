"""Kubernetes for tests: a real API server for the session, a client per identity, kopf against it.

    from kube import Kube, kube_fixture  # noqa: F401  (the `kube` fixture)

    def test_operator(kube):
        hub = kube.namespace("hub")                        # "hub-<test id>", PodSecurity restricted
        with kube.run_kopf("fedtune.k8s.operator"):       # as the chart's ServiceAccount
            kube.create({"apiVersion": "fedtune.io/v1alpha1", "kind": "FederatedJob",
                         "metadata": {"name": "j", "namespace": hub}, "spec": {...}})
            job = kube.wait_for(lambda: (kube.get("federatedjobs", hub, "j") or {}).get("status"))

The control plane (tests/kube_cluster.py: etcd, kube-apiserver, kube-controller-manager) starts
once per session with fedtune's CRDs applied server-side from `crds/` and the operator chart's
RBAC (ServiceAccount, ClusterRole, ClusterRoleBinding, rendered by `helm template`) installed.
Each test gets the `kube` fixture: an admin client that names its namespaces uniquely and removes
what it made at the end. `kube.run_kopf` runs the real operator in a thread, logged in with a
TokenRequest token of the operator's ServiceAccount, so RBAC applies to it as in a cluster;
`KUBECONFIG` names the same identity while it runs, for fedtune's own client.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import subprocess
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import urllib3
import yaml
from kube_cluster import ROOT, KubeCluster, kube_bin_dir, kubeconfig

if TYPE_CHECKING:
    from kube_kopf import KopfRun

# "group/version/plural" -> (kind, namespaced, short names): the resources the tests name.
RESOURCES: dict[str, tuple[str, bool, tuple[str, ...]]] = {
    "v1/pods": ("Pod", True, ("po",)),
    "v1/secrets": ("Secret", True, ()),
    "v1/configmaps": ("ConfigMap", True, ("cm",)),
    "v1/serviceaccounts": ("ServiceAccount", True, ("sa",)),
    "v1/services": ("Service", True, ("svc",)),
    "v1/events": ("Event", True, ("ev",)),
    "v1/resourcequotas": ("ResourceQuota", True, ("quota",)),
    "v1/limitranges": ("LimitRange", True, ("limits",)),
    "v1/nodes": ("Node", False, ("no",)),
    "v1/namespaces": ("Namespace", False, ("ns",)),
    "rbac.authorization.k8s.io/v1/roles": ("Role", True, ()),
    "rbac.authorization.k8s.io/v1/rolebindings": ("RoleBinding", True, ()),
    "rbac.authorization.k8s.io/v1/clusterroles": ("ClusterRole", False, ()),
    "rbac.authorization.k8s.io/v1/clusterrolebindings": ("ClusterRoleBinding", False, ()),
    "networking.k8s.io/v1/networkpolicies": ("NetworkPolicy", True, ("netpol",)),
    "apps/v1/deployments": ("Deployment", True, ("deploy",)),
    "coordination.k8s.io/v1/leases": ("Lease", True, ()),
    "apiextensions.k8s.io/v1/customresourcedefinitions": ("CustomResourceDefinition", False, ("crd",)),
    "fedtune.io/v1alpha1/federatedjobs": ("FederatedJob", True, ("fj",)),
    "fedtune.io/v1alpha1/parties": ("Party", True, ()),
}
WITH_STATUS = {"Pod", "Node", "Namespace", "Service", "Deployment", "FederatedJob", "Party", "ResourceQuota"}
OPERATOR_NAMESPACE = "fedtune-system"
RETRY_429 = 20
RESTRICTED = {
    "pod-security.kubernetes.io/enforce": "restricted",
    "pod-security.kubernetes.io/enforce-version": "latest",
}


class ApiError(Exception):
    """A non-2xx answer of the API server; `.status` and the `Status` document `.body`."""

    def __init__(self, status: int, body: Any):
        super().__init__(f"HTTP {status}: {body.get('message') if isinstance(body, dict) else body}")
        self.status, self.body = status, body


def resource_key(spec: str) -> str:
    """`"fedtune.io/v1alpha1/federatedjobs"`, `"v1/pods"`, or a plural, short name or kind."""
    if spec in RESOURCES:
        return spec
    for key, (kind, _, short) in RESOURCES.items():
        if spec.lower() in (key.rsplit("/", 1)[1], kind.lower(), *short):
            return key
    raise KeyError(f"unknown resource {spec!r} (add it to tests/kube.py RESOURCES)")


def api_path(resource: str, namespace: str | None = None, name: str | None = None, sub: str | None = None) -> str:
    key = resource_key(resource)
    group_version, plural = key.rsplit("/", 1)
    parts = [f"/apis/{group_version}" if "/" in group_version else f"/api/{group_version}"]
    parts += ["namespaces", namespace] if namespace and RESOURCES[key][1] else []
    parts += [p for p in (plural, name, sub) if p]
    return "/".join(parts)


@dataclass(frozen=True)
class Identity:
    """Who a client is: the admin's client certificate, or a bearer token (a ServiceAccount's)."""

    name: str
    cert: tuple[Path, Path] | None = None
    token: str | None = None


class AuditLog:
    """The API server's audit log from a mark on (the session's log is one file, every test's in it).

    Each entry is an audit.k8s.io/v1 Event at Metadata level: `stage` (RequestReceived, then
    ResponseStarted for a watch, then ResponseComplete), `user.username`, `verb`, `objectRef`
    ({apiGroup, resource, subresource, namespace, name}), `responseStatus.code`, `userAgent`,
    `requestURI`, `auditID`. Mark before the requests of interest: `audit = kube.audit()`.
    """

    def __init__(self, path: Path):
        self.path = path
        self.start = path.stat().st_size if path.exists() else 0

    def entries(self, user: str | None = None, stage: str | None = "ResponseComplete") -> list[dict[str, Any]]:
        """Entries since the mark, of `user` (exact username) and `stage` (None: any)."""
        with self.path.open("rb") as f:
            f.seek(self.start)
            lines = f.read().split(b"\n")[:-1]  # the last piece is empty, or a line still being written
        out = []
        for line in lines:
            entry = json.loads(line)
            if (stage is None or entry["stage"] == stage) and (user is None or entry["user"]["username"] == user):
                out.append(entry)
        return out

    def requests(self, user: str) -> int:
        """How many requests `user` sent since the mark (answered or not)."""
        return len(self.entries(user, stage="RequestReceived"))

    def completed(self, user: str, timeout: float = 20) -> list[dict[str, Any]]:
        """`user`'s ResponseComplete entries, once every request it sent has one (a watch's comes when
        it ends, and the server writes each entry after its answer: wait for both)."""

        def settled() -> list[dict[str, Any]] | None:
            done = self.entries(user)
            received = {e["auditID"] for e in self.entries(user, stage="RequestReceived")}
            return (done,) if received <= {e["auditID"] for e in done} else None

        return Kube.wait_for(settled, timeout=timeout, what=f"every request of {user} to complete in the audit log")[0]


class Kube:
    """REST helpers against the API server, as one identity (plain HTTP calls, as any client makes)."""

    def __init__(self, cluster: KubeCluster, identity: Identity, workdir: Path):
        self.cluster, self.identity, self.workdir = cluster, identity, workdir
        self.url = cluster.url
        cert = {"cert_file": str(identity.cert[0]), "key_file": str(identity.cert[1])} if identity.cert else {}
        # Pod executors and watches call from many threads: keep their connections (urllib3's default is 1).
        self._http = urllib3.PoolManager(
            maxsize=16,
            ca_certs=str(cluster.ca_file),
            timeout=urllib3.Timeout(connect=5, read=30),
            retries=False,
            **cert,
        )

    def as_identity(self, identity: Identity) -> Kube:
        return Kube(self.cluster, identity, self.workdir)

    # --- REST helpers -------------------------------------------------------------------------

    path = staticmethod(api_path)

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        params: dict[str, Any] | None = None,
        content_type: str = "application/json",
    ) -> Any:
        """One API call; the decoded JSON answer, or ApiError for a non-2xx status.

        429 (a resource's watch cache still initializing, say) is retried after its Retry-After,
        as client-go does, for up to RETRY_429 attempts."""
        query = "?" + urllib.parse.urlencode(params) if params else ""
        headers = {"Accept": "application/json", "User-Agent": f"fedtune-tests/{self.identity.name}"}
        if self.identity.token:
            headers["Authorization"] = f"Bearer {self.identity.token}"
        if body is not None:
            headers["Content-Type"] = content_type
        data = None if body is None else body if isinstance(body, bytes) else json.dumps(body).encode()
        for _ in range(RETRY_429):
            resp = self._http.request(method, self.url + path + query, headers=headers, body=data)
            if resp.status != 429:
                break
            time.sleep(min(float(resp.headers.get("Retry-After") or 1), 1))
        try:
            doc = json.loads(resp.data) if resp.data else None
        except ValueError:
            doc = resp.data.decode(errors="replace")
        if resp.status >= 300:
            raise ApiError(resp.status, doc)
        return doc

    def create(self, obj: dict[str, Any], namespace: str | None = None) -> dict[str, Any]:
        """Create an object (resource from apiVersion and kind); a given status is then set via /status."""
        key = next(
            (k for k, v in RESOURCES.items() if k.rsplit("/", 1)[0] == obj["apiVersion"] and v[0] == obj["kind"]), None
        )
        if key is None:
            raise KeyError(f"no resource known for {obj['apiVersion']} {obj['kind']} (tests/kube.py RESOURCES)")
        ns = (namespace or obj.get("metadata", {}).get("namespace")) if RESOURCES[key][1] else None
        made = self.request("POST", api_path(key, ns), obj)
        if obj.get("status") and obj["kind"] in WITH_STATUS:
            # The server drops status on create; set it the way the object's controller would.
            made = self.patch(key, ns, made["metadata"]["name"], {"status": obj["status"]}, subresource="status")
        return made

    def get(self, resource: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        """The object, or None when it does not exist."""
        try:
            return self.request("GET", api_path(resource, namespace, name))
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    def list(
        self, resource: str, namespace: str | None = None, *, labels: str | None = None, fields: str | None = None
    ) -> list[dict[str, Any]]:
        params = {k: v for k, v in (("labelSelector", labels), ("fieldSelector", fields)) if v}
        return self.request("GET", api_path(resource, namespace), params=params)["items"]

    def patch(
        self, resource: str, namespace: str | None, name: str, patch: dict | list, *, subresource: str | None = None
    ) -> dict[str, Any]:
        """A merge patch (dict) or a JSON patch (list); `subresource="status"` for the status."""
        ctype = "application/json-patch+json" if isinstance(patch, list) else "application/merge-patch+json"
        return self.request("PATCH", api_path(resource, namespace, name, subresource), patch, content_type=ctype)

    def delete(
        self, resource: str, namespace: str | None, name: str, *, grace: int | None = None
    ) -> dict[str, Any] | None:
        """Delete (or start deleting, with finalizers or a grace period); None when it did not exist."""
        body = {"propagationPolicy": "Background", **({"gracePeriodSeconds": grace} if grace is not None else {})}
        try:
            return self.request("DELETE", api_path(resource, namespace, name), body)
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    def token_for(self, namespace: str, service_account: str, *, pod: dict | None = None, seconds: int = 7200) -> str:
        """A TokenRequest token of a ServiceAccount (bound to `pod` when given, as a kubelet asks)."""
        spec: dict[str, Any] = {"expirationSeconds": seconds}
        if pod is not None:
            meta = pod["metadata"]
            spec["boundObjectRef"] = {"apiVersion": "v1", "kind": "Pod", "name": meta["name"], "uid": meta["uid"]}
        doc = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec}
        made = self.request("POST", api_path("serviceaccounts", namespace, service_account, "token"), doc)
        return made["status"]["token"]

    @staticmethod
    def wait_for(predicate: Callable[[], Any], timeout: float = 10, what: str = "the condition") -> Any:
        """Poll `predicate` until it returns something truthy; return that, or fail the test."""
        deadline, last = time.monotonic() + timeout, None
        while time.monotonic() < deadline:
            last = predicate()
            if last:
                return last
            time.sleep(0.1)
        raise AssertionError(f"{what} did not happen in {timeout}s (last value: {last!r})")

    def audit(self) -> AuditLog:
        """The audit log, marked now: its entries from here on."""
        return AuditLog(self.cluster.audit_log)

    # --- other clients: kubeconfig, kubernetes client, kopf --------------------------------

    @property
    def kubeconfig(self) -> Path:
        """A kubeconfig file for this identity."""
        # KUBECONFIG is a colon-separated list: no colon in the file name
        path = self.workdir / f"{self.identity.name.replace(':', '_')}.kubeconfig"
        if not path.exists():
            cert, key = self.identity.cert or (None, None)
            cfg = kubeconfig(self.url, self.cluster.ca_file, cert=cert, key=key, token=self.identity.token)
            path.write_text(json.dumps(cfg))  # JSON is YAML
        return path

    def api_client(self) -> Any:
        """A `kubernetes.client.ApiClient` for this identity (the global default config is untouched)."""
        import kubernetes

        cfg = kubernetes.client.Configuration()
        kubernetes.config.load_kube_config(config_file=str(self.kubeconfig), client_configuration=cfg)
        return kubernetes.client.ApiClient(cfg)

    def connection_info(self) -> Any:
        import kopf

        cert = self.identity.cert
        return kopf.ConnectionInfo(
            server=self.url,
            ca_path=str(self.cluster.ca_file),
            scheme="Bearer" if self.identity.token else None,
            token=self.identity.token,
            certificate_path=str(cert[0]) if cert else None,
            private_key_path=str(cert[1]) if cert else None,
        )


class KubeTest(Kube):
    """The admin client of one test: unique namespaces, the operator's identity, cleanup at the end."""

    def __init__(self, cluster: KubeCluster, workdir: Path, operator: Identity, test_id: str):
        super().__init__(cluster, Identity("admin", cert=cluster.admin_cert), workdir)
        self.operator, self.test_id = operator, test_id
        self.namespaces: list[str] = []
        self.objects: list[tuple[str, str | None, str]] = []  # (resource, namespace, name) made by this test

    def namespace(self, base: str, *, labels: dict[str, str] | None = None) -> str:
        """Create the namespace `<base>-<test id>` (PodSecurity `restricted` enforced) and return its name."""
        name = f"{base}-{self.test_id}"[:63].rstrip("-")
        meta = {"name": name, "labels": {**RESTRICTED, **(labels or {})}}
        self.create({"apiVersion": "v1", "kind": "Namespace", "metadata": meta})
        self.namespaces.append(name)
        return name

    def node(self, name: str, *, cpu: str = "16", memory: str = "64Gi", gpus: int = 0) -> dict:
        """A Node with this allocatable (removed at the end of the test; nothing runs it but the pod executor)."""
        resources = {"cpu": cpu, "memory": memory, "pods": "110", "nvidia.com/gpu": str(gpus)}
        self.create(
            {
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {"name": name},
                "status": {
                    "capacity": resources,
                    "allocatable": resources,
                    "conditions": [
                        {
                            "type": "Ready",
                            "status": "True",
                            "reason": "KubeletReady",
                            "message": "the test's pod executor runs this node's pods",
                        }
                    ],
                },
            }
        )
        self.objects.append(("nodes", None, name))
        # Admission taints a new node not-ready; the node lifecycle controller lifts the taint once the
        # kubelet reports Ready. Neither runs here: lift it as that controller would.
        return self.patch("nodes", None, name, {"spec": {"taints": None}})

    @contextlib.contextmanager
    def run_kopf(
        self, module: str | os.PathLike[str] | None = None, *, identity: Identity | None = None, **kwargs: Any
    ) -> Iterator[KopfRun]:
        """Run a kopf operator for the duration of the block, as `identity` (default: the chart's
        operator ServiceAccount); see KopfRun."""
        from kube_kopf import KopfRun

        client = self.as_identity(identity or self.operator)
        run = KopfRun(client, module, **kwargs)
        previous = os.environ.get("KUBECONFIG")
        os.environ["KUBECONFIG"] = str(client.kubeconfig)
        try:
            run.start()
            yield run
        finally:
            try:
                run.stop()
            finally:
                if previous is None:
                    os.environ.pop("KUBECONFIG", None)
                else:
                    os.environ["KUBECONFIG"] = previous

    def cleanup(self) -> None:
        """Remove what the test made: fedtune objects (finalizers dropped: no operator runs now),
        pods (at once: no kubelet finishes them), then the namespaces and cluster-scoped objects."""
        for ns in self.namespaces:
            for res in ("federatedjobs", "parties"):
                for obj in self.list(res, ns):
                    name = obj["metadata"]["name"]
                    with contextlib.suppress(ApiError):
                        self.patch(res, ns, name, {"metadata": {"finalizers": None}})
                    self.delete(res, ns, name)
            for pod in self.list("pods", ns):
                self.delete("pods", ns, pod["metadata"]["name"], grace=0)
            self.delete("namespaces", None, ns)
        for res, ns, name in self.objects:
            self.delete(res, ns, name)

    def install_operator(
        self, release: str, values: dict[str, Any] | None = None, docs: list[dict] | None = None
    ) -> Identity:
        """The operator chart's RBAC as release `release` (also its fullnameOverride, so the
        ServiceAccount's username is this run's own in the audit log), or `docs` (an edited copy);
        removed at the end of the test. Returns a TokenRequest identity of its ServiceAccount."""
        docs = docs if docs is not None else operator_rbac({"fullnameOverride": release, **(values or {})}, release)
        identity = install_operator_identity(self, docs=docs)
        for doc in docs:
            meta = doc["metadata"]
            if meta.get("namespace") not in self.namespaces:  # the test's namespaces go as a whole
                self.objects.append((resource_key(doc["kind"]), meta.get("namespace"), meta["name"]))
        return identity


# --- the session: control plane, CRDs, the operator chart's RBAC --------------------------------


def helm() -> str:
    local = ROOT / ".tools" / "bin" / "helm"
    return str(local) if local.exists() else "helm"


def kubectl() -> str:
    local = ROOT / ".tools" / "bin" / "kubectl"
    return str(local) if local.exists() else "kubectl"


def apply_server_side(admin: Kube, docs: list[dict], manager: str = "fedtune-tests") -> None:
    """Server-side apply of each document (the API server merges and owns the fields)."""
    for doc in docs:
        meta = doc["metadata"]
        key = resource_key(f"{doc['kind']}")
        path = api_path(key, meta.get("namespace"), meta["name"])
        admin.request(
            "PATCH",
            path,
            doc,
            params={"fieldManager": manager, "force": "true"},
            content_type="application/apply-patch+yaml",
        )


def operator_rbac(values: dict[str, Any] | None = None, release: str = "fedtune") -> list[dict]:
    """The operator chart's ServiceAccount and RBAC objects, rendered by `helm template`."""
    args = [helm(), "template", release, str(ROOT / "helm" / "fedtune-operator"), "--namespace", OPERATOR_NAMESPACE]
    for key, value in (values or {}).items():
        args += ["--set-json", f"{key}={json.dumps(value)}"]
    out = subprocess.run(args, capture_output=True, text=True, check=True, timeout=60).stdout
    kinds = {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"}
    return [d for d in yaml.safe_load_all(out) if d and d.get("kind") in kinds]


def install_operator_identity(
    admin: Kube, values: dict[str, Any] | None = None, release: str = "fedtune", *, docs: list[dict] | None = None
) -> Identity:
    """Apply the chart's RBAC (or `docs`, e.g. an edited copy of it) and return a TokenRequest
    identity of its ServiceAccount, once the server authorizes by the new bindings."""
    docs = docs if docs is not None else operator_rbac(values, release)
    apply_server_side(admin, docs)
    (sa,) = [d for d in docs if d["kind"] == "ServiceAccount"]
    user = f"system:serviceaccount:{OPERATOR_NAMESPACE}:{sa['metadata']['name']}"
    wait_bindings_effective(admin, docs)
    token = admin.token_for(OPERATOR_NAMESPACE, sa["metadata"]["name"], seconds=24 * 3600)
    return Identity(user, token=token)


def wait_bindings_effective(admin: Kube, docs: list[dict]) -> None:
    """Until the API server authorizes by every (Cluster)RoleBinding in `docs`: it learns of RBAC
    objects through a watch, a moment after they are written. A SubjectAccessReview per binding,
    for the first verb of the first rule of its role (which must be in `docs` too)."""
    roles = {(d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"]): d for d in docs}
    for binding in (d for d in docs if d["kind"] in ("RoleBinding", "ClusterRoleBinding")):
        ns = binding["metadata"].get("namespace")
        ref = binding["roleRef"]
        rule = roles[(ref["kind"], ns if ref["kind"] == "Role" else None, ref["name"])]["rules"][0]
        for subject in binding["subjects"]:
            user = f"system:serviceaccount:{subject['namespace']}:{subject['name']}"
            resource, _, sub = rule["resources"][0].partition("/")
            attrs = {"verb": rule["verbs"][0], "group": rule["apiGroups"][0], "resource": resource, "subresource": sub}
            if ns:
                attrs["namespace"] = ns
            review = {
                "apiVersion": "authorization.k8s.io/v1",
                "kind": "SubjectAccessReview",
                "spec": {"user": user, "groups": ["system:serviceaccounts"], "resourceAttributes": attrs},
            }
            admin.wait_for(
                lambda r=review: admin.request("POST", "/apis/authorization.k8s.io/v1/subjectaccessreviews", r)[
                    "status"
                ].get("allowed"),
                timeout=10,
                what=f"{binding['kind']} {binding['metadata']['name']} to take effect for {user}",
            )


def crd_documents() -> list[dict]:
    return [yaml.safe_load(p.read_text()) for p in sorted((ROOT / "crds").glob("*.yaml"))]


def install_crds(admin: Kube) -> None:
    """fedtune's CRDs, applied server-side and waited for until Established."""
    apply_server_side(admin, crd_documents())
    for crd in crd_documents():
        name = crd["metadata"]["name"]
        admin.wait_for(
            lambda n=name: any(
                c["type"] == "Established" and c["status"] == "True"
                for c in ((admin.get("crd", None, n) or {}).get("status") or {}).get("conditions", [])
            ),
            timeout=30,
            what=f"CRD {name} established",
        )


def install_fedtune(admin: Kube) -> Identity:
    """fedtune's CRDs (see install_crds: a no-op when they are there), the operator's namespace and the
    chart's RBAC on a fresh cluster; the operator's identity (see install_operator_identity)."""
    install_crds(admin)
    admin.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": OPERATOR_NAMESPACE}})
    return install_operator_identity(admin)


@dataclass
class Session:
    cluster: KubeCluster
    admin: Kube
    operator: Identity
    workdir: Path


@pytest.fixture(scope="session")
def kube_session(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[Session]:
    """The session's control plane with fedtune's CRDs and the operator chart's RBAC (see the module doc)."""
    workdir = tmp_path_factory.mktemp("kube")
    cluster = KubeCluster(kube_bin_dir(), workdir / "cluster")
    # The CRDs before the controller-manager: its garbage collector then watches FederatedJobs from the
    # start (it looks for new resources only every 30 s: children of a job were collected ~40 s late).
    admin_identity = Identity("admin", cert=cluster.admin_cert)
    cluster.start(before_controllers=lambda: install_crds(Kube(cluster, admin_identity, workdir)))
    try:
        admin = Kube(cluster, admin_identity, workdir)
        operator = install_fedtune(admin)
        yield Session(cluster, admin, operator, workdir)
    finally:
        cluster.stop()
        if request.session.testsfailed:
            print(f"\nkube: control-plane logs and audit log kept in {cluster.dir}")


@contextlib.contextmanager
def kube_test(session: Session, prefix: str = "test") -> Iterator[KubeTest]:
    """An admin client with its own id and work directory (`<prefix>-<id>`), removing what it made at
    the end: the `kube` fixture's, and for a module-scoped fixture that needs its own."""
    test_id = uuid.uuid4().hex[:6]
    workdir = session.workdir / f"{prefix}-{test_id}"
    workdir.mkdir()
    client = KubeTest(session.cluster, workdir, session.operator, test_id)
    try:
        yield client
    finally:
        client.cleanup()


@pytest.fixture(name="kube")
def kube_fixture(kube_session: Session) -> Iterator[KubeTest]:
    """`kube`: the admin client of one test on the session's API server (import `kube_fixture`)."""
    with kube_test(kube_session) as client:
        yield client


def secret_doc(namespace: str, name: str, data: dict[str, str]) -> dict:
    """A Secret document with base64-encoded string values."""
    enc = {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": namespace}, "data": enc}
