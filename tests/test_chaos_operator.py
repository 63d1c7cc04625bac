"""Chaos suite, Kubernetes (issue 12): the operator as deployed (`fedtune operator`, a process of its own)
against a real kube-apiserver (tests/kube.py), pods run as local processes (tests/pod_executor.py), a real
SeaweedFS. The operator is SIGKILLed mid-job and a party pod's process is killed; the job must succeed with
no round lost or repeated, no process left behind, and lines that name each fault.
"""

from __future__ import annotations

import signal
import subprocess

import pytest
from chaos import (
    assert_aggregated_once,
    assert_log_names,
    assert_rounds_once,
    processes_mentioning,
    start_operator,
    wait_for,
)
from fedtune.k8s.names import aggregator_names, trainer_names
from operator_world import ended, make_world, pods_of, status

pytestmark = pytest.mark.chaos

ROUNDS = 4


def test_operator_killed_mid_job_then_a_party_pod_killed(kube, s3world, tiny_model, tmp_path):
    """SIGKILL of the operator at round 2: the pods go on, a fresh operator takes the job over without
    recreating them. Then alice's pod process dies: the pod fails and the operator recreates it (the
    model comes from s3:// by presigned URLs: the new pod downloads it again)."""
    log = tmp_path / "operator.log"
    operators = []
    with pods_of(kube) as pods:
        try:
            w = make_world(kube, s3world, tiny_model, rounds=ROUNDS, s3_model=True)
            alice = trainer_names(w.hub, "fj1", w.key("alice"))
            names = [alice, trainer_names(w.hub, "fj1", w.key("bob")), aggregator_names(w.hub, "fj1")]
            operators.append(start_operator(kube, kube.namespaces, log))
            kube.wait_for(lambda: status(w).get("currentRound", 0) >= 2, timeout=180, what="round 2")
            operators[0].kill()  # no cleanup code runs in the operator
            assert operators[0].wait(timeout=10) == -signal.SIGKILL
            left = status(w)
            assert left["phase"] == "Running" and left["currentRound"] < ROUNDS, left

            # alice is held still until the next operator runs: the round cannot end without her.
            pods.signal(alice.namespace, alice.pod, signal.SIGSTOP)
            operators.append(start_operator(kube, kube.namespaces, log))
            taking_over = f"FederatedJob {w.hub}/fj1 was Running before this operator drove it: taking over at round"
            wait_for(lambda: taking_over in log.read_text(), 60, "the new operator to take over")
            pods.kill(alice.namespace, alice.pod)
            kube.wait_for(lambda: ended(w), timeout=240, what="the end")
            st = status(w)
            # Every pod was told to exit and did: no pod process outlives the job.
            wait_for(lambda: all(proc.poll() is not None for _, proc in pods.procs.values()), 60, "the pods to exit")
            exits = [(p["metadata"]["name"], proc.returncode) for p, proc in pods.procs.values()]
        finally:
            for op in operators:
                if op.poll() is None:
                    op.terminate()  # an orderly stop, as Kubernetes stops a pod
                    try:
                        op.wait(timeout=30)
                    except subprocess.TimeoutExpired:
                        op.kill()
                        op.wait()
    assert st["phase"] == "Succeeded", st
    assert_rounds_once(st, ROUNDS)
    aggregator_log = "".join(p.read_text() for p in (kube.workdir / "pods").glob(f"{w.hub}--*aggregator*.log"))
    assert_aggregated_once(aggregator_log, ROUNDS)
    uid = w.job["metadata"]["uid"]
    assert s3world.bucket("hub").exists(f"fedtune/{uid}/global/{ROUNDS}.safetensors")
    # The new operator adopted the running pods; only alice's, which failed, was made again.
    started = {f"{n.namespace}/{n.pod}": pods.started.count(f"{n.namespace}/{n.pod}") for n in names}
    assert list(started.values()) == [2, 1, 1], started
    assert sorted(exits) == sorted([(alice.pod, -signal.SIGKILL), (alice.pod, 0)] + [(n.pod, 0) for n in names[1:]])
    assert {p["name"]: p.get("podRestarts", 0) for p in st["parties"]} == {w.key("alice"): 1, w.key("bob"): 0}
    assert st.get("aggregatorRestarts", 0) == 0
    # The faults, named: the operator's log line, the job's PodFailed event.
    assert_log_names(log.read_text(), taking_over + rf" {left['currentRound']}/{ROUNDS} ")
    failed = [e["message"] for e in kube.list("events", w.hub) if e.get("reason") == "PodFailed"]
    assert len(failed) == 1 and failed[0].startswith(f"{alice.pod} failed or vanished; recreating after "), failed
    # No operator left running (the killed one is gone, the other stopped), nor any pod process.
    assert [op.returncode for op in operators] == [-signal.SIGKILL, 0]
    assert not processes_mentioning(kube.test_id)
