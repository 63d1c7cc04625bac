"""Kubernetes for tests: an emulated API server on a real port, and kopf operators run against it.

    from kube import KubeEmulator, kube_fixture  # noqa: F401  (the `kube` fixture)

    def test_operator(kube):
        with kube.run_kopf("fedtune.k8s.operator"):           # the real operator module
            kube.create({"apiVersion": "fedtune.io/v1alpha1", "kind": "FederatedJob",
                         "metadata": {"name": "j", "namespace": "hub"}, "spec": {...}})
            job = kube.wait_for(lambda: (kube.get("federatedjobs", "hub", "j") or {}).get("status"))

The server (tests/kube_emulator.py) runs in its own thread and event loop, so synchronous
tests, async tests and kopf's own thread all talk to it over HTTP like to a real cluster.
kopf gets its credentials through a pre-filled vault (no login handler needed, the operator
module's own login handlers are not consulted); `KUBECONFIG` points at the emulator while
an operator runs, for operator code that builds its own `kubernetes` client.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp.web
import kmock
import pytest
import urllib3
from kube_emulator import ApiServer

if TYPE_CHECKING:
    from kube_kopf import KopfRun

# "group/version/plural" -> (kind, namespaced, subresources, short names). With a "status"
# subresource the server keeps status apart, as a real one does: set it with
# `patch(..., subresource="status")` (pods, nodes, fedtune resources) or give it to `create`.
RESOURCES: dict[str, tuple[str, bool, tuple[str, ...], tuple[str, ...]]] = {
    "v1/pods": ("Pod", True, ("status",), ("po",)),
    "v1/secrets": ("Secret", True, (), ()),
    "v1/configmaps": ("ConfigMap", True, (), ("cm",)),
    "v1/serviceaccounts": ("ServiceAccount", True, (), ("sa",)),
    "v1/services": ("Service", True, ("status",), ("svc",)),
    "v1/events": ("Event", True, (), ("ev",)),
    "v1/nodes": ("Node", False, ("status",), ("no",)),
    "v1/namespaces": ("Namespace", False, ("status",), ("ns",)),
    "rbac.authorization.k8s.io/v1/roles": ("Role", True, (), ()),
    "rbac.authorization.k8s.io/v1/rolebindings": ("RoleBinding", True, (), ()),
    "apiextensions.k8s.io/v1/customresourcedefinitions": ("CustomResourceDefinition", False, ("status",), ("crd",)),
    "fedtune.io/v1alpha1/federatedjobs": ("FederatedJob", True, ("status",), ("fj",)),
    "fedtune.io/v1alpha1/parties": ("Party", True, ("status",), ()),
}
VERBS = {"create", "delete", "get", "list", "patch", "update", "watch"}


class ApiError(Exception):
    """A non-2xx answer of the emulated API server; `.status` and the `Status` document `.body`."""

    def __init__(self, status: int, body: Any):
        super().__init__(f"HTTP {status}: {body.get('message') if isinstance(body, dict) else body}")
        self.status, self.body = status, body


class KubeEmulator:
    """An emulated API server on 127.0.0.1:<free port> with REST helpers (see the module doc)."""

    def __init__(self, resources: dict[str, tuple] | None = None, *, tokens: set[str] | None = None):
        self.resources = dict(RESOURCES if resources is None else resources)
        self.tokens = tokens
        self.token = next(iter(sorted(tokens))) if tokens else "kube-emulator"  # what the helpers send
        self.url = ""
        self.server: ApiServer  # the kmock handler: .objects, .resources, kmock's DSL (use .call())
        # Pod executors and watches call from many threads: keep their connections (urllib3's default is 1).
        self._http = urllib3.PoolManager(maxsize=16, timeout=urllib3.Timeout(connect=5, read=30), retries=False)
        self._tmp = Path(tempfile.mkdtemp(prefix="kube-emulator-"))

    # --- lifecycle: the server lives in its own thread and loop ------------------------

    def __enter__(self) -> KubeEmulator:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="kube-emulator", daemon=True)
        self._thread.start()
        self.call(self._astart)
        return self

    def __exit__(self, *exc: object) -> None:
        self.call(self._astop)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()
        self._http.clear()
        shutil.rmtree(self._tmp, ignore_errors=True)

    async def _astart(self) -> None:
        self.server = ApiServer(tokens=self.tokens)
        for key, (kind, namespaced, subresources, short) in self.resources.items():
            self.server.resources[key] = kmock.ResourceInfo(
                kind=kind,
                namespaced=namespaced,
                singular=kind.lower(),
                verbs=VERBS,
                subresources=subresources,
                shortnames=short,
            )
        await self.server.__aenter__()
        # A short shutdown grace: open watches would otherwise hold the exit for a minute.
        self._runner = aiohttp.web.ServerRunner(aiohttp.web.Server(self.server), shutdown_timeout=0.5)
        await self._runner.setup()
        await aiohttp.web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"

    async def _astop(self) -> None:
        await self._runner.cleanup()
        # Watches still open past the grace: end them here rather than leave them to the GC.
        pending = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        await self.server.__aexit__(None, None, None)

    def call(self, fn: Callable[..., Any], *args: Any, timeout: float = 10) -> Any:
        """Run `fn(*args)` (sync or async) in the server's loop: the safe way to touch `.server`."""

        async def invoke() -> Any:
            result = fn(*args)
            return await result if asyncio.iscoroutine(result) else result

        return asyncio.run_coroutine_threadsafe(invoke(), self._loop).result(timeout)

    # --- REST helpers (plain HTTP, as any client would) ----------------------------------

    def resource(self, spec: str) -> kmock.resource:
        """`"fedtune.io/v1alpha1/federatedjobs"`, `"v1/pods"`, or just a plural/short name/kind."""
        if "/" in spec:
            return kmock.resource(spec)
        for key, (kind, _, _, short) in self.resources.items():
            if spec.lower() in (key.rsplit("/", 1)[1], kind.lower(), *short):
                return kmock.resource(key)
        raise KeyError(f"unknown resource {spec!r}")

    def path(
        self, resource: str, namespace: str | None = None, name: str | None = None, subresource: str | None = None
    ) -> str:
        res = self.resource(resource)
        parts = [f"/apis/{res.group}/{res.version}" if res.group else f"/api/{res.version}"]
        parts += ["namespaces", namespace] if namespace else []
        parts += [p for p in (res.plural, name, subresource) if p]
        return "/".join(parts)

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        params: dict[str, Any] | None = None,
        content_type: str = "application/json",
    ) -> Any:
        """One API call; the decoded JSON answer, or ApiError for a non-2xx status."""
        query = "?" + urllib.parse.urlencode(params) if params else ""
        headers = {"Authorization": f"Bearer {self.token}", "Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = content_type
        resp = self._http.request(
            method, self.url + path + query, headers=headers, body=None if body is None else json.dumps(body).encode()
        )
        try:
            doc = json.loads(resp.data) if resp.data else None
        except ValueError:
            doc = resp.data.decode(errors="replace")
        if resp.status >= 300:
            raise ApiError(resp.status, doc)
        return doc

    def create(self, obj: dict[str, Any], namespace: str | None = None) -> dict[str, Any]:
        """Create an object (resource from apiVersion and kind); a given status is then set via /status."""
        api, kind = obj["apiVersion"], obj["kind"]
        key = next((k for k, v in self.resources.items() if k.rsplit("/", 1)[0] == api and v[0] == kind), None)
        if key is None:
            raise KeyError(f"no resource registered for {api} {kind}")
        ns = (namespace or obj.get("metadata", {}).get("namespace")) if self.resources[key][1] else None
        made = self.request("POST", self.path(key, ns), obj)
        if obj.get("status") and "status" in self.resources[key][2]:
            # The server drops status on create; set it the way the object's controller would.
            made = self.patch(key, ns, made["metadata"]["name"], {"status": obj["status"]}, subresource="status")
        return made

    def get(self, resource: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        """The object, or None when it does not exist."""
        try:
            return self.request("GET", self.path(resource, namespace, name))
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    def list(
        self, resource: str, namespace: str | None = None, *, labels: str | None = None, fields: str | None = None
    ) -> list[dict[str, Any]]:
        params = {k: v for k, v in (("labelSelector", labels), ("fieldSelector", fields)) if v}
        return self.request("GET", self.path(resource, namespace), params=params)["items"]

    def patch(
        self, resource: str, namespace: str | None, name: str, patch: dict | list, *, subresource: str | None = None
    ) -> dict[str, Any]:
        """A merge patch (dict) or a JSON patch (list); `subresource="status"` for the status."""
        ctype = "application/json-patch+json" if isinstance(patch, list) else "application/merge-patch+json"
        return self.request("PATCH", self.path(resource, namespace, name, subresource), patch, content_type=ctype)

    def delete(self, resource: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        """Delete (or start deleting, with finalizers); None when it did not exist."""
        try:
            return self.request("DELETE", self.path(resource, namespace, name))
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    @staticmethod
    def wait_for(predicate: Callable[[], Any], timeout: float = 10, what: str = "the condition") -> Any:
        """Poll `predicate` until it returns something truthy; return that, or fail the test."""
        deadline, last = time.monotonic() + timeout, None
        while time.monotonic() < deadline:
            last = predicate()
            if last:
                return last
            time.sleep(0.05)
        raise AssertionError(f"{what} did not happen in {timeout}s (last value: {last!r})")

    # --- clients: kubeconfig, kubernetes client, kopf ------------------------------------

    @property
    def kubeconfig(self) -> Path:
        """A kubeconfig file for this server (token auth, plain http)."""
        path = self._tmp / "kubeconfig"
        if not path.exists():
            cfg = {
                "apiVersion": "v1",
                "kind": "Config",
                "current-context": "emulator",
                "clusters": [{"name": "emulator", "cluster": {"server": self.url}}],
                "users": [{"name": "emulator", "user": {"token": self.token}}],
                "contexts": [
                    {"name": "emulator", "context": {"cluster": "emulator", "user": "emulator", "namespace": "default"}}
                ],
            }
            path.write_text(json.dumps(cfg))  # JSON is YAML
        return path

    def api_client(self) -> Any:
        """A `kubernetes.client.ApiClient` for this server (the global default config is untouched)."""
        import kubernetes

        cfg = kubernetes.client.Configuration()
        kubernetes.config.load_kube_config(config_file=str(self.kubeconfig), client_configuration=cfg)
        return kubernetes.client.ApiClient(cfg)

    def connection_info(self) -> Any:
        import kopf

        return kopf.ConnectionInfo(server=self.url, scheme="Bearer", token=self.token, insecure=True)

    @contextlib.contextmanager
    def run_kopf(self, module: str | os.PathLike[str] | None = None, **kwargs: Any) -> Iterator[KopfRun]:
        """Run a kopf operator against this server for the duration of the block; see KopfRun."""
        from kube_kopf import KopfRun

        run = KopfRun(self, module, **kwargs)
        previous = os.environ.get("KUBECONFIG")
        os.environ["KUBECONFIG"] = str(self.kubeconfig)
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


@pytest.fixture(name="kube")
def kube_fixture() -> Iterator[KubeEmulator]:
    """`kube`: a fresh emulated API server for one test (import `kube_fixture` to use it)."""
    with KubeEmulator() as emulator:
        yield emulator
