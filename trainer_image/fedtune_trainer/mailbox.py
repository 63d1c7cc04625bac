"""A pod's mailbox: the ticket the control plane wrote, the receipt the pod answers with.

Local mode: a directory with ticket.json and receipt.json, each replaced atomically.
(On Kubernetes the mailbox is a Secret with the same two keys.)
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger(__name__)

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


class Mailbox(Protocol):
    """What trainer and aggregator need of a mailbox (a directory locally, a Secret on Kubernetes)."""

    def read_ticket(self) -> dict[str, Any] | None: ...

    def read_receipt(self) -> dict[str, Any] | None: ...

    def write_receipt(self, receipt: dict[str, Any]) -> None: ...

    def wait_ticket(
        self, newer_than: str | None, poll: float = POLL_SECONDS, timeout: float | None = None
    ) -> dict[str, Any]: ...


def ticket_id(ticket: dict[str, Any]) -> str:
    """Identity of a ticket on the wire: kind, round and attempt."""
    return f"{ticket.get('kind')}-r{ticket.get('round')}-a{ticket.get('attempt', 0)}"


def open_mailbox(uri: str) -> Mailbox:
    """A mailbox from its URI: k8s://<namespace>/<secret> (a pod), or a directory / file:///path (local mode)."""
    if uri.startswith("k8s://"):
        from fedtune_trainer.k8s_mailbox import SecretMailbox  # lazy: local mode needs no API client

        return SecretMailbox.from_uri(uri)
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    if "://" in uri:
        raise ValueError(f"unsupported mailbox {uri!r}: use k8s://<namespace>/<secret>, a directory or file:///path")
    return FileMailbox(uri)


def as_int(value: Any, default: int) -> int:
    """An int field of a raw ticket, or `default` when it is missing or not an int."""
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def answers(receipt: dict[str, Any] | None, ticket: dict[str, Any]) -> bool:
    """Whether a mailbox receipt already answers this raw ticket (the pod restarted after answering)."""
    if receipt is None:
        return False
    same = all(receipt.get(f) == ticket.get(f) for f in ("kind", "job", "round"))
    return same and receipt.get("attempt", 0) == ticket.get("attempt", 0)


def deliver(mailbox: Mailbox, receipt: Any, receipt_out: str | None) -> None:
    """Answer a ticket: a copy to S3 first (best effort), then the mailbox.

    In that order, a control plane woken by the mailbox finds the S3 copy already there.
    """
    from fedtune_trainer import transfer  # here: the mailbox itself needs no HTTP

    wire = receipt.to_wire()
    if receipt_out:
        try:
            transfer.put(receipt_out, json.dumps(wire, indent=1, sort_keys=True).encode())
        except transfer.TransferError as exc:
            log.error("could not upload the receipt copy: %s", exc)
    mailbox.write_receipt(wire)
