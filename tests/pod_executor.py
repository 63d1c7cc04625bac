"""Plays the kubelet for operator tests: runs the pods the operator creates as local processes.

Each pod's container command (`python -m fedtune_trainer … --mailbox k8s://ns/secret`, or torchrun
starting one rank per GPU) runs with the pod's own environment, pointed at the emulated API
server (ranks of a GPU pod train on the CPU with gloo here), and its phase is reported back
(Running, then Succeeded or Failed). Deleting a pod kills its process. Cache paths that are
emptyDirs in a real pod are redirected to a temporary directory.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from kube import KubeEmulator

CACHE_KEYS = ("HOME", "XDG_CACHE_HOME", "HF_HOME", "TORCH_HOME", "TRITON_CACHE_DIR", "FEDTUNE_CACHE")


class PodExecutor:
    """Runs every pod of the emulator as a process until stopped."""

    def __init__(self, kube: KubeEmulator, workdir: Path, poll: float = 0.3):
        self.kube, self.workdir, self.poll = kube, workdir, poll
        self.procs: dict[str, tuple[dict, subprocess.Popen]] = {}  # pod uid -> (pod, process)
        self.started: list[str] = []  # "ns/name" of every pod started, in order
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="pod-executor")

    def __enter__(self) -> PodExecutor:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        for _, proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    def kill(self, namespace: str, name: str) -> None:
        """Crash a pod's process (the executor then reports the pod Failed)."""
        for pod, proc in self.procs.values():
            if (pod["metadata"]["namespace"], pod["metadata"]["name"]) == (namespace, name):
                proc.kill()

    def _env(self, pod: dict) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "KUBECONFIG"))}
        for item in pod["spec"]["containers"][0].get("env", []):
            env[item["name"]] = item.get("value", "")
        cache = self.workdir / "cache"
        for key in CACHE_KEYS:
            env[key] = str(cache)
        env.pop("TORCH_EXTENSIONS_DIR", None)  # keep the machine's compiled-op cache
        env.update(FEDTUNE_KUBE_API=self.kube.url, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
        return env

    def _start(self, pod: dict) -> None:
        meta = pod["metadata"]
        cmd = list(pod["spec"]["containers"][0]["command"])
        cmd[0] = sys.executable if cmd[0] == "python" else cmd[0]
        log = (self.workdir / f"{meta['namespace']}--{meta['name']}.log").open("ab")
        proc = subprocess.Popen(cmd, env=self._env(pod), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        self.procs[meta["uid"]] = (pod, proc)
        self.started.append(f"{meta['namespace']}/{meta['name']}")
        self._phase(pod, "Running")

    def _phase(self, pod: dict, phase: str) -> None:
        meta = pod["metadata"]
        try:
            self.kube.patch("pods", meta["namespace"], meta["name"], {"status": {"phase": phase}}, subresource="status")
        except Exception:  # noqa: BLE001 - the pod may be gone already; nothing to report to
            pass

    def _loop(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        while not self._stop.is_set():
            try:
                pods = {p["metadata"]["uid"]: p for p in self.kube.list("pods")}
            except Exception:  # noqa: BLE001 - the emulator is stopping
                time.sleep(self.poll)
                continue
            for uid, pod in pods.items():
                if uid not in self.procs and not pod["metadata"].get("deletionTimestamp"):
                    self._start(pod)
            for uid, (pod, proc) in list(self.procs.items()):
                if uid not in pods and proc.poll() is None:
                    proc.kill()  # the pod was deleted
                elif uid in pods and proc.poll() is not None and not pod.get("_reported"):
                    pod["_reported"] = True
                    self._phase(pod, "Succeeded" if proc.returncode == 0 else "Failed")
            time.sleep(self.poll)
