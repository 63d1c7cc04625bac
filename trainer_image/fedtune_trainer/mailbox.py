"""A pod's side of its mailbox: open one by URI, answer tickets (fedtune.api.mailbox holds the format)."""

from __future__ import annotations

import json
import logging
from typing import Any, Protocol

from fedtune.api.mailbox import POLL_SECONDS, FileMailbox

log = logging.getLogger(__name__)


class Mailbox(Protocol):
    """What trainer and aggregator need of a mailbox (a directory locally, a Secret on Kubernetes)."""

    def read_ticket(self) -> dict[str, Any] | None: ...

    def read_receipt(self) -> dict[str, Any] | None: ...

    def write_receipt(self, receipt: dict[str, Any]) -> None: ...

    def wait_ticket(
        self, newer_than: str | None, poll: float = POLL_SECONDS, timeout: float | None = None
    ) -> dict[str, Any]: ...


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


def own_receipt(mailbox: Mailbox) -> dict[str, Any] | None:
    """The receipt in the pod's mailbox; None when there is none, or one that cannot be read (something
    overwrote it): a ticket it would have answered is then worked again, and the receipt replaced."""
    try:
        receipt = mailbox.read_receipt()
    except ValueError as exc:  # not UTF-8, not JSON, not base64 (k8s_mailbox.BadDocument)
        log.warning("the receipt in the mailbox cannot be read (%s): it answers no ticket", exc)
        return None
    return receipt if isinstance(receipt, dict) else None


def answers(receipt: dict[str, Any] | None, ticket: dict[str, Any]) -> bool:
    """Whether a mailbox receipt already answers this raw ticket (the pod restarted after answering)."""
    if receipt is None:
        return False
    same = all(receipt.get(f) == ticket.get(f) for f in ("kind", "job", "round"))
    return same and receipt.get("attempt", 0) == ticket.get("attempt", 0)


def deliver(mailbox: Mailbox, receipt: Any, receipt_out: str | None) -> None:
    """Answer a ticket: the mailbox first (the control plane waits on it), then a copy to S3.

    The copy is the job's audit trail in the owner's bucket (best effort); nothing in the round
    protocol reads it, so it is not worth the control plane's waiting for.
    """
    from fedtune_trainer import transfer  # here: the mailbox itself needs no HTTP

    wire = receipt.to_wire()
    mailbox.write_receipt(wire)
    if receipt_out:
        try:
            transfer.put(receipt_out, json.dumps(wire, indent=1, sort_keys=True).encode())
        except transfer.TransferError as exc:
            log.error("could not upload the receipt copy: %s", exc)
