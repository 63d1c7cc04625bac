"""Operator failover: two `fedtune operator` processes elect one leader through a Lease.

The chaos test runs both as processes (so the leader can be SIGKILLed) with the operator chart's
RBAC identity, each with its own TokenRequest token, so that the API server's audit log tells their
requests apart (a ServiceAccount token's id is in `user.extra`). The pure election rules are tested
first, without a server.
"""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pytest
import yaml
from fedtune.k8s.election import handover_bound, identity, leadership_lost
from fedtune.k8s.permissions import LEADER_ELECTION, PERMISSIONS, granted, triples
from fedtune.k8s.settings import OperatorSettings
from kube import OPERATOR_NAMESPACE, ROOT, KubeTest
from kube_cluster import kubeconfig
from operator_world import ended, make_world, pods_of, status
from pydantic import ValidationError

CREDENTIAL_ID = "authentication.kubernetes.io/credential-id"
LEASE_SLACK = 3.0  # API latency and this test's polling on a busy machine, beyond the stated bound
DRIVE_SLACK = 10.0  # kopf's start in the new leader, up to its daemon's first read of the job


# --- the election rules (pure) ---------------------------------------------------------------------


def test_the_stated_handover_bound_is_the_charts():
    values = yaml.safe_load((ROOT / "helm" / "fedtune-operator" / "values.yaml").read_text())["leaderElection"]
    s = OperatorSettings()
    assert (s.lease_duration_seconds, s.renew_deadline_seconds, s.retry_period_seconds) == (
        values["leaseDurationSeconds"],
        values["renewDeadlineSeconds"],
        values["retryPeriodSeconds"],
    )
    assert values["enabled"] is True and not s.leader_election  # on in the chart; off for a bare `fedtune operator`
    assert handover_bound(s.lease_duration_seconds, s.retry_period_seconds) == 19


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"FEDTUNE_RENEW_DEADLINE_SECONDS": "15"}, "below lease_duration_seconds"),
        ({"FEDTUNE_RETRY_PERIOD_SECONDS": "9"}, "above 1.2 x retry_period_seconds"),
        ({"FEDTUNE_RETRY_PERIOD_SECONDS": "0"}, "retry_period_seconds"),
        ({"FEDTUNE_LEADER_ELECTION_LEASE": ""}, "leader_election_lease"),
    ],
)
def test_timings_the_elector_would_refuse_are_refused_at_start(env, message):
    with pytest.raises(ValidationError, match=message):
        OperatorSettings.from_env(env)


@pytest.mark.parametrize(
    ("holder", "renewed", "why"),
    [
        ("me_1", 95.0, None),  # renewed 5 s ago, deadline 10 s
        ("me_1", 90.0, None),  # exactly at the deadline
        ("me_1", 89.5, "not renewed for 10.5s (renew deadline 10s)"),
        ("other_2", 99.0, "the Lease now names other_2"),  # taken over: stop at once, whatever the age
        (None, 99.0, "the Lease now names no holder"),
    ],
)
def test_a_leader_stops_once_the_lease_is_not_surely_its_own(holder, renewed, why):
    assert leadership_lost("me_1", holder, now=100.0, renewed=renewed, renew_deadline=10) == why


def test_each_process_is_a_candidate_of_its_own():
    assert identity("fedtune-operator-7d9f-abcde", "1a2b3c4d") == "fedtune-operator-7d9f-abcde_1a2b3c4d"
    assert identity("pod", "a") != identity("pod", "b")  # a restarted container is not the leader it replaces


def test_an_api_server_out_of_reach_is_a_failed_try_not_the_end_of_the_election():
    """The library's LeaseLock catches only ApiException: a refused connection or a timeout must
    become one (a failed try, retried), not end the elector's thread."""
    from fedtune.k8s.leader import _Leases, _Lock
    from kubernetes import client
    from kubernetes.leaderelection import electionconfig, leaderelection

    cfg = client.Configuration()
    cfg.host = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    lock = _Lock("fedtune-operator", "fedtune-system", "me_1", _Leases(client.ApiClient(cfg), timeout=1))
    found, error = lock.get("fedtune-operator", "fedtune-system")
    assert not found and error.status == 0 and "unreachable" in error.reason
    elector = leaderelection.LeaderElection(electionconfig.Config(lock, 15, 10, 2, lambda: None, lambda: None))
    assert elector.try_acquire_or_renew() is False


# --- two operator processes, the leader killed mid-job ---------------------------------------------


@dataclass
class Operator:
    """One `fedtune operator` process: its log, liveness port and token id (its requests' in the audit log)."""

    name: str
    proc: subprocess.Popen
    log: Path
    port: int
    jti: str

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def identity(self) -> str | None:
        found = re.search(r"leader election: standing by for lease \S+ in \S+ \(identity (\S+)\)", self.text())
        return found.group(1) if found else None

    def health(self) -> tuple[int, str]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=5) as resp:
            return resp.status, resp.read().decode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def token_id(token: str) -> str:
    """The `jti` of a ServiceAccount token, as the audit log names the credential ("JTI=<id>")."""
    payload = token.split(".")[1]
    return "JTI=" + json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))["jti"]


def start_operator(kube: KubeTest, name: str, release: str, token: str) -> Operator:
    """`fedtune operator` as the chart runs it (leader election on, the chart's defaults), fast resyncs."""
    config = kube.workdir / f"{name}.kubeconfig"
    config.write_text(json.dumps(kubeconfig(kube.url, kube.cluster.ca_file, token=token)))
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDTUNE_")}
    env.update(
        KUBECONFIG=str(config),
        FEDTUNE_LEADER_ELECTION="true",
        FEDTUNE_LEADER_ELECTION_NAMESPACE=OPERATOR_NAMESPACE,
        FEDTUNE_LEADER_ELECTION_LEASE=release,
        FEDTUNE_RESYNC_SECONDS="0.5",
        FEDTUNE_POD_BACKOFF_SECONDS="0.5",
        FEDTUNE_MAX_POD_RESTARTS="3",
        FEDTUNE_METRICS_PORT="0",
        FEDTUNE_LOG_FORMAT="text",
    )
    port, log = free_port(), kube.workdir / f"{name}.log"
    command = [
        str(Path(sys.executable).with_name("fedtune")),
        "operator",
        f"--liveness=http://127.0.0.1:{port}/healthz",
    ]
    with log.open("wb") as out:
        proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    return Operator(name, proc, log, port, token_id(token))


def stop(op: Operator) -> None:
    if op.proc.poll() is None:
        op.proc.send_signal(signal.SIGTERM)
        try:
            op.proc.wait(30)
        except subprocess.TimeoutExpired:
            op.proc.kill()
            op.proc.wait()


def of(entries: list[dict], op: Operator) -> list[dict]:
    return [e for e in entries if (e["user"].get("extra") or {}).get(CREDENTIAL_ID) == [op.jti]]


def at(entry: dict) -> float:
    return datetime.fromisoformat(entry["requestReceivedTimestamp"].replace("Z", "+00:00")).timestamp()


def what(entry: dict) -> tuple[str, str, str]:
    ref = entry.get("objectRef") or {}
    res = ref.get("resource", "") + (f"/{ref['subresource']}" if ref.get("subresource") else "")
    return entry["verb"], ref.get("apiGroup", ""), res


def holder(kube: KubeTest, release: str) -> str | None:
    return ((kube.get("leases", OPERATOR_NAMESPACE, release) or {}).get("spec") or {}).get("holderIdentity")


@pytest.mark.chaos
def test_killing_the_active_operator_hands_over_and_the_job_loses_and_repeats_no_round(kube, s3world, tiny_model):
    release = f"failover-{kube.test_id}"
    first = kube.install_operator(release)  # the chart's RBAC, its Lease Role included (leader election on)
    second = kube.token_for(OPERATOR_NAMESPACE, release, seconds=7200)
    settings = OperatorSettings()  # the chart's timings (test_the_stated_handover_bound_is_the_charts)
    bound = handover_bound(settings.lease_duration_seconds, settings.retry_period_seconds)
    audit = kube.audit()
    ops = [start_operator(kube, "op-a", release, first.token)]
    try:
        # The first candidate creates the Lease; the second then meets it held (no race for it at start).
        kube.wait_for(lambda: "leader election: acquired" in ops[0].text(), timeout=60, what="a leader")
        ops.append(start_operator(kube, "op-b", release, second))
        kube.wait_for(lambda: ops[1].identity(), timeout=60, what="the second candidate to stand by")
        with pods_of(kube) as pods:
            w = make_world(kube, s3world, tiny_model, rounds=3)
            kube.wait_for(lambda: status(w).get("currentRound", 0) >= 2, timeout=180, what="round 2")
            active = next(op for op in ops if op.identity() == holder(kube, release))
            (standby,) = [op for op in ops if op is not active]
            assert "leader election: acquired" not in standby.text()
            assert standby.health() == (200, '{"leaderElection": "standby"}')
            before = status(w)["currentRound"]

            killed_at = time.time()
            active.proc.send_signal(signal.SIGKILL)
            active.proc.wait(10)
            kube.wait_for(lambda: holder(kube, release) == standby.identity(), timeout=bound + 30, what="a new holder")
            handover = time.time() - killed_at

            def first_on_job(verb: str) -> float | None:
                """When the new leader first sent `verb` on the job (its daemon reads it, then writes it)."""
                mine = [e for e in of(audit.entries(), standby) if (e.get("objectRef") or {}).get("name") == "fj1"]
                return min((at(e) for e in mine if e["verb"] == verb), default=None)

            resumed = kube.wait_for(
                lambda: first_on_job("get"), timeout=bound + 60, what="the new leader to read the job"
            )
            wrote = kube.wait_for(lambda: first_on_job("patch"), timeout=120, what="the new leader to write the job")
            resumed, wrote = resumed - killed_at, wrote - killed_at
            print(
                f"\nfailover: Lease taken over {handover:.1f}s after the SIGKILL (bound {bound:g}s); the job "
                f"reconciled again after {resumed:.1f}s, first written after {wrote:.1f}s"
            )
            kube.wait_for(lambda: ended(w), timeout=300, what="the end")
            assert not pods.errors, pods.errors
            # No pod process outlives the job: the new leader told every pod to exit, and each did.
            kube.wait_for(
                lambda: all(p.poll() is not None for _, p in pods.procs.values()), 60, what="the pods to exit"
            )
            assert {proc.returncode for _, proc in pods.procs.values()} == {0}
    finally:
        for op in ops:
            stop(op)
        kube.delete("leases", OPERATOR_NAMESPACE, release)
    # Neither operator outlives the test: the killed one died of its SIGKILL, the leader stopped on SIGTERM.
    assert active.proc.returncode == -signal.SIGKILL and standby.proc.returncode == 0

    # The job: Succeeded, every round once in the history and aggregated once across the takeover.
    st = status(w)
    assert st["phase"] == "Succeeded" and before >= 2, st
    assert [h["round"] for h in st["history"]] == [0, 1, 2, 3]
    text = "".join(p.read_text() for p in (kube.workdir / "pods").glob(f"{w.hub}--*aggregator*.log"))
    for rnd in (1, 2, 3):
        assert text.count(f"round {rnd}: aggregated") == 1, text
    # The handover within the stated bound.
    assert handover <= bound + LEASE_SLACK, f"takeover after {handover:.1f}s, bound {bound:g}s"
    assert resumed <= bound + DRIVE_SLACK, f"the job reconciled again only {resumed:.1f}s after the SIGKILL"
    assert "leader election: acquired" in standby.text()

    entries = audit.completed(first.name)
    # The standby, while the leader lived, only read the Lease: no watch, no write, nothing else.
    waiting = {what(e) for e in of(entries, standby) if at(e) < killed_at}
    assert waiting == {("get", "coordination.k8s.io", "leases")}, waiting
    # Both processes within the chart's RBAC (the Lease rows on the one Lease), refused nothing, and
    # every Lease verb used: created by the first leader, read by both, renewed and taken over.
    mine = of(entries, active) + of(entries, standby)
    assert mine and len(mine) == len(entries), "every request of the ServiceAccount is one of the two processes'"
    for e in mine:
        verb, grp, res = what(e)
        if res == "leases":
            assert e["objectRef"]["namespace"] == OPERATOR_NAMESPACE and granted(grp, res, verb, LEADER_ELECTION)
            assert verb == "create" or e["objectRef"]["name"] == release, e["requestURI"]
        elif res:
            assert granted(grp, res, verb, PERMISSIONS), (verb, grp, res)
        assert e["responseStatus"]["code"] not in (401, 403), (verb, e["requestURI"])
    used = {(g, r, v) for v, g, r in map(what, mine) if r == "leases"}
    assert used == triples(LEADER_ELECTION), used
    assert {what(e)[0] for e in of(entries, standby) if what(e)[2] == "leases"} == {"get", "update"}
