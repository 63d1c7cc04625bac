"""Plays the scheduler and the kubelet for operator tests: runs the pods the operator creates as local
processes, through the real API server.

For every pod of the given namespaces: bind it to a node that can hold it (a `pods/binding`, as
the scheduler does; a pod no node fits stays Pending), ask a TokenRequest token bound to the pod
and its ServiceAccount (as the kubelet does for the projected token volume), then run the
container command (`python -m fedtune_trainer … --mailbox k8s://ns/secret`, or torchrun starting
one rank per GPU: ranks train on the CPU with gloo here) with the pod's own environment, that
token and the cluster CA, and report its phase (Running, then Succeeded or Failed) on
`pods/status`. A pod being deleted has its process killed, then is removed with grace period 0,
as a kubelet confirms a deletion. Cache paths that are emptyDirs in a real pod point into the
work directory.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

from kube import ApiError, Kube

STOP_SECONDS = 120  # longest wait for the loop to end its current request (reads time out after 30 s)
CACHE_KEYS = ("HOME", "XDG_CACHE_HOME", "HF_HOME", "TORCH_HOME", "TRITON_CACHE_DIR", "FEDTUNE_CACHE")


def _gpus(pod: dict) -> int:
    total = 0
    for c in pod["spec"]["containers"]:
        limits = (c.get("resources") or {}).get("limits") or {}
        total += int(limits.get("nvidia.com/gpu", 0))
    return total


class PodExecutor:
    """Schedules and runs the pods of `namespaces` (all namespaces when None) until stopped."""

    def __init__(self, kube: Kube, workdir: Path, namespaces: list[str] | None = None, poll: float = 0.3):
        self.kube, self.workdir, self.namespaces, self.poll = kube, workdir, namespaces, poll
        self.procs: dict[str, tuple[dict, subprocess.Popen]] = {}  # pod uid -> (pod, process)
        self.started: list[str] = []  # "ns/name" of every pod started, in order
        self.errors: list[str] = []  # what the API server refused the executor (binding, token, status)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="pod-executor")

    def __enter__(self) -> PodExecutor:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        # The loop may be inside a request (read timeout 30 s): wait for it to end, so that no process
        # starts after those below were killed (it checks the stop before starting one).
        self._thread.join(timeout=STOP_SECONDS)
        for _, proc in list(self.procs.values()):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if self._thread.is_alive() and exc[0] is None:
            raise RuntimeError(f"the pod executor's loop did not stop within {STOP_SECONDS} s")

    def kill(self, namespace: str, name: str) -> None:
        """Crash a pod's process (the executor then reports the pod Failed)."""
        self.signal(namespace, name, signal.SIGKILL)

    def signal(self, namespace: str, name: str, sig: int) -> None:
        """Send `sig` to a pod's process (SIGSTOP holds it still, SIGCONT lets it go on)."""
        for pod, proc in list(self.procs.values()):
            if (pod["metadata"]["namespace"], pod["metadata"]["name"]) == (namespace, name) and proc.poll() is None:
                proc.send_signal(sig)

    def token_file(self, pod: dict) -> Path:
        meta = pod["metadata"]
        return self.workdir / "tokens" / f"{meta['namespace']}--{meta['name']}--{meta['uid']}"

    # --- the scheduler's part -------------------------------------------------------------------

    def _bind(self, pod: dict, nodes: list[dict]) -> bool:
        want = _gpus(pod)
        fits = [
            n for n in nodes if int(((n.get("status") or {}).get("allocatable") or {}).get("nvidia.com/gpu", 0)) >= want
        ]
        if not fits:
            return False
        meta = pod["metadata"]
        binding = {
            "apiVersion": "v1",
            "kind": "Binding",
            "metadata": {"name": meta["name"]},
            "target": {"apiVersion": "v1", "kind": "Node", "name": fits[0]["metadata"]["name"]},
        }
        self.kube.request("POST", self.kube.path("pods", meta["namespace"], meta["name"], "binding"), binding)
        return True

    # --- the kubelet's part ---------------------------------------------------------------------

    def _env(self, pod: dict, token: Path) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "KUBECONFIG"))}
        for item in pod["spec"]["containers"][0].get("env", []):
            env[item["name"]] = item.get("value", "")
        cache = self.workdir / "cache"
        for key in CACHE_KEYS:
            env[key] = str(cache)
        env.pop("TORCH_EXTENSIONS_DIR", None)  # keep the machine's compiled-op cache
        env.update(
            FEDTUNE_KUBE_API=self.kube.url,
            FEDTUNE_KUBE_TOKEN_FILE=str(token),
            FEDTUNE_KUBE_CA_FILE=str(self.kube.cluster.ca_file),
            OMP_NUM_THREADS="1",
            HF_HUB_OFFLINE="1",
        )
        return env

    def _start(self, pod: dict) -> None:
        meta = pod["metadata"]
        token = self.token_file(pod)
        token.parent.mkdir(parents=True, exist_ok=True)
        token.write_text(self.kube.token_for(meta["namespace"], pod["spec"]["serviceAccountName"], pod=pod))
        token.chmod(0o600)
        if self._stop.is_set():
            return  # stopping: start nothing more (__exit__ waits for this loop, then kills what it started)
        cmd = list(pod["spec"]["containers"][0]["command"])
        cmd[0] = sys.executable if cmd[0] == "python" else cmd[0]
        log = (self.workdir / f"{meta['namespace']}--{meta['name']}.log").open("ab")
        proc = subprocess.Popen(
            cmd, env=self._env(pod, token), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        log.close()
        self.procs[meta["uid"]] = (pod, proc)
        self.started.append(f"{meta['namespace']}/{meta['name']}")
        self._status(pod, "Running")

    def _status(self, pod: dict, phase: str, exit_code: int | None = None) -> None:
        meta = pod["metadata"]
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        name = pod["spec"]["containers"][0]["name"]
        if exit_code is None:
            state = {"running": {"startedAt": now}}
        else:
            state = {
                "terminated": {
                    "exitCode": exit_code,
                    "reason": "Completed" if exit_code == 0 else "Error",
                    "startedAt": now,
                    "finishedAt": now,
                }
            }
        container = {
            "name": name,
            "image": pod["spec"]["containers"][0]["image"],
            "imageID": "",
            "ready": exit_code is None,
            "restartCount": 0,
            "state": state,
        }
        status = {"phase": phase, "containerStatuses": [container]}
        if phase == "Running":
            status.update(startTime=now, hostIP="127.0.0.1", podIP="127.0.0.1")
        try:
            self.kube.patch("pods", meta["namespace"], meta["name"], {"status": status}, subresource="status")
        except ApiError as exc:
            if exc.status != 404:  # gone already: nothing to report to
                self.errors.append(f"status of {meta['namespace']}/{meta['name']}: {exc}")

    def _list(self) -> list[dict]:
        if self.namespaces is None:
            return self.kube.list("pods")
        return [p for ns in self.namespaces for p in self.kube.list("pods", ns)]

    def _loop(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        while not self._stop.is_set():
            try:
                pods = {p["metadata"]["uid"]: p for p in self._list()}
                nodes = self.kube.list("nodes")
            except Exception:  # noqa: BLE001 - the API server is stopping, or a blip
                time.sleep(self.poll)
                continue
            for uid, pod in pods.items():
                if self._stop.is_set():
                    break
                try:
                    self._step(uid, pod, nodes)
                except ApiError as exc:
                    self.errors.append(f"{pod['metadata']['namespace']}/{pod['metadata']['name']}: {exc}")
            for uid, (_pod, proc) in list(self.procs.items()):
                if uid not in pods and proc.poll() is None:
                    proc.kill()  # the pod was removed
            time.sleep(self.poll)

    def _step(self, uid: str, pod: dict, nodes: list[dict]) -> None:
        meta = pod["metadata"]
        if meta.get("deletionTimestamp"):
            if uid in self.procs and self.procs[uid][1].poll() is None:
                self.procs[uid][1].kill()
                self.procs[uid][1].wait()
            with contextlib.suppress(ApiError):  # a kubelet's last word on a deleted pod
                self.kube.delete("pods", meta["namespace"], meta["name"], grace=0)
            return
        if uid not in self.procs:
            if not pod["spec"].get("nodeName"):
                if not self._bind(pod, nodes):
                    return
            if (pod.get("status") or {}).get("phase") in (None, "Pending"):
                self._start(pod)
            return
        _, proc = self.procs[uid]
        if proc.poll() is not None and (pod.get("status") or {}).get("phase") == "Running":
            self._status(pod, "Succeeded" if proc.returncode == 0 else "Failed", exit_code=proc.returncode)
