"""Receipts as the control plane reads them: whatever bytes a pod left, a validated receipt or a reason.

A pod runs another organisation's code and data, and it can write anything into its own mailbox (a
file locally, a Secret it may patch on Kubernetes). `read_receipt` is the one reader, for local mode
and the operator alike; it never raises. It refuses, with a reason a person can act on: more than
MAX_RECEIPT_BYTES, bytes that are not UTF-8, text that is not one JSON object (NaN, Infinity,
integers beyond 64 bits and unpaired surrogates are not JSON the control plane takes: see
`loads_strict`), a document that is not the receipt model, a receipt of another job or party, and
one that answers a ticket later than the one its mailbox holds. A refused receipt counts as no
receipt: the pod's round deadline and retries apply as to a silent pod. A receipt of an earlier
ticket is no error (the pod has not answered the new one yet) and is returned; the state machine
takes only answers to the current ticket. `Rejections` says each refusal once per distinct
content, not at every pass of the control loop.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from pydantic import ValidationError

from fedtune.api.errors import describe
from fedtune.api.protocol import AggregatorReceipt, TrainerReceipt

# A receipt is a small JSON object: about 1 KiB from a trainer (metrics, timings, sha256,
# fingerprint), an aggregator's a line more per refused update. 64 KiB leaves room for long error
# messages and hundreds of refused updates, and bounds what one pod makes the control plane read,
# parse and validate at every pass (a Secret alone could hold 1 MiB, a file anything).
MAX_RECEIPT_BYTES = 64 * 1024
# A ticket carries presigned URLs, multipart ones for large adapters (~1 KB a part, MAX_PARTS of
# them per object): far below this. A mailbox Secret holds 1 MiB; a local file could be anything.
MAX_TICKET_BYTES = 4 * 1024 * 1024
_INT64 = 2**63  # Kubernetes integers are int64: a status holding a larger one is refused
_SHOWN = 200  # characters of pod-written text a reason quotes at most
# Tickets of one round, in the order a pod gets them (a round's eval follows its training).
_KIND_ORDER = {"init": 0, "keys": 1, "shares": 2, "train": 3, "unmask": 4, "aggregate": 3, "eval": 5, "exit": 6}
# A round's exchanges with secure aggregation: a retried attempt starts again from keys.
_ROUND_KINDS = frozenset({"keys", "shares", "train", "unmask"})

AnyReceipt = TypeVar("AnyReceipt", TrainerReceipt, AggregatorReceipt)


@dataclass(frozen=True)
class TicketRef:
    """A ticket's identity: what a receipt answers."""

    kind: str
    round: int
    attempt: int = 0

    @property
    def id(self) -> str:
        return f"{self.kind}-r{self.round}-a{self.attempt}"

    def after(self, other: TicketRef) -> bool:
        """Whether a pod gets this ticket after `other` (attempts compare within one kind)."""
        mine, theirs = (self.round, _KIND_ORDER.get(self.kind, 0)), (other.round, _KIND_ORDER.get(other.kind, 0))
        if self.round == other.round and {self.kind, other.kind} <= _ROUND_KINDS and self.attempt != other.attempt:
            return self.attempt > other.attempt
        if mine != theirs:
            return mine > theirs
        return self.kind == other.kind and self.attempt > other.attempt


@dataclass(frozen=True)
class ReceiptRead(Generic[AnyReceipt]):
    """What a mailbox's receipt bytes were: a receipt, nothing (`receipt` and `rejection` None), or a refusal."""

    receipt: AnyReceipt | None = None
    rejection: str | None = None
    digest: str | None = field(default=None, repr=False)  # of the refused bytes: one report per content


def rejected(raw: bytes, reason: str) -> ReceiptRead:
    """A refusal of `raw` (for readers that refuse before `read_receipt`: an unreadable file, bad base64)."""
    return ReceiptRead(rejection=reason, digest=hashlib.sha256(raw).hexdigest())


def read_receipt(
    raw: bytes | None,
    model: type[AnyReceipt],
    *,
    job: str | None,
    party: str | None = None,
    held: TicketRef | None = None,
) -> ReceiptRead[AnyReceipt]:
    """Judge the receipt bytes of one mailbox. Never raises.

    `job` is the job's uid, `party` the party key the mailbox belongs to (None for the aggregator),
    `held` the ticket the mailbox holds (None when it holds none that can be read: no order check).
    Empty or missing bytes are no receipt.
    """
    if not raw:
        return ReceiptRead()
    if len(raw) > MAX_RECEIPT_BYTES:
        return rejected(raw, f"more than {MAX_RECEIPT_BYTES} bytes (a receipt is a small JSON object)")
    try:
        doc = loads_strict(raw)
    except UnicodeDecodeError as exc:
        return rejected(raw, f"not UTF-8 text (byte {exc.start}: {exc.reason})")
    except json.JSONDecodeError as exc:
        return rejected(raw, f"not JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})")
    except (ValueError, RecursionError) as exc:
        return rejected(raw, f"not JSON the control plane takes ({exc})")
    if not isinstance(doc, dict):
        return rejected(raw, f"not a JSON object but {_json_type(doc)}")
    try:
        receipt = model.model_validate(doc)
    except ValidationError as exc:
        problems = describe(exc).splitlines()
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        return rejected(raw, f"not a {model.__name__}: {_shown(problems[0])}{more}")
    if receipt.job != job:
        return rejected(raw, f"for job {_shown(receipt.job)!r}, not this job ({job})")
    # Exit tickets written by the operator name no party, so neither do the receipts answering them.
    if party is not None and isinstance(receipt, TrainerReceipt) and receipt.kind != "exit" and receipt.party != party:
        return rejected(raw, f"from party {_shown(receipt.party)!r}, not {party}")
    answers = TicketRef(receipt.kind, receipt.round, receipt.attempt)
    if held is not None and answers.after(held):
        return rejected(raw, f"answers ticket {answers.id}, but the mailbox holds {held.id}")
    return ReceiptRead(receipt=receipt)


def stored_ticket(raw: bytes | None) -> TicketRef | None:
    """The identity of the ticket stored in a mailbox; None when there is none, or something else
    (a pod can overwrite its own mailbox: the control plane then writes its ticket again)."""
    if not raw or len(raw) > MAX_TICKET_BYTES:
        return None
    try:
        doc = loads_strict(raw)
    except (ValueError, RecursionError):
        return None
    if not isinstance(doc, dict):
        return None
    kind, rnd, attempt = doc.get("kind"), doc.get("round"), doc.get("attempt", 0)
    if not isinstance(kind, str) or not _is_int(rnd) or not _is_int(attempt):
        return None
    return TicketRef(kind, rnd, attempt)


def loads_strict(raw: bytes) -> Any:
    """JSON as the control plane takes it: UTF-8, no NaN or Infinity (RFC 8259 has none), integers
    within 64 bits (a Kubernetes status holds no more), and no escaped unpaired surrogate ("\\ud800",
    as I-JSON, RFC 7493, has it: no UTF-8 text holds one, so neither could status.json).

    Raises UnicodeDecodeError, json.JSONDecodeError, ValueError (a number out of range, a
    surrogate) or RecursionError (nesting deeper than the interpreter's recursion limit).
    """
    doc = json.loads(raw.decode("utf-8"), parse_constant=_no_constant, parse_int=_int64, parse_float=_finite)
    try:  # the one test of every string and key at once, at the C encoder's speed
        json.dumps(doc, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("a string holds an unpaired surrogate (\\ud800-\\udfff), which is not text") from None
    return doc


class Rejections:
    """Which refused receipt each mailbox holds, so a refusal is reported once per distinct content."""

    def __init__(self) -> None:
        self._held: dict[str, str] = {}

    def report(self, pod: str, read: ReceiptRead) -> str | None:
        """The line to log for `pod`'s receipt, or None: no refusal, or this content was reported already."""
        if read.rejection is None:
            self._held.pop(pod, None)
            return None
        key = read.digest or read.rejection
        if self._held.get(pod) == key:
            return None
        self._held[pod] = key
        return f"ignoring the receipt of {pod}: {read.rejection}"


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def _int64(text: str) -> int:
    value = int(text) if len(text) <= 20 else _INT64  # 20 characters hold every int64; more cannot
    if not -_INT64 <= value < _INT64:
        raise ValueError(f"the integer {_shown(text)} is beyond 64 bits")
    return value


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {_shown(text)} is beyond a 64-bit float")
    return value


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _json_type(doc: object) -> str:
    names = {list: "an array", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
    return "null" if doc is None else names.get(type(doc), type(doc).__name__)


def _shown(text: str) -> str:
    """Pod-written text as a reason quotes it: printable, and not too long."""
    text = "".join(c if c.isprintable() else "\ufffd" for c in text)
    return text if len(text) <= _SHOWN else text[:_SHOWN] + "…"
