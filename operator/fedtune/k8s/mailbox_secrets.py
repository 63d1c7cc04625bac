"""The mailbox Secrets as the operator reads them.

A pod may patch its own mailbox Secret (its Role allows it) with anything: the API server checks only
that `data` values are base64, and the operator does not count on even that. What a Secret holds is
read like a local mailbox's files, through fedtune.api.receipts; nothing in it can raise.
"""

from __future__ import annotations

import base64
from typing import Any

from fedtune.api.mailbox import RECEIPT, TICKET
from fedtune.api.receipts import AnyReceipt, ReceiptRead, TicketRef, read_receipt, rejected, stored_ticket


def read_secret_receipt(
    secret: dict[str, Any] | None, model: type[AnyReceipt], *, job: str | None, party: str | None = None
) -> ReceiptRead[AnyReceipt]:
    """The receipt in a mailbox Secret, judged by `read_receipt` against the ticket the Secret holds."""
    value = _value(secret, RECEIPT)
    try:
        raw = _decode(value)
    except ValueError as exc:
        return rejected(_as_bytes(value), f"{RECEIPT} in the Secret is not base64 ({exc})")
    return read_receipt(raw, model, job=job, party=party, held=held_ticket(secret))


def held_ticket(secret: dict[str, Any] | None) -> TicketRef | None:
    """The ticket a mailbox Secret holds; None when it holds none, or something a pod wrote there."""
    try:
        return stored_ticket(_decode(_value(secret, TICKET)))
    except ValueError:
        return None


def _value(secret: dict[str, Any] | None, key: str) -> object:
    data = secret.get("data") if isinstance(secret, dict) else None
    return data.get(key) if isinstance(data, dict) else None


def _decode(value: object) -> bytes | None:
    """The bytes a `data` value stands for (None: absent). ValueError when it is not base64 text."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"not a string but {type(value).__name__}")
    return base64.b64decode(value, validate=True)  # binascii.Error and non-ASCII text are ValueErrors


def _as_bytes(value: object) -> bytes:
    """What a refused value was, as bytes to tell one refused content from another."""
    return (value if isinstance(value, str) else repr(value)).encode("utf-8", "surrogatepass")
