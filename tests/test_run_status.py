"""A local run's status.json tells the truth: written whole, Stopped when the runner stops early, and a status
left Running by a killed runner is marked so by the next look at its work directory."""

from __future__ import annotations

import io
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from fedtune.api.errors import SpecError
from fedtune.api.status import FederatedJobStatus, PartyState
from fedtune.cli import main
from fedtune.documents import parse_documents
from fedtune.local import runner as runner_module
from fedtune.local.run_lock import RunLock, RunnerBusy
from fedtune.local.runner import LocalRun
from fedtune.local.status_file import STATUS_FILE, read_status, write_atomic, write_status
from fedtune.rounds import conditions as cond
from fedtune.rounds.machine import new_status, resumed
from test_local_run import _processes_mentioning, job_yaml
from tiny_models import make_tiny_model
from toy_data import toy_jsonl

NOW = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.fixture(scope="module")
def tiny_seq_cls(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "bert", "sequence-classification")


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "toy.jsonl"
    path.write_bytes(toy_jsonl(600))
    return path


def _doc(i: int, size: int) -> str:
    return json.dumps({"n": i, "pad": "x" * size})


def test_a_poller_never_reads_a_half_written_status(tmp_path):
    path = tmp_path / STATUS_FILE
    write_atomic(path, _doc(0, 10))
    done, reads, bad = threading.Event(), [0], []

    def poll() -> None:
        while not done.is_set():
            text = path.read_text()
            try:
                json.loads(text)
            except ValueError:
                bad.append(len(text))
            reads[0] += 1

    reader = threading.Thread(target=poll)
    reader.start()
    try:
        for i in range(200):
            write_atomic(path, _doc(i, 200_000 + 1000 * (i % 7)))
    finally:
        done.set()
        reader.join()
    assert reads[0] > 50 and not bad, (reads[0], bad[:5])
    assert sorted(p.name for p in tmp_path.iterdir()) == [STATUS_FILE]


WRITER = """
import sys
from pathlib import Path
from fedtune.local.status_file import write_atomic
docs = ['{"n": %d, "pad": "%s"}' % (i, "x" * 8_000_000) for i in range(2)]
i = 0
while True:
    write_atomic(Path(sys.argv[1]), docs[i % 2])
    i += 1
"""


def test_a_writer_killed_mid_write_leaves_the_last_status_whole(tmp_path):
    path = tmp_path / STATUS_FILE
    rng = random.Random(0)
    for _ in range(3):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)])
        try:
            deadline = time.monotonic() + 60
            while not path.exists():
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.01)
            time.sleep(rng.uniform(0.05, 0.4))  # it is busy writing the next one
        finally:
            proc.kill()
            proc.wait()
        assert len(json.loads(path.read_text())["pad"]) == 8_000_000


def test_stopped_is_honest_and_resumable():
    job = parse_documents(job_yaml(Path("/model"), Path("/data.jsonl")), "j").job
    st = new_status(job, NOW)
    cond.mark_halted(st, "Stopped", cond.INTERRUPTED, "stopped by SIGINT (Ctrl-C)", NOW)
    assert st.phase == "Stopped" and st.message == "stopped by SIGINT (Ctrl-C)"
    assert {c.type: (c.status, c.reason) for c in st.conditions} == {
        "Ready": ("False", "Interrupted"),
        "Reconciling": ("False", "Interrupted"),
        "Stalled": ("True", "Interrupted"),
    }
    again = resumed(job, st, NOW)
    assert again.phase == "Running" and again.message == ""
    assert again.condition("Reconciling").status == "True" and again.condition("Stalled").status == "False"


def _stale_workdir(tmp_path, pid: int = 4242):
    """A work directory as a SIGKILLed runner leaves it: status Running, the lock file naming a dead runner."""
    st = FederatedJobStatus(phase="Running", stage="training", current_round=3, parties=[PartyState(name="a/b")])
    cond.mark_running(st, "round 3/5", NOW)
    write_status(tmp_path, st)
    (tmp_path / "runner.lock").write_text(json.dumps({"pid": pid, "jobFile": "job.yaml"}))
    return tmp_path


def test_fedtune_status_marks_a_runner_that_is_gone(tmp_path, capsys):
    workdir = _stale_workdir(tmp_path)
    assert main(["status", str(workdir)]) == 0
    out = capsys.readouterr().out
    assert "Stopped (RunnerLost), training, round 3" in out and "pid 4242" in out
    st = read_status(workdir)
    assert st.phase == "Stopped" and st.condition("Stalled").reason == "RunnerLost"
    assert st.condition("Reconciling").status == "False" and st.condition("Ready").status == "False"
    assert "the runner (pid 4242) ended without finishing, in training of round 3" in st.message
    assert f"Resume with: fedtune run job.yaml --workdir {workdir}" in st.message
    assert main(["status", str(workdir)]) == 0  # marked once: a second look changes nothing
    assert read_status(workdir) == st


def test_fedtune_status_leaves_a_live_runner_alone(tmp_path, capsys):
    workdir = _stale_workdir(tmp_path)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from fedtune.local.run_lock import RunLock\n"
            "lock = RunLock.acquire(sys.argv[1], {'jobFile': 'job.yaml'}); print('held', flush=True); time.sleep(60)",
            str(workdir),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        assert main(["status", str(workdir)]) == 0
        assert (
            f"Running, training, round 3, parties 0/0, its runner (pid {holder.pid}) is alive"
            in capsys.readouterr().out
        )
        assert read_status(workdir).phase == "Running"
        with pytest.raises(RunnerBusy):
            RunLock.acquire(workdir)
    finally:
        holder.kill()
        holder.wait()
    with RunLock.acquire(workdir) as lock:  # the kernel let go of a dead holder's lock
        assert lock.previous["pid"] == holder.pid


def test_two_runners_never_share_a_work_directory(tiny_seq_cls, toy_data, tmp_path):
    workdir = tmp_path / "w"
    workdir.mkdir()
    with RunLock.acquire(workdir, {"jobFile": "other.yaml"}):
        run = LocalRun(parse_documents(job_yaml(tiny_seq_cls, toy_data), "j"), workdir, out=io.StringIO())
        with pytest.raises(SpecError, match=f"another fedtune run \\(pid {os.getpid()}\\) is running in"):
            run.run()
    assert sorted(p.name for p in workdir.iterdir()) == ["runner.lock"]  # nothing started, nothing written


def test_a_crashing_runner_leaves_stopped_and_the_run_resumes(tiny_seq_cls, toy_data, tmp_path, monkeypatch):
    text = job_yaml(tiny_seq_cls, toy_data, rounds=2, samples=40)
    workdir = tmp_path / "run"
    real_advance = runner_module.advance

    def advance(job, st, obs):  # a bug in the control loop, once round 1 is under way
        if st.current_round >= 1:
            raise RuntimeError("injected fault")
        return real_advance(job, st, obs)

    monkeypatch.setattr(runner_module, "advance", advance)
    with pytest.raises(RuntimeError, match="injected fault"):
        LocalRun(parse_documents(text, "job.yaml"), workdir, out=io.StringIO(), threads=1).run()
    st = read_status(workdir)
    assert st.phase == "Stopped" and st.current_round == 1
    assert st.condition("Stalled").reason == "RunnerCrashed" and st.condition("Reconciling").status == "False"
    assert "the runner stopped on an error (RuntimeError: injected fault)" in st.message
    assert f"Resume with: fedtune run job.yaml --workdir {workdir}" in st.message
    assert not _processes_mentioning(str(workdir))
    monkeypatch.setattr(runner_module, "advance", real_advance)
    out = io.StringIO()
    final = LocalRun(parse_documents(text, "job.yaml"), workdir, out=out, threads=1, resume=True).run()
    assert final.phase == "Succeeded", out.getvalue()
    assert "the last run stopped: RunnerCrashed" in out.getvalue()
    assert [h.round for h in final.history] == [0, 1, 2]


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _look(workdir: Path, seconds: float) -> subprocess.Popen:
    """A `fedtune status`-like look: holds the lock without writing in it, for `seconds`."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from fedtune.local.run_lock import RunLock\n"
            "lock = RunLock.acquire(sys.argv[1]); print('held', flush=True); time.sleep(float(sys.argv[2]))",
            str(workdir),
            str(seconds),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_look_holding_the_lock_is_waited_for_not_blamed_on_the_dead_runner(tmp_path, capsys):
    dead = _dead_pid()
    workdir = _stale_workdir(tmp_path, pid=dead)
    look = _look(workdir, 0.5)
    try:
        start = time.monotonic()
        with RunLock.acquire(workdir, {"jobFile": "/abs/job.yaml"}) as lock:  # waits for the look to let go
            assert lock.previous["pid"] == dead  # the look did not overwrite what the last runner wrote
        assert time.monotonic() - start < 5
    finally:
        look.kill()
        look.wait()
    (workdir / "runner.lock").write_text(json.dumps({"pid": dead, "jobFile": "/abs/job.yaml"}))
    look = _look(workdir, 60)  # a look that does not let go: refused after a while, without blaming the dead pid
    try:
        with pytest.raises(RunnerBusy, match=f"not the runner it names, pid {dead}, which has ended") as info:
            RunLock.acquire(workdir, wait=0.2)
        assert not info.value.live
    finally:
        look.kill()
        look.wait()


def _forced_unwritable_lock(workdir: Path) -> None:
    """runner.lock cannot be opened read-write, whoever runs the test (chmod does not stop root)."""
    (workdir / "runner.lock").unlink(missing_ok=True)
    (workdir / "runner.lock").mkdir()


def test_fedtune_status_on_a_work_directory_it_cannot_write_reports_read_only(tmp_path, capsys):
    workdir = _stale_workdir(tmp_path)
    _forced_unwritable_lock(workdir)
    assert main(["status", str(workdir)]) == 0
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    assert "Running, training, round 3, parties 0/0, cannot tell whether its runner is alive (cannot open" in (
        captured.out
    )
    assert read_status(workdir).phase == "Running"  # nothing written


def test_an_unwritable_work_directory_with_chmod(tiny_seq_cls, toy_data, tmp_path, capsys, sigterm_kept):
    (tmp_path / "job.yaml").write_text(job_yaml(tiny_seq_cls, toy_data, rounds=1, samples=40))
    looked, fresh = tmp_path / "looked", tmp_path / "fresh"
    looked.mkdir()
    fresh.mkdir()
    _stale_workdir(looked)
    (looked / "runner.lock").chmod(0o444)
    for d in (looked, fresh):
        d.chmod(0o555)
    try:
        if os.access(looked, os.W_OK) or os.access(looked / "runner.lock", os.W_OK):
            pytest.skip("running as root: chmod does not keep root from writing (the forced-OSError tests cover this)")
        assert main(["status", str(looked)]) == 0
        assert "cannot tell whether its runner is alive (cannot open" in capsys.readouterr().out
        assert main(["run", str(tmp_path / "job.yaml"), "--workdir", str(fresh)]) == 2
        assert "cannot write in it (runner.lock: Permission denied)" in capsys.readouterr().err
    finally:
        for d in (looked, fresh):
            d.chmod(0o755)


@pytest.fixture
def sigterm_kept():
    """`fedtune run` installs its own SIGTERM handler: the test process gets its own back afterwards."""
    before = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, before)


def test_an_early_interrupt_leaves_a_work_directory_that_resumes(
    tiny_seq_cls, toy_data, tmp_path, monkeypatch, capsys, sigterm_kept
):
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    (jobs / "job.yaml").write_text(job_yaml(tiny_seq_cls, toy_data, rounds=1, samples=40))
    monkeypatch.chdir(jobs)

    def stopped(self):  # SIGTERM while the base model loads: before any status of a round
        raise KeyboardInterrupt("SIGTERM")

    with monkeypatch.context() as patch:
        patch.setattr(LocalRun, "_warm_up", stopped)
        assert main(["run", "job.yaml", "--workdir", "w", "--threads", "1"]) == 128 + signal.SIGTERM
    assert "resume with: fedtune run job.yaml --workdir w" in capsys.readouterr().err
    workdir = jobs / "w"
    st = read_status(workdir)
    assert st.phase == "Stopped" and st.condition("Stalled").reason == "Interrupted"
    # Read from anywhere: the resume command names the job file and the work directory absolutely.
    assert st.message.startswith("stopped by SIGTERM while starting; every child process was stopped.")
    assert f"Resume with: fedtune run {jobs / 'job.yaml'} --workdir {workdir}" in st.message
    assert json.loads((workdir / "runner.lock").read_text())["jobFile"] == str(jobs / "job.yaml")
    monkeypatch.chdir(tmp_path)
    assert main(["status", "jobs/w"]) == 0
    assert "jobs/w: Stopped (Interrupted), init, round 0" in capsys.readouterr().out
    monkeypatch.chdir(jobs)
    # A work directory that cannot be written: one line, no traceback.
    lock_doc = (workdir / "runner.lock").read_text()
    _forced_unwritable_lock(workdir)
    assert main(["run", "job.yaml", "--workdir", "w"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: work directory w: cannot write in it (runner.lock: Is a directory)"), err
    (workdir / "runner.lock").rmdir()
    (workdir / "runner.lock").write_text(lock_doc)
    # The same command resumes it (the directory is not refused as someone else's).
    uid = json.loads((workdir / "job.json").read_text())["metadata"]["uid"]
    assert main(["run", "job.yaml", "--workdir", "w", "--threads", "1"]) == 0
    assert json.loads((workdir / "job.json").read_text())["metadata"]["uid"] == uid  # the same job, resumed
    st = read_status(workdir)
    assert st.phase == "Succeeded" and [h.round for h in st.history] == [0, 1]
