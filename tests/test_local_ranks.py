"""`fedtune run` with a multi-GPU party: its pod runs two ranks under torchrun (CPU processes with gloo
here), rank 0 alone reads the mailbox and talks to S3, DeepSpeed ZeRO-3 spans the ranks, and a rank
that dies fails the pod cleanly."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import yaml
from fedtune.api.launch import pod_command
from fedtune.documents import parse_documents
from fedtune.local.runner import LocalRun
from test_local_run import _processes_mentioning, job_yaml, tiny_seq_cls, toy_data  # noqa: F401  (fixtures)

# urllib3 logs every request at DEBUG: "http://127.0.0.1:8333 "GET /alice-data/... HTTP/1.1" 200 …"
REQUEST = re.compile(r'"(GET|PUT) /')


def start_run(text: str, workdir: Path) -> tuple[LocalRun, dict, threading.Thread]:
    run = LocalRun(parse_documents(text, "job.yaml"), workdir, out=io.StringIO(), threads=1)
    result: dict = {}
    thread = threading.Thread(target=lambda: result.setdefault("st", run.run()))
    thread.start()
    return run, result, thread


def rank_lines(log: str, name: str) -> dict[str, list[str]]:
    """Log lines of the pod by who wrote them: "alice/rank0", "alice/rank1", or the launcher ("")."""
    out: dict[str, list[str]] = {}
    for line in log.splitlines():
        m = re.match(rf"\S+ \S+ ({name}/rank\d) ", line)
        out.setdefault(m.group(1) if m else "", []).append(line)
    return out


def test_a_party_with_two_gpus_trains_as_two_ranks(tiny_seq_cls, toy_data, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("FEDTUNE_LOG_LEVEL", "DEBUG")  # every HTTP request is logged by the rank that made it
    run, result, thread = start_run(
        job_yaml(tiny_seq_cls, toy_data, rounds=2, samples=40, gpus={"alice": 2}), tmp_path / "run"
    )
    thread.join(timeout=240)
    out = run.progress.out.getvalue()
    st = result["st"]
    assert st.phase == "Succeeded", out
    assert all(h.participants == ["default/alice", "default/bob"] for h in st.history[1:])
    assert "alice: 2 ranks under torchrun" in out
    alice = run.pods.pods["default/alice"]
    assert alice.returncode == 0 and not alice.exits, "both ranks exit 0 on the exit ticket, and so does torchrun"
    lines = rank_lines((tmp_path / "run" / "logs" / "default--alice.log").read_text(), "alice")
    lead, follower = "\n".join(lines["alice/rank0"]), "\n".join(lines["alice/rank1"])
    assert "rank 0 of 2 on CPU" in lead and "rank 1 of 2 on CPU" in follower and "gloo" in follower
    # Rank 0 alone reads the mailbox and talks to S3; rank 1 trains each train ticket it is handed.
    assert REQUEST.search(lead) and not REQUEST.search(follower)
    assert "ticket train-r1-a0 from rank 0" in follower and "ticket train-r1-a0\n" in lead + "\n"
    assert "round 2: global eval_loss" in lead and "round 2: global" not in follower
    assert "rank 1: exit ticket: stopping" in follower
    assert not _processes_mentioning(str(tmp_path / "run"))


def ranks_of(pid: int) -> dict[int, int]:
    """RANK -> pid of the processes torchrun (pid) started."""
    out = {}
    for child in psutil.Process(pid).children():
        with open(f"/proc/{child.pid}/environ", "rb") as fh:
            env = dict(v.split(b"=", 1) for v in fh.read().split(b"\0") if b"=" in v)
        out[int(env[b"RANK"])] = child.pid
    return out


def wait_for(predicate, timeout: float, what: str):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if value := predicate():
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def test_a_dead_rank_fails_its_pod_and_the_restarted_pod_finishes_the_job(tiny_seq_cls, toy_data, tmp_path):  # noqa: F811
    workdir = tmp_path / "run"
    run, result, thread = start_run(job_yaml(tiny_seq_cls, toy_data, rounds=4, samples=40, gpus={"alice": 2}), workdir)

    def training() -> bool:
        try:
            st = json.loads((workdir / "status.json").read_text())
        except (OSError, ValueError):
            return False
        return st.get("stage") == "training"

    wait_for(training, 180, "round 1 to start")
    alice = run.pods.pods["default/alice"]
    rank1 = wait_for(lambda: ranks_of(alice.pid).get(1), 30, "alice's rank 1")
    os.kill(rank1, signal.SIGKILL)
    # torchrun stops rank 0 and exits non-zero: no rank is left waiting in a collective.
    wait_for(lambda: alice.exits, 60, "alice's pod to exit after its rank 1 died")
    assert alice.exits[0] not in (0, None)
    thread.join(timeout=300)
    out = run.progress.out.getvalue()
    assert result["st"].phase == "Succeeded", out
    assert alice.restarts == 1 and "default/alice exited with code 1; restarting" in out
    assert [h.round for h in result["st"].history] == [0, 1, 2, 3, 4]
    assert not _processes_mentioning(str(workdir))


@pytest.mark.deepspeed
def test_a_party_with_two_gpus_trains_with_zero3_across_its_ranks(tiny_seq_cls, toy_data, tmp_path):  # noqa: F811
    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed (pip install fedtune[deepspeed])")
    docs = list(yaml.safe_load_all(job_yaml(tiny_seq_cls, toy_data, rounds=2, samples=40, gpus={"alice": 2})))
    docs[0]["spec"]["deepspeed"] = {"enabled": True, "zeroStage": 3}  # bob: ZeRO-3 in one process
    run, result, thread = start_run(yaml.safe_dump_all(docs), tmp_path / "run")
    thread.join(timeout=400)
    out = run.progress.out.getvalue()
    st = result["st"]
    assert st.phase == "Succeeded", out
    assert all(h.participants == ["default/alice", "default/bob"] for h in st.history[1:])
    assert run.pods.pods["default/alice"].returncode == 0 and not run.pods.pods["default/alice"].exits
    lines = rank_lines((tmp_path / "run" / "logs" / "default--alice.log").read_text(), "alice")
    lead, follower = "\n".join(lines["alice/rank0"]), "\n".join(lines["alice/rank1"])
    # Rank 1 evaluated its share and trained in step with rank 0 (ZeRO-3 gathers from every rank);
    # rank 0 alone reported, after the final evaluation of global 2 on both ranks.
    assert "round 2: global eval_loss=0." in lead and "eval of global 2: loss=0." in lead
    assert "ticket eval-r2-a0 from rank 0" in follower and "eval of global" not in follower
    assert not _processes_mentioning(str(tmp_path / "run"))


def test_ranks_die_with_a_killed_launcher(tmp_path):
    # torchrun puts each rank in a session of its own; a SIGKILLed launcher (a crashed runner's
    # pod) must not leave ranks behind, waiting on a mailbox or in a collective.
    log = tmp_path / "pod.log"
    command = pod_command("party", str(tmp_path / "box"), world_size=2)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FEDTUNE_NAME": "alice"}
    with log.open("wb") as out:
        launcher = subprocess.Popen([sys.executable, *command[1:]], env=env, stdout=out, stderr=subprocess.STDOUT)
    ranks: list[psutil.Process] = []
    try:
        wait_for(lambda: "rank 1 of 2" in log.read_text() and "rank 0 of 2" in log.read_text(), 120, "both ranks")
        ranks = psutil.Process(launcher.pid).children()
        assert len(ranks) == 2
        launcher.kill()
        launcher.wait()
        _, alive = psutil.wait_procs(ranks, timeout=30)
        assert not alive, f"ranks outlived their launcher: {alive}"
    finally:
        launcher.kill()  # a no-op once it was waited for
        for rank in ranks:
            with contextlib.suppress(psutil.NoSuchProcess):
                rank.kill()  # psutil checks the pid was not reused
