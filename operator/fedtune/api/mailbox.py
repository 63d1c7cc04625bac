"""The mailbox half of the round protocol: what a mailbox holds, and a local mailbox directory.

A mailbox holds one ticket (written by the control plane) and one receipt (written by the pod).
Locally it is a directory with ticket.json and receipt.json, each replaced atomically; on
Kubernetes a Secret with the same two keys (fedtune_trainer.k8s_mailbox). The control plane and
the trainer both import this module, so neither side imports the other.

Waiting on a local mailbox is event-driven: `Waiter` sleeps in the kernel (inotify, through
inotify_simple) until a file of interest is replaced, so an idle process takes no CPU and a
hand-off costs microseconds. Where inotify is missing (not Linux, or the package not installed)
it falls back to polling every POLL_SECONDS.
"""

from __future__ import annotations

import json
import os
import stat
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

TICKET = "ticket.json"
RECEIPT = "receipt.json"
# Between two reads of a local mailbox file where inotify is not available: a round has four
# hand-offs through mailboxes, so this bounds the waiting a round adds (bench/overhead.py).
POLL_SECONDS = 0.02


class Waiter:
    """Blocks until one of `names` is written into one of `dirs` (or a timeout passes).

    Files are replaced atomically (os.replace), which inotify reports as IN_MOVED_TO on the
    directory. The watch exists from construction on, so a write between a caller's read and its
    `wait()` is not missed: the event is queued and `wait()` returns at once.
    """

    def __init__(self, dirs: Iterable[str | os.PathLike[str]], names: Iterable[str], poll: float = POLL_SECONDS):
        self.names, self.poll = set(names), poll
        self._inotify = None
        try:
            from inotify_simple import INotify, flags
        except (ImportError, OSError):  # not Linux, or not installed: poll instead
            return
        try:
            self._inotify = INotify()
            for d in dirs:
                self._inotify.add_watch(os.fspath(d), flags.MOVED_TO)
        except OSError:  # e.g. the per-user watch limit: polling still works
            self.close()

    @property
    def event_driven(self) -> bool:
        return self._inotify is not None

    def wait(self, timeout: float) -> bool:
        """Sleep until a watched file is written or `timeout` seconds pass; True if one was written."""
        if self._inotify is None:
            time.sleep(min(self.poll, max(timeout, 0.0)))
            return False
        end = time.monotonic() + max(timeout, 0.0)
        while True:
            left = end - time.monotonic()
            events = self._inotify.read(timeout=max(0, int(left * 1000)))
            if any(e.name in self.names for e in events):
                return True
            if time.monotonic() >= end:
                return False

    def close(self) -> None:
        if self._inotify is not None:
            self._inotify.close()
            self._inotify = None


def write_json_atomic(path: Path, doc: dict[str, Any]) -> None:
    """Write JSON so that readers see the old or the new file, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as fh:
        json.dump(doc, fh, indent=1, sort_keys=True)
    os.replace(tmp, path)


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None


def read_capped(path: Path, limit: int) -> bytes | None:
    """The bytes of a regular file, at most `limit` + 1 of them (enough to tell it is too big); None if
    there is none. For what a pod wrote: a symlink is not followed, and a FIFO or a device is refused
    (OSError) rather than waited on."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"{path.name} is not a regular file")
        chunks, size = [], 0
        while size <= limit and (chunk := os.read(fd, limit + 1 - size)):
            chunks.append(chunk)
            size += len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


class FileMailbox:
    """A mailbox directory shared by one pod and the control plane."""

    def __init__(self, directory: str | os.PathLike[str]):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._waiter: Waiter | None = None

    def read_ticket(self) -> dict[str, Any] | None:
        return read_json(self.dir / TICKET)

    def write_ticket(self, ticket: dict[str, Any]) -> None:
        write_json_atomic(self.dir / TICKET, ticket)

    def read_receipt(self) -> dict[str, Any] | None:
        return read_json(self.dir / RECEIPT)

    def write_receipt(self, receipt: dict[str, Any]) -> None:
        write_json_atomic(self.dir / RECEIPT, receipt)

    def raw(self, name: str, limit: int) -> bytes | None:
        """TICKET's or RECEIPT's bytes as they are (see read_capped): the control plane's reading."""
        return read_capped(self.dir / name, limit)

    def wait_ticket(
        self, newer_than: str | None, poll: float = POLL_SECONDS, timeout: float | None = None
    ) -> dict[str, Any]:
        """Block until the ticket differs from the one identified by `newer_than` (its id string)."""
        if self._waiter is None:  # watching before the first read: no write can slip between the two
            self._waiter = Waiter([self.dir], [TICKET], poll)
        start = time.monotonic()
        while True:
            ticket = self.read_ticket()
            if ticket is not None and ticket_id(ticket) != newer_than:
                return ticket
            left = None if timeout is None else timeout - (time.monotonic() - start)
            if left is not None and left <= 0:
                raise TimeoutError(f"no new ticket in {self.dir} after {timeout}s")
            # A missed event (the directory replaced, say) costs at most a second.
            self._waiter.wait(1.0 if left is None else min(left, 1.0))


def ticket_id(ticket: dict[str, Any]) -> str:
    """Identity of a ticket on the wire: kind, round and attempt."""
    return f"{ticket.get('kind')}-r{ticket.get('round')}-a{ticket.get('attempt', 0)}"
