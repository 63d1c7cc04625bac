"""Receipts as the control plane reads them (fedtune.api.receipts, fedtune.k8s.mailbox_secrets):
whatever a pod leaves in its mailbox is a receipt or a reason, never an exception. Property tests
throw arbitrary bytes, arbitrary JSON and mutations of a valid receipt at both readers. And a pod
whose receipt was overwritten with garbage works its ticket again instead of crashing."""

from __future__ import annotations

import base64
import json
import os
from datetime import UTC, datetime

import pytest
from fedtune.api.mailbox import FileMailbox, read_capped
from fedtune.api.protocol import AggregatorReceipt, TrainerReceipt
from fedtune.api.receipts import (
    MAX_RECEIPT_BYTES,
    ReceiptRead,
    Rejections,
    TicketRef,
    read_receipt,
    stored_ticket,
)
from fedtune.api.status import Metrics
from fedtune.k8s.mailbox_secrets import held_ticket, read_secret_receipt
from fedtune_trainer.k8s_mailbox import SecretMailbox
from fedtune_trainer.mailbox import own_receipt
from hypothesis import example, given, settings
from hypothesis import strategies as st

UID, PARTY = "uid-1", "default/alice"
HELD = TicketRef("train", 2, 1)  # the ticket the mailbox holds in these tests

# Text with unpaired surrogates too: JSON can escape them ("\\ud800"), UTF-8 cannot hold them.
TEXT = st.lists(st.characters() | st.sampled_from(["\ud800", "\udfff"]), max_size=20).map("".join)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=20,
)
PROPERTY = settings(max_examples=300, deadline=None)


def trainer_wire(**changes) -> dict:
    receipt = TrainerReceipt(
        kind="train",
        job=UID,
        party=PARTY,
        round=2,
        attempt=1,
        ok=True,
        num_samples=10,
        sha256="ab" * 32,
        base_model_fingerprint="fp",
        metrics=Metrics(train_loss=0.5, eval_accuracy=0.75),
        finished_at=datetime(2026, 1, 1, tzinfo=UTC),
    )
    return {**receipt.to_wire(), **changes}


def aggregator_wire(**changes) -> dict:
    receipt = AggregatorReceipt(job=UID, round=2, attempt=1, ok=True, accepted=[PARTY], rejected={"default/bob": "NaN"})
    return {**receipt.to_wire(), **changes}


def encode(doc: object) -> bytes:
    return json.dumps(doc).encode()


def read(raw: bytes | None, model=TrainerReceipt, held: TicketRef | None = HELD) -> ReceiptRead:
    return read_receipt(raw, model, job=UID, party=PARTY if model is TrainerReceipt else None, held=held)


def secret(receipt: object = None, ticket: object = None) -> dict:
    return {"data": {k: v for k, v in (("receipt.json", receipt), ("ticket.json", ticket)) if v is not None}}


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def assert_judged(got: ReceiptRead, raw: bytes | None) -> None:
    """A receipt (of this job, with the model's checks passed) or a printable reason; nothing for no bytes."""
    if not raw:
        assert got.receipt is None and got.rejection is None
        return
    assert (got.receipt is None) != (got.rejection is None), got
    if got.rejection is not None:
        assert got.rejection.isprintable() and len(got.rejection) < 600, got.rejection
    else:
        receipt = got.receipt
        assert receipt.job == UID and not TicketRef(receipt.kind, receipt.round, receipt.attempt).after(HELD)
        receipt.model_dump_json()  # what is taken goes into status.json and a Kubernetes status as it is


# --- each refusal, and what is taken -----------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, reason",
    [
        (b"\xff\xfe\x00\x01", "not UTF-8 text (byte 0: invalid start byte)"),
        (b"hello, I am not JSON", "not JSON (Expecting value at line 1, column 1)"),
        (b"{" + encode(trainer_wire())[1:-1] + b",}", "not JSON (Expecting property name enclosed in double quotes"),
        (b"[" * 50_000, "not JSON the control plane takes (maximum recursion depth exceeded"),
        (encode(trainer_wire(metrics={"trainLoss": float("nan")})), "(NaN is not a JSON number)"),
        (b'{"round": 1e999}', "(the number 1e999 is beyond a 64-bit float)"),
        (encode(trainer_wire(bytesUp=2**63)), "(the integer 9223372036854775808 is beyond 64 bits)"),
        (encode(trainer_wire(error="\ud800")), "(a string holds an unpaired surrogate (\\ud800-\\udfff)"),
        (encode([trainer_wire()]), "not a JSON object but an array"),
        (b"null", "not a JSON object but null"),
        (b" " * MAX_RECEIPT_BYTES + b"{}", f"more than {MAX_RECEIPT_BYTES} bytes"),
        (encode(trainer_wire(round="two")), "not a TrainerReceipt: round: Input should be a valid integer"),
        (encode(trainer_wire(surprise=1)), "not a TrainerReceipt: surprise: unknown field"),
        (encode(trainer_wire(numSamples=-1)), "numSamples: Input should be greater than or equal to 0"),
        (encode(trainer_wire(bytesUp=2**53 + 1)), "bytesUp: Input should be less than or equal to 9007199254740992"),
        (encode({"kind": "train"}), "not a TrainerReceipt: job: required field is missing (and 3 more)"),
        (encode(trainer_wire(job="uid-OTHER")), "for job 'uid-OTHER', not this job (uid-1)"),
        (encode(trainer_wire(party="default/bob")), "from party 'default/bob', not default/alice"),
        (encode(trainer_wire(round=3)), "answers ticket train-r3-a1, but the mailbox holds train-r2-a1"),
        (encode(trainer_wire(attempt=2)), "answers ticket train-r2-a2, but the mailbox holds train-r2-a1"),
        (encode(trainer_wire(kind="eval", attempt=0)), "answers ticket eval-r2-a0, but the mailbox holds train-r2-a1"),
        (encode(trainer_wire(fault="disk")), "not a TrainerReceipt: fault: Input should be 'pod' or 'storage'"),
        (encode(trainer_wire(fault="storage")), "fault: only a failed receipt (ok: false) says whose fault"),
    ],
)
def test_each_refusal_says_why(raw, reason):
    got = read(raw)
    assert got.receipt is None and reason in got.rejection


def test_pod_written_text_in_a_reason_is_printable_and_short():
    got = read(encode(trainer_wire(job="\x1b[2J" + "x" * 5000)))
    assert got.rejection.startswith("for job '\ufffd[2Jxxx") and got.rejection.isprintable()
    assert len(got.rejection) < 300


def test_the_held_ticket_and_earlier_ones_are_answered_without_complaint():
    for changes in ({}, {"attempt": 0}, {"round": 1}, {"kind": "init", "round": 0, "attempt": 3}):
        assert read(encode(trainer_wire(**changes))).receipt is not None, changes
    # a mailbox holding no readable ticket: no order to check
    assert read(encode(trainer_wire(round=9)), held=None).receipt.round == 9
    # the operator's exit tickets name no party, nor do the receipts answering them
    exit_receipt = encode(trainer_wire(kind="exit", party="", attempt=0))
    assert read(exit_receipt, held=TicketRef("exit", 2)).receipt.kind == "exit"
    # the aggregator: its receipts name no party; a later attempt of the held round is ahead
    assert read(encode(aggregator_wire()), AggregatorReceipt, TicketRef("aggregate", 2, 1)).receipt is not None
    ahead = read(encode(aggregator_wire(attempt=2)), AggregatorReceipt, TicketRef("aggregate", 2, 1))
    assert ahead.rejection == "answers ticket aggregate-r2-a2, but the mailbox holds aggregate-r2-a1"


@pytest.mark.parametrize("model, wire", [(TrainerReceipt, trainer_wire), (AggregatorReceipt, aggregator_wire)])
def test_a_failed_receipt_says_whether_the_storage_failed_or_the_pod(model, wire):
    base = {"ok": False, "error": "PUT failed after 5 attempts: NewConnectionError for http://s3:9000/b/k"}
    storage = read(encode(wire(**base, fault="storage")), model).receipt
    assert storage.storage_failed and storage.fault == "storage"
    for fault in ("pod", None):  # pods that say nothing (older ones) fail on their own
        own = read(encode(wire(**base, fault=fault)), model).receipt
        assert own is not None and not own.storage_failed
    refused = read(encode(wire(fault="storage")), model)
    assert refused.receipt is None and "fault: only a failed receipt (ok: false)" in refused.rejection


def test_no_bytes_are_no_receipt():
    assert read(None) == ReceiptRead() and read(b"") == ReceiptRead()


def test_a_refusal_is_reported_once_per_content():
    notes = Rejections()
    binary, text = read(b"\xff"), read(b"nope")
    assert notes.report("default/alice", binary) == (
        "ignoring the receipt of default/alice: not UTF-8 text (byte 0: invalid start byte)"
    )
    assert notes.report("default/alice", binary) is None  # the next pass finds the same bytes
    assert notes.report("default/bob", binary) is not None  # another pod's
    assert notes.report("default/alice", text) is not None  # other bytes
    assert notes.report("default/alice", read(encode(trainer_wire()))) is None  # a good receipt ...
    assert notes.report("default/alice", binary) is not None  # ... so the old bytes again are news


def test_the_stored_ticket_is_read_or_none():
    assert stored_ticket(encode({"kind": "train", "round": 2, "attempt": 1, "job": UID})) == HELD
    assert stored_ticket(encode({"kind": "exit", "round": 3})) == TicketRef("exit", 3, 0)
    for raw in (None, b"", b"\xff", b"[1]", encode({"kind": "train", "round": True}), encode({"round": 1})):
        assert stored_ticket(raw) is None, raw


# --- the local mailbox file ------------------------------------------------------------------------


def test_read_capped_reads_regular_files_only_and_never_blocks(tmp_path):
    assert read_capped(tmp_path / "missing", 10) is None
    (tmp_path / "big").write_bytes(b"x" * 1000)
    assert read_capped(tmp_path / "big", 10) == b"x" * 11  # enough to tell it is too big
    os.mkfifo(tmp_path / "fifo")  # a pod that made its receipt a pipe must not hang the control plane
    with pytest.raises(OSError, match="not a regular file"):
        read_capped(tmp_path / "fifo", 10)
    (tmp_path / "link").symlink_to(tmp_path / "big")
    with pytest.raises(OSError):
        read_capped(tmp_path / "link", 10)


# --- the operator's mailbox Secrets ------------------------------------------------------------------


def test_a_secret_receipt_is_judged_against_the_ticket_the_secret_holds():
    ticket = b64(encode({"kind": "train", "round": 2, "attempt": 1}))
    good = read_secret_receipt(secret(b64(encode(trainer_wire())), ticket), TrainerReceipt, job=UID, party=PARTY)
    assert good.receipt is not None and good.receipt.round == 2
    ahead = secret(b64(encode(trainer_wire(round=5))), ticket)
    assert "but the mailbox holds train-r2-a1" in read_secret_receipt(ahead, TrainerReceipt, job=UID).rejection
    garbage = read_secret_receipt(secret(b64(b"\x00\xff")), TrainerReceipt, job=UID, party=PARTY)
    assert garbage.rejection == "not UTF-8 text (byte 1: invalid start byte)"
    for value in ("not base64!", "ab=c", "\u00e9t\u00e9", 42, ["x"]):
        got = read_secret_receipt(secret(value), TrainerReceipt, job=UID, party=PARTY)
        assert got.receipt is None and got.rejection.startswith("receipt.json in the Secret is not base64 (")
    assert held_ticket(secret(ticket="!!")) is None and held_ticket(None) is None
    assert read_secret_receipt(None, AggregatorReceipt, job=UID) == ReceiptRead()


# --- the pod's own look at its receipt -----------------------------------------------------------------


def test_a_pod_takes_an_unreadable_receipt_of_its_own_for_none(tmp_path):
    box = FileMailbox(tmp_path)
    box.write_receipt(trainer_wire())
    assert own_receipt(box) == trainer_wire()
    for garbage in (b"\xff\xfe", b"plain text", b"[1, 2]"):
        (tmp_path / "receipt.json").write_bytes(garbage)
        assert own_receipt(box) is None  # so it works its ticket again and writes a receipt over it
    secret_box = SecretMailbox("ns", "mailbox", api="http://127.0.0.1:9")  # never called: only decoding
    with pytest.raises(ValueError, match="receipt.json in Secret ns/mailbox is not base64 JSON"):
        secret_box._decode(secret(b64(b"\xff")), "receipt.json")


# --- properties ------------------------------------------------------------------------------------


@PROPERTY
@given(st.binary(max_size=2000))
def test_any_bytes_are_a_receipt_or_a_reason(raw):
    for model in (TrainerReceipt, AggregatorReceipt):
        assert_judged(read(raw, model), raw)
    assert stored_ticket(raw) is None or isinstance(stored_ticket(raw), TicketRef)


@PROPERTY
@given(JSON)
def test_any_json_is_a_receipt_or_a_reason(doc):
    raw = encode(doc)  # NaN and Infinity included: Python writes them, JSON has no such numbers
    for model in (TrainerReceipt, AggregatorReceipt):
        assert_judged(read(raw, model), raw)
    assert stored_ticket(raw) is None or isinstance(stored_ticket(raw), TicketRef)


FIELDS = sorted({name for m in (TrainerReceipt, AggregatorReceipt) for name in m.model_json_schema()["properties"]})
FIELD_VALUE = JSON | TEXT | st.integers(-(2**70), 2**70) | st.sampled_from([UID, PARTY, "train", "exit", 2])


@PROPERTY
@given(
    model=st.sampled_from([TrainerReceipt, AggregatorReceipt]),
    changes=st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=8), FIELD_VALUE, max_size=3),
    drops=st.sets(st.sampled_from(FIELDS), max_size=2),
    edits=st.lists(st.tuples(st.integers(0, 2000), st.integers(0, 2), st.binary(max_size=2)), max_size=3),
)
@example(model=TrainerReceipt, changes={"error": "failed \ud800"}, drops=set(), edits=[])
@example(model=AggregatorReceipt, changes={"ok": False, "fault": "storage"}, drops=set(), edits=[])
@example(model=TrainerReceipt, changes={"fault": "storage"}, drops=set(), edits=[])
def test_any_change_to_a_valid_receipt_is_a_receipt_or_a_reason(model, changes, drops, edits):
    doc = trainer_wire() if model is TrainerReceipt else aggregator_wire()
    doc = {k: v for k, v in doc.items() if k not in drops} | changes
    raw = bytearray(encode(doc))
    for at, cut, new in edits:  # and a few bytes changed, inserted or cut
        at %= len(raw) + 1
        raw[at : at + cut] = new
    got = read(bytes(raw), model)
    assert_judged(got, bytes(raw))
    if got.receipt is not None:
        assert got.receipt == model.model_validate(json.loads(bytes(raw)))


@PROPERTY
@given(field=st.sampled_from(["error", "sha256", "baseModelFingerprint", "party", "job"]), value=TEXT)
def test_any_text_in_a_receipt_is_taken_only_as_text_a_status_can_hold(field, value):
    raw = encode(trainer_wire(**{field: value}))
    assert_judged(read(raw), raw)


SECRET_VALUE = st.one_of(
    st.none(),
    JSON,
    st.text(max_size=40),
    st.binary(max_size=200).map(b64),
    JSON.map(lambda doc: b64(encode(doc))),
    st.just(b64(encode(trainer_wire()))),
)


@PROPERTY
@given(receipt=SECRET_VALUE, ticket=SECRET_VALUE, whole=JSON)
def test_any_mailbox_secret_is_read_without_raising(receipt, ticket, whole):
    for body in (secret(receipt, ticket), whole, {"data": whole}):
        for model in (TrainerReceipt, AggregatorReceipt):
            got = read_secret_receipt(body, model, job=UID, party=PARTY)
            assert (got.receipt is None) or (got.rejection is None)
            assert got.rejection is None or got.rejection.isprintable()
        assert held_ticket(body) is None or isinstance(held_ticket(body), TicketRef)
