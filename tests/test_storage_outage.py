"""Storage outages are the storage's, not the parties' (issue 12): `fedtune run` with a real SeaweedFS
killed or frozen mid-round, real trainer and aggregator processes, a tiny model.

Killed: the runner restarts it on the same data directory and ports, saying so, and the job finishes
with every round once and no party dropped. Frozen for good: the rounds wait for it, and after
spec.storageOutageTimeoutSeconds the job fails naming the storage and its endpoint, with the round
table and the partial results printed. (The pure rules: tests/test_round_machine.py.)
"""

from __future__ import annotations

import http.server
import io
import json
import os
import signal
import socket
import threading
import time
from pathlib import Path

import pytest
import yaml
from fedtune.api.status import FederatedJobStatus
from fedtune.documents import parse_documents
from fedtune.local.runner import LocalRun
from fedtune.storage.probe import unavailable
from test_local_run import _processes_mentioning, job_yaml
from tiny_models import make_tiny_model
from toy_data import toy_jsonl


@pytest.fixture(scope="module")
def tiny_seq_cls(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "bert", "sequence-classification")


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "toy.jsonl"
    path.write_bytes(toy_jsonl(600))
    return path


def _start(text: str, workdir: Path) -> tuple[LocalRun, threading.Thread, dict]:
    run = LocalRun(parse_documents(text, "job.yaml"), workdir, out=io.StringIO(), threads=1)
    result: dict = {}

    def target() -> None:
        try:
            result["st"] = run.run()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            result["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return run, thread, result


def _wait_for_round(run: LocalRun, thread: threading.Thread, rnd: int, timeout: float = 240) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end and thread.is_alive():
        st = run.status
        if st is not None and st.current_round >= rnd and st.stage == "training" and run.storage is not None:
            return
        time.sleep(0.02)
    raise AssertionError(f"round {rnd} not reached:\n{run.out.getvalue()}")


def _finish(thread: threading.Thread, result: dict, run: LocalRun, timeout: float) -> FederatedJobStatus:
    thread.join(timeout)
    assert not thread.is_alive(), f"the run did not end in {timeout}s:\n{run.out.getvalue()}"
    assert "error" not in result, f"{result.get('error')!r}\n{run.out.getvalue()}"
    return result["st"]


def _job(model: Path, data: Path, **spec) -> list[dict]:
    """A three-party job's documents (as in the fault drill that found the bug)."""
    return list(yaml.safe_load_all(job_yaml(model, data, parties=("alice", "bob", "carol"), **spec)))


@pytest.mark.chaos
def test_seaweedfs_killed_mid_round_is_restarted_and_the_job_finishes_with_every_round_once(
    tiny_seq_cls, toy_data, tmp_path
):
    rounds = 5
    docs = _job(tiny_seq_cls, toy_data, rounds=rounds, samples=40, timeout=60)
    docs[0]["spec"]["maxRoundRetries"] = 0  # one counted retry would fail the job: none may be counted
    docs[0]["spec"]["maxPartyFailures"] = 1  # one failure blamed on a party would drop it
    run, thread, result = _start(yaml.safe_dump_all(docs), tmp_path / "run")
    _wait_for_round(run, thread, 2)
    server = run.storage.server
    killed = server.pid
    os.killpg(killed, signal.SIGKILL)  # weed and all it runs, as the OOM killer or a crash would end it
    st = _finish(thread, result, run, timeout=300)
    out = run.out.getvalue()
    assert st.phase == "Succeeded", out
    # The fault is named, once, and so is what the runner did about it.
    line = f"storage: SeaweedFS (local mode's S3) at {server.endpoint} (pid {killed}) was killed by SIGKILL; "
    assert out.count(line + f"restarting it on {server.workdir / 'data'} (same ports)") == 1, out
    assert "restarts so far: 1" in out and server.pid != killed
    # No round lost or repeated, no party blamed.
    assert [h.round for h in st.history] == list(range(rounds + 1)), out
    assert all(h.participants == ["default/alice", "default/bob", "default/carol"] for h in st.history[1:]), out
    assert all(p.state == "Done" and p.failures == 0 for p in st.parties), out
    assert "QuorumLost" not in out and "dropped" not in out
    assert sum(f"round {r} aggregated" in out for r in range(1, rounds + 1)) == rounds
    on_disk = FederatedJobStatus.model_validate_json((tmp_path / "run" / "status.json").read_text())
    assert st.storage_restarts == on_disk.storage_restarts == 1
    metrics = json.loads((tmp_path / "run" / "final" / "metrics.json").read_text())
    assert [r["round"] for r in metrics["rounds"]] == list(range(rounds + 1))


@pytest.mark.chaos
def test_a_storage_that_never_answers_again_fails_the_job_after_the_bound_naming_it(tiny_seq_cls, toy_data, tmp_path):
    docs = _job(tiny_seq_cls, toy_data, rounds=30, samples=40, timeout=60)
    docs[0]["spec"]["storageOutageTimeoutSeconds"] = 8
    workdir = tmp_path / "run"
    run, thread, result = _start(yaml.safe_dump_all(docs), workdir)
    _wait_for_round(run, thread, 2)
    server = run.storage.server
    os.kill(server.pid, signal.SIGSTOP)  # alive but frozen: the endpoint stops answering, nothing restarts it
    started = time.monotonic()
    st = _finish(thread, result, run, timeout=120)
    out = run.out.getvalue()
    assert st.phase == "Failed", out
    assert time.monotonic() - started >= 8  # not before the bound
    stalled = st.condition("Stalled")
    assert stalled.reason == "StorageUnavailable" and st.condition("StorageUnavailable").status == "True"
    where = f"SeaweedFS (local mode's S3) at {server.endpoint} does not answer"
    assert where in st.message and "longer than spec.storageOutageTimeoutSeconds (8s)" in st.message, st.message
    assert st.condition("QuorumLost") is None and all(p.state != "Dropped" and p.failures == 0 for p in st.parties)
    # What an operator of the run reads: the fault as it happened, then the round table and where the rest is.
    paused = f"! {where}: no answer within 2s; round {st.current_round} paused until it answers (no retry counted"
    assert paused in out, out
    assert "round  parties  train loss" in out and f"Failed: {st.message}" in out
    assert f"Partial results and logs in {workdir}" in out
    finished = [h.round for h in st.history]
    assert finished == list(range(len(finished))) and len(finished) >= 2  # what was done is kept
    metrics = json.loads((workdir / "final" / "metrics.json").read_text())
    assert metrics["phase"] == "Failed" and [r["round"] for r in metrics["rounds"]] == finished
    # Nothing is left running: the frozen server is stopped with the pods.
    deadline = time.monotonic() + 15
    while _processes_mentioning(str(workdir)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _processes_mentioning(str(workdir))


class _Broken(http.server.BaseHTTPRequestHandler):
    def do_HEAD(self) -> None:  # noqa: N802 - the standard library's name
        self.send_response(503)
        self.end_headers()

    def log_message(self, *_) -> None:
        pass


def test_the_probe_tells_an_answering_endpoint_from_a_refused_a_silent_and_a_failing_one(s3world):
    assert unavailable(s3world.endpoint) is None  # S3 answers an anonymous HEAD (403): it is there
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        refused = f"http://127.0.0.1:{closed.getsockname()[1]}"
    assert unavailable(refused) == "connection refused"
    with socket.socket() as silent:  # takes connections, never answers: a frozen server
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        assert unavailable(f"http://127.0.0.1:{silent.getsockname()[1]}", timeout=0.3) == "no answer within 0.3s"
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Broken)  # a proxy in front of a dead store
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        assert unavailable(f"http://127.0.0.1:{server.server_address[1]}") == "it answers HTTP 503"
    finally:
        server.shutdown()
        server.server_close()
