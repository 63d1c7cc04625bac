"""One runner per work directory, and whether a work directory's runner is alive.

`fedtune run` holds an exclusive flock on <workdir>/runner.lock for as long as it runs, with its pid
and job file written in it. The kernel drops the lock when the process ends, however it ends
(SIGKILL, a crash, a reboot), so a status that says Running while nobody holds the lock was left
by a runner that is gone; unlike a pid alone, a reused pid cannot fool the check. Child processes
do not inherit the lock: Python opens files non-inheritable and subprocess closes the rest.

A look at a work directory (`fedtune status`) takes the lock too, for a moment, without writing its
own pid: the file keeps naming the last runner. So a busy lock whose named runner has ended is held
by such a look, and `acquire` tries again for a little while instead of blaming that dead pid.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from pathlib import Path

LOCK_FILE = "runner.lock"
LOOK_SECONDS = 2.0  # how long a look may hold the lock, at most (it reads, and rewrites one status)


class RunnerBusy(Exception):
    """Another live process holds the work directory's lock: the runner it names (`live`), or, if that one
    has ended, some other process (a look that did not let go in time)."""

    def __init__(self, holder: dict, live: bool = True):
        pid = holder.get("pid", "?")
        super().__init__(f"pid {pid}" if live else f"not the runner it names, pid {pid}, which has ended")
        self.holder, self.live = holder, live


def alive(pid: object) -> bool:
    """Whether a process with this pid exists (a signal 0 reaches it, or exists but is not ours)."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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
    def acquire(cls, workdir: Path, about: dict | None = None, wait: float = LOOK_SECONDS) -> RunLock:
        """Take the lock; RunnerBusy if a live process holds it. OSError if the file cannot be opened
        read-write (created if missing): a work directory this process cannot write in.

        Held by the runner the file names: RunnerBusy at once. Held while that runner has ended: a look
        holds it for a moment, so try again for up to `wait` seconds.

        With `about`, this process becomes the recorded holder: its pid and `about` are written in
        the file. Without, the file keeps naming the last holder (a look at a work directory).
        """
        fd = os.open(Path(workdir) / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = _read(fd)  # read each time: a runner that just took the lock writes its pid next
                live = alive(holder.get("pid"))
                if live or time.monotonic() >= deadline:
                    os.close(fd)
                    raise RunnerBusy(holder, live) from None
                time.sleep(0.02)
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
