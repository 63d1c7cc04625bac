"""CPU slots: at most as many parties compute at once as the machine has cores for them (local mode).

On Kubernetes a node admits only the pods whose CPU requests fit; local mode runs every party on
one machine, and four single-threaded parties on two cores would time-slice each other (and
each other's caches). When the runner sees more parties than cores it gives them a directory
of N slot files (FEDTUNE_CPU_SLOTS); a party holds one (an exclusive flock) while it computes
and lets it go before its upload, so N parties compute at full speed while the others wait, as
a simulation engine does with per-client CPU resources. The kernel drops a dead process's lock,
so a killed party never keeps a slot. Without the variable (Kubernetes) holding is a no-op.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ENV = "FEDTUNE_CPU_SLOTS"
WAIT_SECONDS = 0.005  # between two tries while every slot is taken


@contextmanager
def hold(directory: str | os.PathLike[str] | None = None) -> Iterator[None]:
    """Hold a free slot of `directory` (default: $FEDTUNE_CPU_SLOTS) for the body; no-op without one."""
    directory = directory if directory is not None else os.environ.get(ENV)
    if not directory:
        yield
        return
    slots = sorted(Path(directory).glob("slot-*"))
    if not slots:
        yield
        return
    fds = [os.open(s, os.O_RDWR) for s in slots]
    try:
        while True:
            for fd in fds:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue
                try:
                    yield
                finally:
                    fcntl.flock(fd, fcntl.LOCK_UN)
                return
            time.sleep(WAIT_SECONDS)
    finally:
        for fd in fds:
            os.close(fd)


def make_slots(directory: Path, n: int) -> Path:
    """Create `n` slot files in `directory` (existing ones are reused); returns the directory."""
    directory.mkdir(parents=True, exist_ok=True)
    wanted = {f"slot-{i}" for i in range(n)}
    for name in wanted:
        (directory / name).touch()
    for extra in directory.glob("slot-*"):
        if extra.name not in wanted:
            extra.unlink()
    return directory
