"""Local mode's warm start: pods forked from a zygote that loaded the libraries and the model once,
and CPU slots that keep more parties than cores from time-slicing each other."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from datetime import timedelta

import pytest
from fedtune.api import cpu_slots
from fedtune.api.launch import pod_command
from fedtune.api.mailbox import FileMailbox
from fedtune.api.protocol import TrainerReceipt, TrainerTicket
from fedtune.api.status import utcnow
from fedtune.local.children import Pod, Zygote, ended
from trainer_helpers import config, tiny_paths

CLS = "sequence-classification"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_paths(tmp_path_factory)


def pod_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def wait_for(predicate, timeout=120.0, what="it"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def parent_of(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        return int(next(line for line in fh if line.startswith("PPid:")).split()[1])


def init_ticket(cfg) -> dict:
    t = TrainerTicket(
        kind="init", job="j1", party="default/alice", round=0, deadline=utcnow() + timedelta(minutes=5), config=cfg
    )
    return t.to_wire()


def test_a_forked_pod_starts_with_the_model_the_zygote_loaded(tiny, tmp_path):
    cfg = config(tiny[CLS], CLS)
    cfg_file = tmp_path / "config.json"
    cfg_file.write_text(cfg.model_dump_json(by_alias=True))
    zygote = Zygote(pod_env(), tmp_path / "zygote.log", cfg_file)
    box = FileMailbox(tmp_path / "box")
    pod = Pod("default/alice", pod_command("party", str(box.dir)), pod_env(), tmp_path / "alice.log", zygote=zygote)
    hidden = tiny[CLS].with_name(tiny[CLS].name + "-moved")
    try:
        pod.start()
        assert pod.proc is None and parent_of(pod.pid) == zygote.proc.pid  # forked, not a new interpreter
        # The model was loaded before the fork: the pod answers init without reading the model files.
        tiny[CLS].rename(hidden)
        box.write_ticket(init_ticket(cfg))
        wait_for(lambda: box.read_receipt() is not None, what="the init receipt")
        receipt = TrainerReceipt.model_validate(box.read_receipt())
        assert receipt.ok, receipt.error
        assert receipt.base_model_fingerprint
        box.write_ticket({"kind": "exit", "job": "j1", "party": "default/alice", "round": 1})
        wait_for(lambda: not pod.alive, what="the pod to exit")
        assert pod.returncode == 0  # reaped by the zygote, reported through its pipe
    finally:
        if hidden.exists():
            hidden.rename(tiny[CLS])
        if pod.alive:
            pod.signal(signal.SIGKILL)
        zygote.close()
    assert zygote.proc.returncode == 0


def test_without_a_zygote_a_pod_is_a_plain_process(tmp_path):
    zygote = Zygote(pod_env(), tmp_path / "zygote.log")
    zygote.proc.kill()
    zygote.proc.wait()
    box = FileMailbox(tmp_path / "box")
    box.write_ticket({"kind": "exit", "job": "j1", "party": "default/alice", "round": 0})
    pod = Pod("default/alice", pod_command("party", str(box.dir)), pod_env(), tmp_path / "a.log", zygote=zygote)
    pod.start()
    assert pod.proc is not None  # fell back to its own interpreter
    wait_for(lambda: not pod.alive, what="the pod to exit")
    assert pod.returncode == 0


@pytest.mark.parametrize(
    "code,said",
    [
        (1, "exited with code 1"),
        (0, "exited with code 0"),
        (-9, "was killed by SIGKILL"),
        (-200, "was killed by signal 200"),
    ],
)
def test_how_a_pod_ended_is_said_by_its_signal_name(code, said):
    assert ended(code) == said


def test_no_more_holders_than_slots_at_once(tmp_path):
    slots = cpu_slots.make_slots(tmp_path / "slots", 2)
    active, peak, lock = [0], [0], threading.Lock()

    def work():
        with cpu_slots.hold(slots):
            with lock:
                active[0] += 1
                peak[0] = max(peak[0], active[0])
            time.sleep(0.1)
            with lock:
                active[0] -= 1

    threads = [threading.Thread(target=work) for _ in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert peak[0] == 2 and active[0] == 0
    assert sorted(p.name for p in slots.iterdir()) == ["slot-0", "slot-1"]
    assert sorted(p.name for p in cpu_slots.make_slots(slots, 1).iterdir()) == ["slot-0"]  # resized


def test_a_killed_holder_frees_its_slot_and_without_slots_nothing_waits(tmp_path, monkeypatch):
    slots = cpu_slots.make_slots(tmp_path / "slots", 1)
    code = (
        "import sys, time; from fedtune.api import cpu_slots\n"
        "with cpu_slots.hold(sys.argv[1]):\n    print('held', flush=True); time.sleep(600)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code, str(slots)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        got = threading.Event()
        waiter = threading.Thread(target=lambda: (cpu_slots.hold(slots).__enter__(), got.set()), daemon=True)
        waiter.start()
        assert not got.wait(0.3)  # the only slot is taken
        holder.kill()  # no cleanup runs: the kernel drops the lock with the process
        assert got.wait(30)
    finally:
        holder.kill()
        holder.wait()
    monkeypatch.delenv(cpu_slots.ENV, raising=False)
    with cpu_slots.hold():  # Kubernetes: no slots, no waiting
        pass


@pytest.mark.parametrize(
    ("parties", "cores", "threads", "slots"),
    [(4, 2, 1, 2), (6, 2, 1, 2), (3, 2, 1, 0), (2, 2, 1, 0), (8, 16, 4, 4), (5, 16, 4, 0), (4, 16, 4, 0)],
)
def test_parties_take_turns_only_when_the_turns_are_full(parties, cores, threads, slots):
    from fedtune.local.runner import _cpu_slots

    assert _cpu_slots(parties, cores, threads) == slots
    assert _cpu_slots(parties, cores, threads, ranks=2) == 0  # a multi-rank party's ranks never queue
