"""Pods of local mode: trainer and aggregator processes, restarted with bounded backoff.

One-process pods are forked by a warm-start process (`python -m fedtune_trainer zygote`) that
imported torch, transformers and peft once, so no pod pays seconds of imports; where it is not
running (it failed to start, or died), a pod is started as a plain subprocess instead. A party
with several ranks runs its launcher command (fedtune.api.launch) as a plain subprocess: the
launcher starts its ranks itself. This module talks to the zygote through pipes and never
imports the trainer.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from fedtune.api.launch import PYTHON, single_process_args
from fedtune.lifeline import die_with_parent

MAX_RESTARTS = 3
ZYGOTE_READY_SECONDS = 1800  # imports and a large model's load; after this the pods load it themselves


class Zygote:
    """The runner's side of the warm-start process (see fedtune_trainer.zygote for the protocol)."""

    def __init__(self, env: dict[str, str], log_path: Path, config: Path | None = None):
        argv = [sys.executable, "-m", "fedtune_trainer", "zygote"]
        if config:
            argv += ["--config", str(config)]
        with open(log_path, "ab") as log:
            self.proc = subprocess.Popen(
                argv,
                env=env,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                start_new_session=True,
                preexec_fn=die_with_parent,  # and its children die with it
            )
        self.exits: dict[int, int] = {}
        self._answers: queue.Queue[dict | None] = queue.Queue()
        self._ready = threading.Event()  # spawn() is called from the runner's thread only
        threading.Thread(target=self._read, name="zygote-reader", daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                doc = json.loads(line)
            except ValueError:
                continue
            if "exited" in doc:
                self.exits[doc["exited"]] = doc["code"]
            elif doc.get("ready"):
                self._ready.set()
            else:  # a new pod: an exit recorded under its pid belongs to an earlier process
                self.exits.pop(doc.get("pid"), None)
                self._answers.put(doc)
        self._ready.set()  # end of output: the zygote is gone
        self._answers.put(None)

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    @property
    def ready(self) -> bool:
        """It has imported the libraries (and loaded the model): pods fork at once."""
        return self._ready.is_set()

    def spawn(self, name: str, args: list[str], env: dict[str, str], log_path: Path) -> int | None:
        """Fork a pod running `python -m fedtune_trainer ARGS`; its pid, or None if the zygote cannot."""
        if not self._ready.wait(ZYGOTE_READY_SECONDS):
            self.proc.kill()  # still loading: do not let it compete with pods that now load on their own
            return None
        if not self.alive:
            return None
        req = {"name": name, "argv": args, "env": env, "log": str(log_path)}
        try:
            self.proc.stdin.write((json.dumps(req) + "\n").encode())
            self.proc.stdin.flush()
            answer = self._answers.get(timeout=60)
        except (BrokenPipeError, ValueError, queue.Empty):
            answer = None
        if answer is None or answer.get("name") != name:
            # A zygote that does not answer in order cannot be trusted with the next pod either.
            self.proc.kill()
            return None
        return answer["pid"]

    def exit_code(self, pid: int) -> int | None:
        """The pod's exit code once it ended; None while it runs."""
        if pid in self.exits:
            return self.exits[pid]
        if not self.alive:  # its children died with it (PR_SET_PDEATHSIG)
            return self.exits.get(pid, -signal.SIGKILL)
        return None

    def close(self) -> None:
        """Let the zygote exit (it stops on end of input), SIGKILL after a grace period."""
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def ended(code: int | None) -> str:
    """How a pod's process ended, as a person reads it: "exited with code 1", "was killed by SIGKILL"."""
    if code is not None and code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


@dataclass
class Pod:
    """One child process standing in for a Kubernetes pod, running the pod's command (fedtune.api.launch)."""

    name: str
    command: list[str]
    env: dict[str, str]
    log_path: Path
    zygote: Zygote | None = None
    proc: subprocess.Popen | None = None
    pid: int | None = None
    restarts: int = 0
    next_start: float = 0.0
    gave_up: bool = False
    exits: list[int] = field(default_factory=list)

    def start(self) -> None:
        self.proc = None
        args = single_process_args(self.command)
        forkable = self.zygote is not None and args is not None
        self.pid = self.zygote.spawn(self.name, args, self.env, self.log_path) if forkable else None
        if self.pid is not None:
            return
        argv = [sys.executable if self.command[0] == PYTHON else self.command[0], *self.command[1:]]
        with open(self.log_path, "ab") as log:
            # Own session: a Ctrl-C in the terminal reaches the runner only, which then stops the pods in order.
            self.proc = subprocess.Popen(
                argv,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=die_with_parent,  # pods never outlive a crashed or SIGKILLed runner
            )
        self.pid = self.proc.pid

    @property
    def started(self) -> bool:
        return self.pid is not None

    @property
    def returncode(self) -> int | None:
        """Exit code once the process ended; None while it runs (or before it started)."""
        if self.proc is not None:
            return self.proc.poll()
        if self.pid is None or self.zygote is None:
            return None
        return self.zygote.exit_code(self.pid)

    @property
    def alive(self) -> bool:
        return self.started and self.returncode is None

    def signal(self, sig: int) -> None:
        """Send `sig` to the pod's process group (its own session), or to the pod if it has none yet."""
        try:
            os.killpg(self.pid, sig)
        except ProcessLookupError:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass


class Pods:
    """The set of pods of one local run."""

    def __init__(self) -> None:
        self.pods: dict[str, Pod] = {}
        self.zygote: Zygote | None = None
        self.finishing = False  # once exit tickets are out, a pod that exits is done, not dead

    def warm_up(self, env: dict[str, str], log_path: Path, config: Path | None = None) -> None:
        """Start the zygote now: it imports the libraries (and loads the model) while the run prepares."""
        self.zygote = Zygote(env, log_path, config)

    def start(self, pod: Pod) -> None:
        pod.zygote = self.zygote
        self.pods[pod.name] = pod
        pod.start()

    def check(self, now: float | None = None) -> list[str]:
        """Restart pods that died unexpectedly (bounded, with backoff). Returns messages to show."""
        now = time.monotonic() if now is None else now
        notes = []
        for pod in self.pods.values():
            if pod.alive or pod.gave_up or not pod.started or self.finishing:
                continue
            if pod.next_start == 0.0:
                code = pod.returncode
                pod.exits.append(code)
                if pod.restarts >= MAX_RESTARTS:
                    pod.gave_up = True
                    notes.append(
                        f"{pod.name} {ended(code)} ({pod.restarts + 1} times); not restarting "
                        f"(pid {pod.pid}; see {pod.log_path})"
                    )
                    continue
                pod.next_start = now + 2.0**pod.restarts
                notes.append(
                    f"{pod.name} {ended(code)}; restarting in {2**pod.restarts:.0f}s "
                    f"(pid {pod.pid}; see {pod.log_path})"
                )
            elif now >= pod.next_start:
                pod.restarts += 1
                pod.next_start = 0.0
                pod.start()
        return notes

    def wait(self, timeout: float) -> bool:
        """Wait for every pod to exit; True if they all did."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if not any(p.alive for p in self.pods.values()):
                return True
            time.sleep(0.02)
        return False

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM every pod's process group, then SIGKILL what is left; then the zygote."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pod in self.pods.values():
                if pod.alive:
                    pod.signal(sig)
            if self.wait(grace):
                break
        if self.zygote is not None:
            self.zygote.close()
