"""Chaos suite, local mode (issue 12): faults injected into real `fedtune run` processes, with real pods
and a real SeaweedFS. Each test asserts the job's final phase, that no round was lost or repeated, that
no process of the run outlived it, and that a line of the run's output names the fault.

Run it alone with `pytest -m chaos`. docs/ARCHITECTURE.md ("Guarantees") lists each fault and its test.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import yaml
from chaos import (
    LocalJob,
    assert_aggregated_once,
    assert_log_names,
    assert_no_orphans,
    assert_rounds_once,
    freeze,
    hold_with_a_ticket,
    stop_all,
)
from test_local_run import job_yaml
from tiny_models import make_tiny_model
from toy_data import toy_jsonl

pytestmark = pytest.mark.chaos

PARTIES = ("default/alice", "default/bob")
FREEZE_SECONDS = 10  # S3 frozen this long: longer than any tiny round, far shorter than the transfers' timeouts


@pytest.fixture(scope="module")
def job_file(tmp_path_factory):
    """A factory: a job file of `rounds` rounds (2 parties, a tiny model, toy data)."""
    where = tmp_path_factory.mktemp("job")
    model = make_tiny_model(where / "bert", "sequence-classification")
    data = where / "toy.jsonl"
    data.write_bytes(toy_jsonl(200))

    def make(rounds: int):
        path = where / f"job-{rounds}.yaml"
        # A short deadline: a fault that the runner did not recover from fails the round in seconds, not minutes.
        docs = list(yaml.safe_load_all(job_yaml(model, data, rounds=rounds, samples=24, timeout=45)))
        # Rounds of a few tenths of a second (one epoch of 3 steps takes milliseconds): a test that waits for a
        # round and then signals a process must not find the job ended meanwhile on an idle machine.
        docs[0]["spec"]["training"]["localEpochs"] = 20
        path.write_text(yaml.safe_dump_all(docs))
        return path

    return make


def test_pod_faults_and_an_s3_freeze_in_one_run(job_file, tmp_path):
    """Garbage in alice's mailbox, bob killed mid-training, the aggregator killed mid-aggregation, then S3
    frozen: each in a round of its own of one run, which succeeds with every round done once by both parties."""
    rounds = 8
    job = LocalJob(job_file(rounds), tmp_path / "w")
    job.start()
    try:
        job.wait("round 1", job.at_round(1))
        faults = {}

        # A hostile receipt: alice, holding a ticket she has not answered, "writes" bytes that are not UTF-8.
        alice, ticket = hold_with_a_ticket(job, "default/alice")
        faults["garbage"] = ticket["round"]
        box = job.mailbox("default/alice")
        (box / ".garbage").write_bytes(b"\xff\xfe\x00\x01 binary")
        os.replace(box / ".garbage", box / "receipt.json")  # as a pod writes it: the runner wakes up
        job.wait("the refusal", lambda: "! ignoring the receipt of default/alice" in job.runner.output)
        os.kill(alice, signal.SIGCONT)

        # A party killed mid-training: bob owes the round an update.
        bob, ticket = hold_with_a_ticket(job, "default/bob")
        faults["party"] = ticket["round"]
        assert ticket["kind"] == "train" and job.status()["stage"] == "training", ticket
        os.kill(bob, signal.SIGKILL)

        # The aggregator killed mid-aggregation: it holds the round's aggregation ticket.
        aggregator, ticket = hold_with_a_ticket(job, "aggregator")
        faults["aggregator"] = ticket["round"]
        job.wait("the status to say so", lambda: job.status()["stage"] == "aggregating")
        os.kill(aggregator, signal.SIGKILL)

        # S3 frozen while a round trains: every transfer of the round waits for it.
        job.wait("the next round", job.at_round(faults["aggregator"] + 1))
        faults["s3"] = job.status()["currentRound"]
        freeze(job.pid("weed"), FREEZE_SECONDS)

        assert job.runner.proc.wait(timeout=180) == 0, job.tail()
    finally:
        stop_all(job.runners)
    out, st = job.runner.output, job.status()
    assert st["phase"] == "Succeeded", st.get("message")
    assert_rounds_once(st, rounds)
    assert_aggregated_once(job.pod_log("aggregator"), rounds)
    assert sorted(faults.values()) == list(faults.values()) and faults["s3"] < rounds, faults  # one round each
    for h in st["history"][1:]:  # no fault cost a party its place, a retry of a round or a straggler
        assert h["participants"] == list(PARTIES) and h["attempt"] == 0 and not h.get("stragglers"), h
    assert st["history"][faults["s3"]]["durationSeconds"] >= FREEZE_SECONDS  # the freeze held the round up
    # Each fault is named by a line of the runner's output, and was recovered from by a restart.
    assert_log_names(out, r"\] ! ignoring the receipt of default/alice: not UTF-8 text \(byte 0: invalid start byte\)$")
    assert_log_names(out, rf"\] ! default/bob was killed by SIGKILL; restarting in 1s \(pid {bob}; see ")
    assert_log_names(out, rf"\] ! aggregator was killed by SIGKILL; restarting in 1s \(pid {aggregator}; see ")
    pods = "".join(job.pod_log(pod) for pod in ("default--alice", "default--bob", "aggregator"))
    assert_log_names(pods, r"(GET|PUT) http://127\.0\.0\.1:\d+/\S+: the object store took \d+\.\d s to answer$")
    assert {p["name"]: p.get("podRestarts", 0) for p in st["parties"]} == {"default/alice": 0, "default/bob": 1}
    assert st["aggregatorRestarts"] == 1
    # alice took the garbage in her mailbox for no receipt and answered her ticket over it
    assert_log_names(job.pod_log("default--alice"), r"the receipt in the mailbox cannot be read .*: it answers no")
    assert_no_orphans(job)


def test_runner_interrupted_then_killed_then_resumed(job_file, tmp_path):
    """Ctrl-C stops the run in order (Stopped, Interrupted); a resume goes on; SIGKILL of that runner
    leaves its children to die with it, `fedtune status` marks the run RunnerLost, and a second resume
    finishes the job with no round lost or repeated."""
    rounds = 20
    job = LocalJob(job_file(rounds), tmp_path / "w")
    try:
        first = job.start()
        job.wait("round 1", job.at_round(1))
        job.processes()  # the pods and the S3 server are recorded: they must all end with the runner
        first.proc.send_signal(signal.SIGINT)
        assert first.proc.wait(timeout=60) == 130, first.output
        assert_log_names(first.output, r"^interrupted: every child process was stopped; partial results and logs in ")
        st = job.status()
        stalled = next(c for c in st["conditions"] if c["type"] == "Stalled")
        assert st["phase"] == "Stopped" and stalled["reason"] == "Interrupted", st
        assert "stopped by SIGINT (Ctrl-C)" in st["message"]
        assert_no_orphans(job)

        second = job.start()
        job.wait("the resumed run's next round", job.at_round(st["currentRound"] + 1))
        job.processes()
        second.proc.kill()  # no cleanup code runs in the runner: the kernel ends its children (lifeline)
        second.proc.wait(timeout=30)
        assert_log_names(second.output, rf"\] resuming: \w+, round \d+/{rounds} \(the last run stopped: Interrupted\)$")
        assert_no_orphans(job)
        before = job.status()
        assert before["phase"] == "Running"  # nothing could say otherwise: the runner was killed outright

        look = subprocess.run(
            [sys.executable, "-m", "fedtune.cli", "status", str(job.workdir)], capture_output=True, text=True
        )
        assert look.returncode == 0, look.stderr
        assert_log_names(look.stdout, r"Stopped \(RunnerLost\)")
        st = job.status()
        assert st["phase"] == "Stopped", st
        assert f"the runner (pid {second.proc.pid}) ended without finishing" in st["message"]

        third = job.start()
        assert third.proc.wait(timeout=180) == 0, third.output
    finally:
        stop_all(job.runners)
    assert_log_names(third.output, rf"\] resuming: \w+, round \d+/{rounds} \(the last run stopped: RunnerLost\)$")
    st = job.status()
    assert st["phase"] == "Succeeded", st.get("message")
    assert_rounds_once(st, rounds)
    finished = {h["round"]: h.get("finishedAt") for h in st["history"]}
    for h in before["history"]:  # rounds aggregated before the kill were not done again
        if h["round"] < before["currentRound"]:
            assert finished[h["round"]] == h.get("finishedAt"), h["round"]
    assert_no_orphans(job)
