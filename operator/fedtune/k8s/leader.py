"""Leader election over a coordination.k8s.io Lease: only its holder runs kopf and drives jobs.

The elector is the Kubernetes client's own (`kubernetes.leaderelection`, client-go's algorithm:
optimistic concurrency on the Lease, each candidate timing the Lease on its own clock). It runs
in a thread; the main thread waits, as a standby, until this process holds the Lease, and only
then starts kopf, so a standby makes no request but reading the Lease: no watch, no patch, no pod.
A leader that loses the Lease (cannot renew it within the renew deadline, or finds another holder)
exits at once, without a graceful stop during which it would still act; its pod restarts and joins
as a standby. The pure rules (the handover bound, when to stop) are in `election.py`.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import urllib3
from kubernetes import client
from kubernetes.client.rest import ApiException
from kubernetes.leaderelection import electionconfig, leaderelection
from kubernetes.leaderelection.resourcelock.leaselock import LeaseLock

from fedtune.k8s import election, metrics
from fedtune.k8s.kube import api_client
from fedtune.k8s.settings import OperatorSettings

log = logging.getLogger("fedtune.operator")
EXIT_LOST = 3  # the exit status of a process that lost (or could not keep trying for) the Lease
NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


class _Leases(client.CoordinationV1Api):
    """The three Lease calls LeaseLock makes, each with a timeout (the library sets none: a call hung
    on a dead connection would stall a standby for good), and a connection failure or timeout turned
    into the ApiException the library takes for a failed try (it would end the election otherwise)."""

    def __init__(self, api: client.ApiClient, timeout: float):
        super().__init__(api)
        self.timeout = timeout

    def _call(self, method, *args):
        try:
            return method(*args, _request_timeout=self.timeout)
        except urllib3.exceptions.HTTPError as exc:
            raise ApiException(status=0, reason=f"API server unreachable: {type(exc).__name__}") from exc

    def read_namespaced_lease(self, name, namespace):
        return self._call(super().read_namespaced_lease, name, namespace)

    def create_namespaced_lease(self, namespace, body):
        return self._call(super().create_namespaced_lease, namespace, body)

    def replace_namespaced_lease(self, name, namespace, body):
        return self._call(super().replace_namespaced_lease, name, namespace, body)


class _Lock(LeaseLock):
    """LeaseLock with the operator's own API client (the library's uses the process-wide default)."""

    def __init__(self, name: str, namespace: str, identity: str, leases: client.CoordinationV1Api):
        super().__init__(name, namespace, identity)
        self.api_instance = leases


def lease_namespace(settings: OperatorSettings) -> str:
    """Where the Lease lives: the setting, else the pod's own namespace."""
    if settings.leader_election_namespace:
        return settings.leader_election_namespace
    try:
        return NAMESPACE_FILE.read_text().strip()
    except OSError:
        raise SystemExit(
            "leader election: set FEDTUNE_LEADER_ELECTION_NAMESPACE (not in a pod, so no namespace to default to)"
        ) from None


class Election:
    """This process as a candidate for the operator's Lease."""

    def __init__(self, settings: OperatorSettings):
        self.settings = settings
        self.name, self.namespace = settings.leader_election_lease, lease_namespace(settings)
        self.identity = election.identity(socket.gethostname(), uuid.uuid4().hex[:8])
        self.leading = threading.Event()
        leases = _Leases(api_client(settings.kube_api), timeout=settings.renew_deadline_seconds / 2)
        self._elector = leaderelection.LeaderElection(
            electionconfig.Config(
                _Lock(self.name, self.namespace, self.identity, leases),
                lease_duration=settings.lease_duration_seconds,
                renew_deadline=settings.renew_deadline_seconds,
                retry_period=settings.retry_period_seconds,
                onstarted_leading=self.leading.set,
                onstopped_leading=lambda: None,  # run() returns right after: _run says why and exits
            )
        )
        # The library logs every try (each retry period) at INFO: its own failures are what matter.
        logging.getLogger("leaderelection").setLevel(logging.WARNING)

    @property
    def lease(self) -> str:
        return f"lease {self.name} in {self.namespace} (identity {self.identity})"

    def start(self) -> None:
        log.info(
            "leader election: standing by for %s; takeover within %gs of the leader's end",
            self.lease,
            election.handover_bound(self.settings.lease_duration_seconds, self.settings.retry_period_seconds),
        )
        metrics.LEADER.set(0)
        if self.settings.metrics_port:  # scraped on every replica: a standby's target is up, and says 0
            metrics.serve(self.settings.metrics_port)
        threading.Thread(target=self._run, name="leader-election", daemon=True).start()

    def wait_until_leading(self, liveness: str | None) -> None:
        """Block until this process holds the Lease, answering the liveness probe meanwhile (kopf,
        which answers it once leading, is not running yet); then watch the Lease in a thread."""
        server = _standby_health(liveness)
        try:
            self.leading.wait()
        finally:
            if server is not None:
                server.shutdown()
                server.server_close()  # kopf binds the same port next
        log.info("leader election: acquired %s; driving jobs", self.lease)
        threading.Thread(target=self._watch, name="leader-watch", daemon=True).start()

    def _run(self) -> None:
        why = f"could not renew it within {self.settings.renew_deadline_seconds}s"
        try:
            self._elector.run()  # returns only once leadership is over
        except Exception as exc:  # noqa: BLE001 - an election that stopped trying ends the process alike
            why = f"the elector failed: {type(exc).__name__}: {exc}"
        self._exit(why)

    def _watch(self) -> None:
        """Stop at once when the Lease is no longer ours, not only after the elector's renew deadline."""
        while True:
            time.sleep(self.settings.retry_period_seconds / 2)
            record = self._elector.observed_record
            why = election.leadership_lost(
                self.identity,
                record.holder_identity if record else None,
                time.time(),  # the elector's clock for observed_time_milliseconds
                self._elector.observed_time_milliseconds / 1000,
                self.settings.renew_deadline_seconds,
            )
            if why:
                self._exit(why)

    def _exit(self, why: str) -> None:
        if self.leading.is_set():
            log.error("leader election: lost %s: %s; exiting", self.lease, why)
        else:
            log.error("leader election: stopped standing by for %s: %s; exiting", self.lease, why)
        for handler in logging.getLogger().handlers:
            handler.flush()
        os._exit(EXIT_LOST)  # at once: a graceful stop would go on acting without the Lease


class _Healthy(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        body = b'{"leaderElection": "standby"}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:  # probes every few seconds: not worth a line each
        pass


def _standby_health(liveness: str | None) -> ThreadingHTTPServer | None:
    """A standby's answer on the liveness endpoint's port: alive (the elector thread ends the process
    if it stops). None without an endpoint."""
    if not liveness:
        return None
    url = urlsplit(liveness)
    server = ThreadingHTTPServer((url.hostname or "0.0.0.0", url.port or 80), _Healthy)
    threading.Thread(target=server.serve_forever, name="standby-health", daemon=True).start()
    return server
