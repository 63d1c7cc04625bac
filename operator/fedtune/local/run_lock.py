"""One runner per work directory, and whether a work directory's runner is alive.

`fedtune run` holds an exclusive flock on <workdir>/runner.lock for as long as it runs, with its pid
and job file written in it. The kernel drops the lock when the process ends, however it ends
(SIGKILL, a crash, a reboot), so a status that says Running while nobody holds the lock was left
by a runner that is gone; unlike a pid alone, a reused pid cannot fool the check. Child processes
do not inherit the lock: Python opens files non-inheritable and subprocess closes the rest.
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

LOCK_FILE = "runner.lock"


class RunnerBusy(Exception):
    """Another live process holds the work directory's lock."""

    def __init__(self, holder: dict):
        super().__init__(f"pid {holder.get('pid', '?')}")
        self.holder = holder


def _read(fd: int) -> dict:
    os.lseek(fd, 0, os.SEEK_SET)
    try:
        doc = json.loads(os.read(fd, 65536) or b"{}")
    except ValueError:
        return {}
    return doc if isinstance(doc, dict) else {}


class RunLock:
    """The held lock of one work directory; `previous` is what the last holder wrote ({} if none)."""

    def __init__(self, fd: int, previous: dict):
        self.fd, self.previous = fd, previous

    @classmethod
    def acquire(cls, workdir: Path, about: dict | None = None) -> RunLock:
        """Take the lock, never waiting; RunnerBusy if a live process holds it.

        With `about`, this process becomes the recorded holder: its pid and `about` are written in
        the file. Without, the file keeps naming the last holder (a look at a work directory).
        """
        fd = os.open(Path(workdir) / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(fd)
            os.close(fd)
            raise RunnerBusy(holder) from None
        previous = _read(fd)
        if about is not None:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps({"pid": os.getpid(), **about}).encode(), 0)
        return cls(fd, previous)

    def release(self) -> None:
        """Let the lock go (closing the file drops it)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
