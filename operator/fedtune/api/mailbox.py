"""The mailbox half of the round protocol: what a mailbox holds, and a local mailbox directory.

A mailbox holds one ticket (written by the control plane) and one receipt (written by the pod).
Locally it is a directory with ticket.json and receipt.json, each replaced atomically; on
Kubernetes a Secret with the same two keys (fedtune_trainer.k8s_mailbox). The control plane and
the trainer both import this module, so neither side imports the other.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

TICKET = "ticket.json"
RECEIPT = "receipt.json"
# Between two reads of a local mailbox file (a few tens of microseconds each): a round has four
# hand-offs through mailboxes, so this bounds the waiting a round adds (bench/overhead.py).
POLL_SECONDS = 0.02


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


class FileMailbox:
    """A mailbox directory shared by one pod and the control plane."""

    def __init__(self, directory: str | os.PathLike[str]):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)

    def read_ticket(self) -> dict[str, Any] | None:
        return read_json(self.dir / TICKET)

    def write_ticket(self, ticket: dict[str, Any]) -> None:
        write_json_atomic(self.dir / TICKET, ticket)

    def read_receipt(self) -> dict[str, Any] | None:
        return read_json(self.dir / RECEIPT)

    def write_receipt(self, receipt: dict[str, Any]) -> None:
        write_json_atomic(self.dir / RECEIPT, receipt)

    def wait_ticket(
        self, newer_than: str | None, poll: float = POLL_SECONDS, timeout: float | None = None
    ) -> dict[str, Any]:
        """Block until the ticket differs from the one identified by `newer_than` (its id string)."""
        start = time.monotonic()
        while True:
            ticket = self.read_ticket()
            if ticket is not None and ticket_id(ticket) != newer_than:
                return ticket
            if timeout is not None and time.monotonic() - start > timeout:
                raise TimeoutError(f"no new ticket in {self.dir} after {timeout}s")
            time.sleep(poll)


def ticket_id(ticket: dict[str, Any]) -> str:
    """Identity of a ticket on the wire: kind, round and attempt."""
    return f"{ticket.get('kind')}-r{ticket.get('round')}-a{ticket.get('attempt', 0)}"
