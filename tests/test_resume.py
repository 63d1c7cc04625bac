"""`fedtune run` on the work directory of an interrupted run continues it: no round lost or repeated."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta

import pytest
import yaml
from fedtune.documents import parse_documents
from fedtune.rounds.machine import new_status, resumed
from test_local_run import _processes_mentioning, _wait_for_round, job_yaml
from tiny_models import make_tiny_model
from toy_data import toy_jsonl

ROUNDS = 45  # rounds of the tiny job take ~0.1 s on an idle machine: the kill must land mid-job (history keeps 50)


@pytest.fixture(scope="module")
def tiny_seq_cls(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "bert", "sequence-classification")


def test_resumed_status_keeps_its_rounds_and_gets_a_fresh_deadline(tiny_seq_cls, tmp_path):
    job = parse_documents(job_yaml(tiny_seq_cls, tmp_path / "d.jsonl"), "j").job
    then = datetime(2026, 1, 1, tzinfo=UTC)
    st = new_status(job, then)
    st.stage, st.current_round = "training", 3
    later = then + timedelta(hours=5)  # the deadline passed while nobody was watching
    again = resumed(job, st, later)
    assert (again.stage, again.current_round) == ("training", 3)
    assert again.round_deadline == later + timedelta(seconds=job.spec.round_timeout_seconds)
    st.phase = "Succeeded"
    assert resumed(job, st, later) == st


def _run(job, workdir, log, cwd):
    cmd = [sys.executable, "-m", "fedtune.cli", "run", str(job), "--threads", "1", "--workdir", str(workdir)]
    return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=cwd)


def test_a_killed_run_resumes_without_losing_or_repeating_a_round(tiny_seq_cls, tmp_path):
    data = tmp_path / "toy.jsonl"
    data.write_bytes(toy_jsonl(400))
    job = tmp_path / "job.yaml"
    # Rounds of the tiny model take a fraction of a second: enough of them that the kill lands mid-job.
    job.write_text(job_yaml(tiny_seq_cls, data, rounds=ROUNDS, samples=40))
    workdir, first_log = tmp_path / "w", tmp_path / "first.txt"
    proc = _run(job, workdir, first_log, tmp_path)
    try:
        _wait_for_round(workdir / "status.json", 3, proc, first_log, timeout=240)
        proc.kill()  # SIGKILL mid-job: no cleanup code runs in the runner
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    before = json.loads((workdir / "status.json").read_text())
    done_before = {h["round"]: h for h in before["history"]}
    deadline = time.monotonic() + 20  # its pods and S3 server follow it (lifeline)
    while _processes_mentioning(str(workdir)) and time.monotonic() < deadline:
        time.sleep(0.2)

    second_log = tmp_path / "second.txt"
    again = _run(job, workdir, second_log, tmp_path)
    assert again.wait(timeout=300) == 0, second_log.read_text()
    out = second_log.read_text()
    assert before["phase"] == "Running", before["phase"]  # killed mid-job, not after it
    assert f"resuming: {before['stage']}, round {before['currentRound']}/{ROUNDS}" in out, out
    after = json.loads((workdir / "status.json").read_text())
    assert after["phase"] == "Succeeded"
    assert [h["round"] for h in after["history"]] == list(range(ROUNDS + 1))
    for rnd, record in done_before.items():  # rounds finished before the kill were not run again
        if record.get("finishedAt") and rnd < before["currentRound"]:
            assert after["history"][rnd]["finishedAt"] == record["finishedAt"], rnd
    assert (workdir / "final" / "adapter_model.safetensors").is_file()
    assert not _processes_mentioning(str(workdir))


def test_resume_refuses_another_job_or_a_finished_run(tiny_seq_cls, tmp_path, capsys):
    from fedtune import cli

    data = tmp_path / "toy.jsonl"
    data.write_bytes(toy_jsonl(200))
    job = tmp_path / "job.yaml"
    job.write_text(job_yaml(tiny_seq_cls, data, rounds=1, samples=20))
    workdir = tmp_path / "w"
    assert cli.main(["run", str(job), "--threads", "1", "--workdir", str(workdir)]) == 0
    assert cli.main(["run", str(job), "--workdir", str(workdir)]) == 2
    assert "already ended (Succeeded): nothing to resume" in capsys.readouterr().err
    docs = list(yaml.safe_load_all(job.read_text()))
    docs[0]["spec"]["rounds"] = 3
    job.write_text(yaml.safe_dump_all(docs))
    assert cli.main(["run", str(job), "--workdir", str(workdir)]) == 2
    assert "holds a run of a different job spec" in capsys.readouterr().err
