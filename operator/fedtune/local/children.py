"""Pods of local mode: trainer and aggregator subprocesses, restarted with bounded backoff."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from fedtune.lifeline import die_with_parent

MAX_RESTARTS = 3


@dataclass
class Pod:
    """One child process standing in for a Kubernetes pod."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen | None = None
    restarts: int = 0
    next_start: float = 0.0
    gave_up: bool = False
    exits: list[int] = field(default_factory=list)

    def start(self) -> None:
        log = open(self.log_path, "ab")
        # Own session: a Ctrl-C in the terminal reaches the runner only, which then stops the pods in order.
        self.proc = subprocess.Popen(
            self.argv,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=die_with_parent,  # pods never outlive a crashed or SIGKILLed runner
        )
        log.close()

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class Pods:
    """The set of pods of one local run."""

    def __init__(self) -> None:
        self.pods: dict[str, Pod] = {}
        self.finishing = False  # once exit tickets are out, a pod that exits is done, not dead

    def start(self, pod: Pod) -> None:
        self.pods[pod.name] = pod
        pod.start()

    def check(self, now: float | None = None) -> list[str]:
        """Restart pods that died unexpectedly (bounded, with backoff). Returns messages to show."""
        now = time.monotonic() if now is None else now
        notes = []
        for pod in self.pods.values():
            if pod.alive or pod.gave_up or pod.proc is None or self.finishing:
                continue
            if pod.next_start == 0.0:
                code = pod.proc.returncode
                pod.exits.append(code)
                if pod.restarts >= MAX_RESTARTS:
                    pod.gave_up = True
                    notes.append(
                        f"{pod.name} exited with code {code} {pod.restarts + 1} times; not restarting "
                        f"(see {pod.log_path})"
                    )
                    continue
                pod.next_start = now + 2.0**pod.restarts
                notes.append(
                    f"{pod.name} exited with code {code}; restarting in {2**pod.restarts:.0f}s (see {pod.log_path})"
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
            time.sleep(0.1)
        return False

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM every pod's process group, then SIGKILL what is left."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pod in self.pods.values():
                if pod.alive:
                    try:
                        os.killpg(pod.proc.pid, sig)
                    except ProcessLookupError:
                        pass
            if self.wait(grace):
                return
