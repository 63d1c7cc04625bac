"""A real Kubernetes control plane for the tests: etcd, kube-apiserver and kube-controller-manager.

    cluster = KubeCluster(bin_dir, workdir); cluster.start(); ...; cluster.stop()

The binaries come from `scripts/build-kube.sh` (built from the Go module proxy, cached by version).
Everything listens on loopback ports picked free at start:

- etcd, one member, plain http on loopback (only the API server talks to it), aged by a few
  revisions before the API server starts, so a watch from resourceVersion "1" is too old (410);
- kube-apiserver with TLS from a throwaway CA (`ca.crt`), an admin client certificate (group
  system:masters), RBAC authorization, the default admission plugins (PodSecurity,
  ServiceAccount, NamespaceLifecycle, ResourceQuota, ...), a service-account issuer and signing
  key (so TokenRequest works), and an audit log of every request at Metadata level;
- kube-controller-manager with the garbage collector, namespace, service-account, token,
  root-CA publisher, resource-quota and ClusterRole-aggregation controllers (CONTROLLERS; no
  scheduler and no kubelet: tests/pod_executor.py plays both).

`start` waits for /readyz, the `default` namespace and its `default` ServiceAccount. `stop`
ends the processes by PID (SIGTERM, then SIGKILL). Logs stay in `workdir` (`*.log`) and the
fixture prints where they are when a test of the session failed.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import ipaddress
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import urllib3
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

ROOT = Path(__file__).resolve().parents[1]
ISSUER = "https://kubernetes.default.svc.cluster.local"
CONTROLLERS = (
    "garbage-collector-controller",
    "namespace-controller",
    "serviceaccount-controller",
    "serviceaccount-token-controller",
    "root-ca-certificate-publisher-controller",
    "resourcequota-controller",  # fills a quota's status.hard/used; admission ignores a quota without it
    "clusterrole-aggregation-controller",  # fills the admin/edit/view ClusterRoles (empty without it)
)
READY_CHECKS = (
    ("/readyz", "the API server's /readyz"),
    ("/api/v1/namespaces/default", "the default namespace"),
    ("/api/v1/namespaces/default/serviceaccounts/default", "the default ServiceAccount (controller-manager)"),
)
# Revisions written to etcd before the API server starts (see KubeCluster._age_etcd).
ETCD_HISTORY = 50
# Every request, at Metadata level (who, verb, resource, namespace, answer): what the RBAC tests read.
AUDIT_POLICY = {"apiVersion": "audit.k8s.io/v1", "kind": "Policy", "rules": [{"level": "Metadata"}]}


class ClusterError(RuntimeError):
    """The control plane could not be started (missing binaries, a component exited, not ready)."""


def kube_bin_dir() -> Path:
    """Where the binaries are: $FEDTUNE_KUBE_BIN when set, else the directory `scripts/build-kube.sh
    --where` prints (its cache for the pinned versions; it builds nothing, and `start` says how to
    build what is missing, since a cold build takes minutes)."""
    env = os.environ.get("FEDTUNE_KUBE_BIN")
    if env:
        return Path(env)
    script = ROOT / "scripts" / "build-kube.sh"
    proc = subprocess.run(["bash", str(script), "--where"], capture_output=True, text=True, check=False, timeout=600)
    where = Path(proc.stdout.strip().splitlines()[-1]) if proc.stdout.strip() else None
    if proc.returncode != 0 or where is None:
        raise ClusterError(f"scripts/build-kube.sh --where failed: {proc.stderr.strip()}")
    return where


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- a throwaway PKI ----------------------------------------------------------------------------


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _cert(
    subject: x509.Name, key, issuer: x509.Name, signer, *, ca: bool = False, server: bool = False
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    b = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        b = b.add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True)
    else:
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        b = b.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if server:
        names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        b = b.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return b.sign(signer, hashes.SHA256())


def _name(cn: str, org: str | None = None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    if org:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, org))
    return x509.Name(attrs)


def make_pki(pki: Path) -> None:
    """ca.crt/key, apiserver.crt/key (127.0.0.1), admin.crt/key (system:masters),
    controller-manager.crt/key (system:kube-controller-manager), sa.key/pub (token signing)."""
    pki.mkdir(parents=True, exist_ok=True)
    ca_key, ca_name = _key(), _name("fedtune-test-ca")
    ca = _cert(ca_name, ca_key, ca_name, ca_key, ca=True)
    (pki / "ca.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (pki / "ca.key").write_bytes(_pem_key(ca_key))
    leaves = {
        "apiserver": (_name("kube-apiserver"), True),
        "admin": (_name("fedtune-test-admin", "system:masters"), False),
        "controller-manager": (_name("system:kube-controller-manager"), False),
    }
    for stem, (subject, server) in leaves.items():
        key = _key()
        cert = _cert(subject, key, ca_name, ca_key, server=server)
        (pki / f"{stem}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (pki / f"{stem}.key").write_bytes(_pem_key(key))
    sa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    (pki / "sa.key").write_bytes(_pem_key(sa))
    (pki / "sa.pub").write_bytes(
        sa.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )


def kubeconfig(
    server: str,
    ca: Path,
    *,
    cert: Path | None = None,
    key: Path | None = None,
    token: str | None = None,
    namespace: str = "default",
) -> dict:
    """A kubeconfig document for one user (client certificate or bearer token)."""
    user: dict[str, str] = {"token": token} if token else {"client-certificate": str(cert), "client-key": str(key)}
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "current-context": "test",
        "clusters": [{"name": "test", "cluster": {"server": server, "certificate-authority": str(ca)}}],
        "users": [{"name": "test", "user": user}],
        "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test", "namespace": namespace}}],
    }


# --- the control plane --------------------------------------------------------------------------


class KubeCluster:
    """etcd + kube-apiserver + kube-controller-manager on loopback (see the module doc)."""

    def __init__(self, bin_dir: Path, workdir: Path):
        self.bin, self.dir = Path(bin_dir), Path(workdir)
        self.pki = self.dir / "pki"
        self.procs: dict[str, subprocess.Popen] = {}
        self.url = ""

    # files the clients use
    @property
    def ca_file(self) -> Path:
        return self.pki / "ca.crt"

    @property
    def admin_cert(self) -> tuple[Path, Path]:
        return self.pki / "admin.crt", self.pki / "admin.key"

    @property
    def audit_log(self) -> Path:
        return self.dir / "audit.log"

    def admin_kubeconfig(self) -> Path:
        path = self.dir / "admin.kubeconfig"
        if not path.exists():
            cert, key = self.admin_cert
            path.write_text(json.dumps(kubeconfig(self.url, self.ca_file, cert=cert, key=key)))
        return path

    def start(self, timeout: float = 120, before_controllers: Callable[[], object] | None = None) -> None:
        """Start everything and wait until ready; `before_controllers` runs once the API server is
        ready and before the controller-manager starts (e.g. to install CRDs its controllers should
        see from their start)."""
        missing = [b for b in ("etcd", "kube-apiserver", "kube-controller-manager") if not (self.bin / b).exists()]
        if missing:
            raise ClusterError(
                f"{', '.join(missing)} not found in {self.bin}: run `bash scripts/build-kube.sh` (needs Go 1.26; "
                "the first build takes minutes, then it is cached)"
            )
        self.dir.mkdir(parents=True, exist_ok=True)
        make_pki(self.pki)
        try:
            deadline = time.monotonic() + timeout
            self._start_etcd()
            self._age_etcd(deadline)
            self._start_apiserver()
            self._wait_ready(deadline, READY_CHECKS[:1])  # RBAC's bootstrap roles exist once it is ready
            if before_controllers is not None:
                before_controllers()
            self._start_controller_manager()
            self._wait_ready(deadline, READY_CHECKS[1:])
        except BaseException:
            self.stop()
            raise

    def _spawn(self, name: str, args: list[str]) -> None:
        log = (self.dir / f"{name}.log").open("ab")
        self.procs[name] = subprocess.Popen(
            [str(self.bin / name), *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.close()

    def _start_etcd(self) -> None:
        client, peer = free_port(), free_port()
        self.etcd_url = f"http://127.0.0.1:{client}"
        self._spawn(
            "etcd",
            [
                "--name=fedtune-test",
                f"--data-dir={self.dir / 'etcd'}",
                f"--listen-client-urls={self.etcd_url}",
                f"--advertise-client-urls={self.etcd_url}",
                f"--listen-peer-urls=http://127.0.0.1:{peer}",
                f"--initial-advertise-peer-urls=http://127.0.0.1:{peer}",
                f"--initial-cluster=fedtune-test=http://127.0.0.1:{peer}",
                "--unsafe-no-fsync",  # a throwaway store: durability is not what the tests are about
                "--log-level=warn",
            ],
        )

    def _age_etcd(self, deadline: float) -> None:
        """Write ETCD_HISTORY revisions before the API server starts, so its watch caches begin past
        them, as in any cluster that has run a while: a watch from an old resourceVersion such as
        "1" is then answered 410 Expired, as clients must handle. (On a fresh store the caches
        start at revision 1 or 2 and replay everything since "1" instead.)"""
        http = urllib3.PoolManager(retries=False, timeout=urllib3.Timeout(connect=1, read=5))
        key = base64.b64encode(b"fedtune-test/history").decode()
        while True:
            self._check_alive()
            try:
                if http.request("GET", self.etcd_url + "/health").status == 200:
                    break
            except urllib3.exceptions.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise ClusterError(f"etcd did not answer /health in time; logs in {self.dir}")
            time.sleep(0.1)
        for i in range(ETCD_HISTORY):
            value = base64.b64encode(str(i).encode()).decode()
            resp = http.request("POST", self.etcd_url + "/v3/kv/put", body=json.dumps({"key": key, "value": value}))
            if resp.status != 200:
                raise ClusterError(f"etcd refused a put: HTTP {resp.status} {resp.data[:200]!r}")
        http.clear()

    def _start_apiserver(self) -> None:
        port = free_port()
        self.url = f"https://127.0.0.1:{port}"
        policy = self.dir / "audit-policy.json"
        policy.write_text(json.dumps(AUDIT_POLICY))
        p = self.pki
        self._spawn(
            "kube-apiserver",
            [
                f"--etcd-servers={self.etcd_url}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={port}",
                f"--cert-dir={self.dir / 'apiserver-certs'}",
                f"--tls-cert-file={p / 'apiserver.crt'}",
                f"--tls-private-key-file={p / 'apiserver.key'}",
                f"--client-ca-file={p / 'ca.crt'}",
                "--authorization-mode=RBAC",
                f"--service-account-issuer={ISSUER}",
                f"--service-account-signing-key-file={p / 'sa.key'}",
                f"--service-account-key-file={p / 'sa.pub'}",
                "--service-cluster-ip-range=10.0.0.0/24",
                f"--audit-policy-file={policy}",
                f"--audit-log-path={self.audit_log}",
                "--audit-log-maxbackup=0",
                "--audit-log-maxsize=0",
                "--endpoint-reconciler-type=none",
                "--allow-privileged=true",  # as kubeadm and kind set it: PodSecurity refuses privileged pods
            ],
        )

    def _start_controller_manager(self) -> None:
        cfg = self.dir / "controller-manager.kubeconfig"
        cfg.write_text(
            json.dumps(
                kubeconfig(
                    self.url,
                    self.ca_file,
                    cert=self.pki / "controller-manager.crt",
                    key=self.pki / "controller-manager.key",
                )
            )
        )
        self._spawn(
            "kube-controller-manager",
            [
                f"--kubeconfig={cfg}",
                f"--authentication-kubeconfig={cfg}",
                f"--authorization-kubeconfig={cfg}",
                f"--controllers={','.join(CONTROLLERS)}",
                f"--service-account-private-key-file={self.pki / 'sa.key'}",
                f"--root-ca-file={self.ca_file}",
                "--use-service-account-credentials=true",  # each controller under its own bootstrap role
                "--leader-elect=false",
                "--bind-address=127.0.0.1",
                f"--secure-port={free_port()}",
                f"--cert-dir={self.dir / 'controller-manager-certs'}",
                "--concurrent-gc-syncs=5",
                "--concurrent-namespace-syncs=5",
            ],
        )

    def _wait_ready(self, deadline: float, checks: tuple[tuple[str, str], ...]) -> None:
        cert, key = self.admin_cert
        http = urllib3.PoolManager(
            ca_certs=str(self.ca_file),
            cert_file=str(cert),
            key_file=str(key),
            retries=False,
            timeout=urllib3.Timeout(connect=1, read=5),
        )
        last = "nothing answered yet"
        for path, what in checks:
            while True:
                self._check_alive()
                try:
                    resp = http.request("GET", self.url + path)
                    if resp.status == 200:
                        break
                    last = f"{what}: HTTP {resp.status} {resp.data[:200]!r}"
                except urllib3.exceptions.HTTPError as exc:
                    last = f"{what}: {exc}"
                if time.monotonic() > deadline:
                    raise ClusterError(f"the control plane was not ready in time ({last}); logs in {self.dir}")
                time.sleep(0.2)
        http.clear()

    def _check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                tail = (self.dir / f"{name}.log").read_text(errors="replace")[-3000:]
                raise ClusterError(f"{name} exited with {proc.returncode}; the end of its log:\n{tail}")

    def stop(self) -> None:
        """SIGTERM every component (reverse start order), SIGKILL what is still there after 10 s."""
        for name in reversed(list(self.procs)):
            proc = self.procs[name]
            if proc.poll() is None:
                # It may exit between poll() and killpg (its group then gone): the others still get stopped.
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
        self.procs.clear()
