"""The chaos suite's helpers (issue 12; importable, not a test module): run a local job as `fedtune run`
subprocesses, find its processes, inject faults, and check what every fault must leave behind.

- `LocalJob`: one job's work directory, run (and resumed) by `fedtune run` subprocesses; it knows
  each runner's output, reads status.json, and records every process of the run it sees.
- `wait_for`: poll a condition, with the runner's output in the failure message.
- `hold_with_a_ticket`: freeze a pod (SIGSTOP) once it is idle, then until the control plane hands it a
  new ticket, so that a kill lands while the pod owes an answer, as a crash mid-training or
  mid-aggregation would.
- `assert_rounds_once`, `assert_aggregated_once`, `assert_no_orphans`, `assert_log_names`: what every
  fault test asserts.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from fedtune_trainer.mailbox import answers

POLL = 0.02  # seconds between two looks at a condition


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, context: Callable[[], str] = str) -> Any:
    """Poll `predicate` until it returns something true (returned); AssertionError after `timeout` s."""
    end = time.monotonic() + timeout
    while True:
        got = predicate()
        if got:
            return got
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}\n{context()}")
        time.sleep(POLL)


@dataclass
class Runner:
    """One `fedtune run` process and its output (stdout and stderr together)."""

    proc: subprocess.Popen
    log: Path

    @property
    def output(self) -> str:
        return self.log.read_text(errors="replace")


@dataclass
class LocalJob:
    """A job file run in one work directory; `start()` runs (or resumes) it with a new `fedtune run`."""

    job_file: Path
    workdir: Path
    runners: list[Runner] = field(default_factory=list)
    seen: dict[tuple[int, float], str] = field(default_factory=dict)  # (pid, start time) -> role

    def start(self) -> Runner:
        cmd = [sys.executable, "-m", "fedtune.cli", "run", str(self.job_file), "--threads", "1"]
        log = self.workdir.parent / f"{self.workdir.name}-runner-{len(self.runners)}.txt"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [*cmd, "--workdir", str(self.workdir)], stdout=out, stderr=subprocess.STDOUT, cwd=self.workdir.parent
            )
        self.runners.append(Runner(proc, log))
        return self.runners[-1]

    @property
    def runner(self) -> Runner:
        return self.runners[-1]

    def output(self) -> str:
        """Every runner's output, in order."""
        return "".join(r.output for r in self.runners)

    def tail(self) -> str:
        return "--- the runner's output (last 3000 characters) ---\n" + self.runner.output[-3000:]

    def status(self) -> dict:
        """status.json ({} before the first is written; it is replaced atomically, never half-written)."""
        try:
            return json.loads((self.workdir / "status.json").read_text())
        except FileNotFoundError:
            return {}

    def party(self, name: str) -> dict:
        return next((p for p in self.status().get("parties", []) if p["name"] == name), {})

    def mailbox(self, pod: str) -> Path:
        """A pod's mailbox directory ("default/alice" or "aggregator")."""
        return self.workdir / "mailboxes" / pod.replace("/", "--")

    def pod_log(self, pod: str) -> str:
        path = self.workdir / "logs" / f"{pod.replace('/', '--')}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def wait(self, what: str, predicate: Callable[[], Any], timeout: float = 120) -> Any:
        """Wait for `predicate`, recording the run's processes meanwhile; fails at once if the runner ends."""

        def check() -> Any:
            self.processes()
            if self.runner.proc.poll() is not None:
                rc = self.runner.proc.returncode
                raise AssertionError(f"the runner ended (rc {rc}) before {what}\n{self.tail()}")
            return predicate()

        return wait_for(check, timeout, what, self.tail)

    def at_round(self, rnd: int, stage: str = "training") -> Callable[[], bool]:
        """A predicate: the status is at round `rnd` (or later), in `stage`."""

        def check() -> bool:
            st = self.status()
            return st.get("currentRound", -1) > rnd or (st.get("currentRound") == rnd and st.get("stage") == stage)

        return check

    def processes(self) -> dict[str, psutil.Process]:
        """The live runner's processes by role: "weed", "zygote", and each pod ("default--alice", "aggregator").

        A pod is known by its log file, its stdout, whether it was forked by the zygote or started as a
        process of its own. Every process found is recorded in `seen` for `assert_no_orphans`.
        """
        out: dict[str, psutil.Process] = {}
        try:
            below = psutil.Process(self.runner.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return out
        for proc in below:
            try:
                role = _role(proc)
                if role and proc.status() != psutil.STATUS_ZOMBIE:
                    out[role] = proc
                    self.seen[(proc.pid, proc.create_time())] = role
            except psutil.NoSuchProcess:
                continue
        return out

    def pid(self, role: str, timeout: float = 120) -> int:
        """The pid of a live process of the run ("weed", "default--alice", "aggregator"), once it runs."""
        return self.wait(f"a live {role} process", lambda: (p := self.processes().get(role)) and p.pid, timeout)


def _role(proc: psutil.Process) -> str | None:
    cmdline = proc.cmdline()
    if cmdline and Path(cmdline[0]).name == "weed":
        return "weed"
    try:
        out = os.readlink(f"/proc/{proc.pid}/fd/1")
    except OSError:
        return None
    if out.endswith(".log") and Path(out).parent.name == "logs":
        return Path(out).stem  # the pod's log: logs/<pod>.log
    return "zygote" if "zygote" in cmdline else None


def hold_with_a_ticket(job: LocalJob, pod: str, timeout: float = 120) -> tuple[int, dict]:
    """Freeze `pod` (SIGSTOP) so that it holds a ticket it has not answered; returns its pid (stopped) and
    that ticket, once status.json shows the ticket's round (the runner writes tickets, then the status).

    The pod is frozen only when idle (its receipt answers its ticket: not in the middle of a ticket),
    then left frozen until the control plane writes it the next one. A SIGKILL then lands while the
    pod owes an answer, at a known point of the round: the round cannot end without its restart.
    """
    box, role = job.mailbox(pod), pod.replace("/", "--")
    pid = job.pid(role, timeout)

    def idle_then_frozen() -> bool:
        os.kill(pid, signal.SIGSTOP)
        if _answered(box):
            return True
        os.kill(pid, signal.SIGCONT)  # mid-ticket: let it finish this one
        return False

    job.wait(f"{pod} idle (its receipt answering its ticket)", idle_then_frozen, timeout)
    job.wait(f"a new ticket for the frozen {pod}", lambda: not _answered(box), timeout)
    ticket = json.loads((box / "ticket.json").read_text())
    job.wait(f"the status at round {ticket['round']}", lambda: job.status().get("currentRound") == ticket["round"])
    return pid, ticket


def _answered(box: Path) -> bool:
    """Whether the mailbox's receipt answers its ticket (a mailbox without a ticket counts as answered)."""
    try:
        ticket = json.loads((box / "ticket.json").read_text())
    except FileNotFoundError:
        return True
    try:
        receipt = json.loads((box / "receipt.json").read_text())
    except (FileNotFoundError, ValueError):
        return False
    return answers(receipt, ticket)


def freeze(pid: int, seconds: float) -> None:
    """Hold a process still (SIGSTOP) for `seconds`, then let it go on (SIGCONT)."""
    os.kill(pid, signal.SIGSTOP)
    try:
        time.sleep(seconds)  # the fault itself lasts this long
    finally:
        os.kill(pid, signal.SIGCONT)


def start_operator(kube: Any, namespaces: Iterable[str], log: Path) -> subprocess.Popen:
    """The operator as it is deployed (`fedtune operator`, the chart's command) in a process of its own, so
    that it can be SIGKILLed: as the chart's ServiceAccount, watching `namespaces`, with the quick settings
    of tests/operator_world.py's FAST_SETTINGS, logging text lines to `log` (appended)."""
    env = dict(
        os.environ,
        KUBECONFIG=str(kube.as_identity(kube.operator).kubeconfig),
        FEDTUNE_RESYNC_SECONDS="0.5",
        FEDTUNE_POD_BACKOFF_SECONDS="0.5",
        FEDTUNE_MAX_POD_RESTARTS="3",
        FEDTUNE_METRICS_PORT="0",
        FEDTUNE_LOG_FORMAT="text",
        FEDTUNE_WATCH_SERVER_TIMEOUT="10",
        FEDTUNE_WATCH_CLIENT_TIMEOUT="20",
    )
    cmd = [sys.executable, "-m", "fedtune.cli", "operator", "--liveness", ""]
    cmd += [f"--namespace={ns}" for ns in namespaces]
    with log.open("ab") as out:
        return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


# --- what every fault test asserts ---------------------------------------------------------------


def assert_rounds_once(status: dict, rounds: int) -> None:
    """The round history holds every round 0 (the base adapter's evaluation) .. `rounds` exactly once, each
    aggregated after the one before: no round lost, none repeated (a round done again after a later one
    would finish out of order)."""
    got = [h["round"] for h in status.get("history", [])]
    assert got == list(range(rounds + 1)), f"round history {got}: rounds lost or repeated"
    finished = [h["finishedAt"] for h in status["history"][1:]]
    assert finished == sorted(finished) and len(set(finished)) == len(finished), finished


def assert_aggregated_once(aggregator_log: str, rounds: int) -> None:
    """The aggregator's log (every process of it, restarts included) says each round 1..`rounds`
    was aggregated exactly once: no round's work was done twice."""
    counts = {r: len(re.findall(rf"^.*round {r}: aggregated ", aggregator_log, re.M)) for r in range(1, rounds + 1)}
    assert all(n == 1 for n in counts.values()), f"aggregations per round: {counts}"


def assert_no_orphans(job: LocalJob, timeout: float = 15) -> None:
    """No process of the run outlives it: every process `seen` (pods, the zygote, weed) has ended, and no
    process names the work directory on its command line (forked pods carry the zygote's)."""
    assert job.seen, "no process of the run was ever seen: the check would prove nothing"

    def alive() -> list[str]:
        left = [f"{role} (pid {pid})" for (pid, started), role in job.seen.items() if _running(pid, started)]
        return left + processes_mentioning(str(job.workdir))

    try:
        wait_for(lambda: not alive(), timeout, "the run's processes to end")
    except AssertionError:
        raise AssertionError(f"orphaned processes: {alive()}") from None


def _running(pid: int, started: float) -> bool:
    try:
        proc = psutil.Process(pid)
        return proc.create_time() == started and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def processes_mentioning(text: str) -> list[str]:
    """Live processes with `text` in an argument of their command line, as "pid N: command line"."""
    out = []
    for proc in psutil.process_iter(["pid", "cmdline", "status"]):
        cmdline = proc.info["cmdline"] or []
        if proc.info["status"] != psutil.STATUS_ZOMBIE and any(text in arg for arg in cmdline):
            out.append(f"pid {proc.info['pid']}: {' '.join(cmdline)[:200]}")
    return out


def assert_log_names(text: str, pattern: str) -> str:
    """A line of `text` matches the regex `pattern` (the line that names the fault); returns that line."""
    line = next((line for line in text.splitlines() if re.search(pattern, line)), None)
    assert line is not None, f"no line matches {pattern!r} in:\n{text[-4000:]}"
    return line


def stop_all(runners: Iterable[Runner]) -> None:
    """Teardown: SIGKILL every runner still running (its pods and S3 server die with it)."""
    for r in runners:
        if r.proc.poll() is None:
            r.proc.kill()
            r.proc.wait()
