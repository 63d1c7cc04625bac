"""The aggregator against a real S3 (SeaweedFS, `s3world` fixture) and a file mailbox."""

from __future__ import annotations

import hashlib
import json
import socket
import threading
import time
import uuid
from datetime import timedelta

import numpy as np
import pytest
import torch
from fedtune.api.mailbox import FileMailbox
from fedtune.api.protocol import AggregatorReceipt, AggregatorTicket, Download, UpdateIn
from fedtune.api.robust import RobustSpec
from fedtune.api.secagg import ObjectIn, PublicKeys, SecureAggregation
from fedtune.api.status import utcnow
from fedtune.storage.s3 import StorageError
from fedtune_trainer import secagg, secure_vectors
from fedtune_trainer.aggregator import handle, serve, update_limit
from fedtune_trainer.compression import encode
from fedtune_trainer.strategies import aggregate_round, make_strategy
from fedtune_trainer.verify import load_verified
from safetensors.numpy import save as save_numpy
from safetensors.torch import load, save

EXPIRY = 600
W, BIAS = "base_model.model.classifier.weight", "base_model.model.classifier.bias"
GLOBAL0 = {W: torch.tensor([[0.0, 0.0]]), BIAS: torch.tensor([1.0])}


class Round:
    """Objects of one aggregation round laid out as the operator would, with presigned URLs."""

    def __init__(self, s3world, job: str, rnd: int):
        self.s3, self.job, self.rnd = s3world, job, rnd
        self.hub = s3world.bucket("hub")
        self.updates: list[UpdateIn] = []

    def key(self, name: str) -> str:
        return f"fedtune/{self.job}/{name}"

    def put_global(self, tensors) -> Download:
        key = self.key(f"global/{self.rnd - 1}.safetensors")
        sha = self.hub.put_bytes(key, save(tensors))
        return Download(url=self.hub.presign_get(key, EXPIRY), sha256=sha)

    def add_update(
        self,
        party: str,
        tensors,
        num_samples: int,
        claimed_sha: str | None = None,
        data: bytes | None = None,
        store: str | None = None,
    ) -> None:
        """`store`: the S3 identity holding the update, when `party` has none of its own (e.g. "hub")."""
        bucket = self.s3.bucket(store or party)
        key = self.key(f"round-{self.rnd}/update.safetensors")
        sha = bucket.put_bytes(key, save(tensors) if data is None else data)
        url = bucket.presign_get(key, EXPIRY)
        self.updates.append(UpdateIn(party=party, url=url, sha256=claimed_sha or sha, num_samples=num_samples))

    def ticket(self, global_in: Download, **kw) -> AggregatorTicket:
        out = self.key(f"global/{self.rnd}.safetensors")
        fields = dict(
            kind="aggregate",
            job=self.job,
            round=self.rnd,
            deadline=utcnow() + timedelta(minutes=10),
            global_in=global_in,
            updates=self.updates,
            global_out=self.hub.presign_put(out, EXPIRY),
        )
        fields.update(kw)
        return AggregatorTicket(**fields)

    def new_global(self) -> dict[str, torch.Tensor]:
        return load(self.hub.get_bytes(self.key(f"global/{self.rnd}.safetensors")))


def job_id() -> str:
    return f"test-{uuid.uuid4().hex[:8]}"


def upd(w0: float, w1: float, bias: float) -> dict[str, torch.Tensor]:
    return {W: torch.tensor([[w0, w1]]), BIAS: torch.tensor([bias])}


def test_three_good_updates_give_fedavg(s3world):
    rnd = Round(s3world, job_id(), 1)
    rnd.add_update("alice", upd(1.0, 2.0, 0.0), 1)
    rnd.add_update("bob", upd(3.0, 6.0, 4.0), 2)
    rnd.add_update("carol", upd(6.0, 0.0, 4.0), 1)
    receipt = handle(rnd.ticket(rnd.put_global(GLOBAL0), min_updates=3))

    assert receipt.ok, receipt.error
    assert receipt.accepted == ["alice", "bob", "carol"] and receipt.rejected == {}
    # weights 1:2:1 → w = [(1 + 6 + 6)/4, (2 + 12 + 0)/4] = [3.25, 3.5]; bias = (0 + 8 + 4)/4 = 3
    new = rnd.new_global()
    torch.testing.assert_close(new[W], torch.tensor([[3.25, 3.5]]))
    torch.testing.assert_close(new[BIAS], torch.tensor([3.0]))
    raw = rnd.hub.get_bytes(rnd.key("global/1.safetensors"))
    assert receipt.sha256 == hashlib.sha256(raw).hexdigest() and receipt.bytes_up == len(raw)
    assert receipt.bytes_down > 0 and receipt.duration_seconds > 0 and receipt.finished_at is not None
    assert receipt.lora_residual is None and receipt.state_sha256 is None


def test_a_robust_rule_in_the_ticket_outvotes_an_attacker_read_from_s3(s3world):
    rnd = Round(s3world, job_id(), 1)
    rnd.add_update("alice", upd(1.0, 2.0, 0.0), 1)
    rnd.add_update("bob", upd(3.0, 6.0, 4.0), 1)
    rnd.add_update("carol", upd(6.0, 0.0, 4.0), 1)
    rnd.add_update("mallory", upd(1e30, -1e30, 1e30), 1000, store="hub")  # finite: verification lets it through
    receipt = handle(rnd.ticket(rnd.put_global(GLOBAL0), min_updates=4, robust=RobustSpec(rule="median")))

    assert receipt.ok, receipt.error
    assert receipt.accepted == ["alice", "bob", "carol", "mallory"]
    # per coordinate, the mean of the middle two: w = [(3 + 6)/2, (0 + 2)/2] = [4.5, 1.0]; bias = 4
    new = rnd.new_global()
    torch.testing.assert_close(new[W], torch.tensor([[4.5, 1.0]]))
    torch.testing.assert_close(new[BIAS], torch.tensor([4.0]))


def test_too_few_updates_for_krum_fail_the_round_with_the_reason(s3world):
    rnd = Round(s3world, job_id(), 1)
    for party in ("alice", "bob", "carol"):
        rnd.add_update(party, upd(1.0, 2.0, 0.0), 1)
    receipt = handle(rnd.ticket(rnd.put_global(GLOBAL0), min_updates=2, robust=RobustSpec(rule="krum")))

    assert not receipt.ok and receipt.sha256 is None
    assert receipt.error.startswith("aggregator.robust: krum with byzantine 1 needs more than 2*1+2 = 4 updates")
    assert "a round may have 3" in receipt.error


def test_nan_update_is_rejected_and_round_goes_on_with_quorum(s3world):
    rnd = Round(s3world, job_id(), 1)
    rnd.add_update("alice", upd(1.0, 2.0, 0.0), 1)
    rnd.add_update("bob", upd(3.0, 6.0, 4.0), 3)
    rnd.add_update("carol", upd(float("nan"), 0.0, 4.0), 100)
    receipt = handle(rnd.ticket(rnd.put_global(GLOBAL0), min_updates=2))

    assert receipt.ok, receipt.error
    assert receipt.accepted == ["alice", "bob"]
    assert receipt.rejected == {"carol": f"update from carol: tensor {W} holds 1 NaN value(s)"}
    # weights 1:3 → w = [(1 + 9)/4, (2 + 18)/4] = [2.5, 5.0]; bias = 12/4 = 3
    torch.testing.assert_close(rnd.new_global()[W], torch.tensor([[2.5, 5.0]]))


def test_below_quorum_fails_the_round_and_uploads_nothing(s3world):
    rnd = Round(s3world, job_id(), 1)
    rnd.add_update("alice", upd(1.0, 2.0, 0.0), 1)
    rnd.add_update("bob", {W: torch.zeros(2, 2), BIAS: torch.zeros(1)}, 1)  # wrong shape
    rnd.add_update("carol", upd(1.0, 1.0, 1.0), 1, claimed_sha="0" * 64)  # not what was uploaded
    receipt = handle(rnd.ticket(rnd.put_global(GLOBAL0), min_updates=2))

    assert not receipt.ok
    assert receipt.error.startswith("quorum not reached: 1 of 3 update(s) usable, at least 2 needed; rejected: ")
    assert "expected (1, 2)" in receipt.rejected["bob"]
    assert receipt.rejected["carol"].startswith("update from carol: sha256 mismatch")
    assert receipt.sha256 is None
    with pytest.raises(StorageError, match="no object"):  # nothing was uploaded
        rnd.new_global()


def test_an_update_far_larger_than_the_global_adapter_is_rejected_and_round_goes_on(s3world):
    rnd = Round(s3world, job_id(), 1)
    rnd.add_update("alice", upd(1.0, 2.0, 0.0), 1)
    rnd.add_update("bob", upd(3.0, 6.0, 4.0), 1)
    rnd.add_update("carol", {}, 1, data=b"\0" * (2 * 1024 * 1024))  # would fill the aggregator's disk
    global_in = rnd.put_global(GLOBAL0)
    receipt = handle(rnd.ticket(global_in, min_updates=2))

    assert receipt.ok, receipt.error
    assert receipt.accepted == ["alice", "bob"]
    limit = update_limit(len(save(GLOBAL0)))
    assert receipt.rejected["carol"].startswith("update from carol: GET of http")
    assert receipt.rejected["carol"].endswith(f"refused: the object is larger than the limit of {limit} bytes")
    assert "X-Amz-Signature" not in receipt.rejected["carol"]


def test_unreachable_update_is_rejected_not_fatal(s3world):
    rnd = Round(s3world, job_id(), 1)
    rnd.add_update("alice", upd(1.0, 2.0, 0.0), 1)
    hub = s3world.bucket("hub")
    missing = hub.presign_get(rnd.key("round-1/never-uploaded.safetensors"), EXPIRY)
    rnd.updates.append(UpdateIn(party="bob", url=missing, sha256="0" * 64, num_samples=1))
    receipt = handle(rnd.ticket(rnd.put_global(GLOBAL0)))
    assert receipt.ok and receipt.accepted == ["alice"]
    assert receipt.rejected["bob"].startswith("update from bob: GET failed: HTTP 404")
    assert "X-Amz-Signature" not in receipt.rejected["bob"]  # URLs are redacted


def test_an_update_the_storage_cannot_serve_fails_the_round_as_the_storages_not_the_partys(s3world, monkeypatch):
    monkeypatch.setattr("fedtune_trainer.transfer.time.sleep", lambda _: None)  # the retries, without the waits
    rnd = Round(s3world, job_id(), 1)
    rnd.add_update("alice", upd(1.0, 2.0, 0.0), 1)
    with socket.socket() as closed:  # a port nothing listens on: an S3 endpoint that is down
        closed.bind(("127.0.0.1", 0))
        gone = f"http://127.0.0.1:{closed.getsockname()[1]}/bob-bkt/update.safetensors?X-Amz-Signature=s"
    rnd.updates.append(UpdateIn(party="bob", url=gone, sha256="0" * 64, num_samples=1))
    receipt = handle(rnd.ticket(rnd.put_global(GLOBAL0)))
    assert not receipt.ok and receipt.fault == "storage" and receipt.storage_failed
    assert "GET failed after 5 attempts" in receipt.error and "127.0.0.1" in receipt.error
    assert "bob" not in receipt.rejected  # bob is not blamed for the storage


def test_server_state_round_trips_between_rounds(s3world):
    """Two fedadam rounds, each a fresh handle() (as after a restart): only S3 carries the moments."""
    job, params = job_id(), {"serverLearningRate": 0.5}
    g0 = {W: torch.tensor([[1.0, -1.0]]), BIAS: torch.tensor([0.5])}
    targets = [upd(2.0, 0.0, 0.0), upd(2.5, 0.5, -0.5)]
    in_memory = make_strategy("fedadam", params)  # one optimiser kept alive across both rounds
    expected = [in_memory.aggregate(g0, targets[0])]
    expected.append(in_memory.aggregate(expected[0], targets[1]))

    first = Round(s3world, job, 1)
    first.add_update("alice", targets[0], 5)
    state_key = first.key("global/1.state.safetensors")
    r1 = handle(
        first.ticket(
            first.put_global(g0),
            strategy="fedadam",
            strategy_params=params,
            state_out=first.hub.presign_put(state_key, EXPIRY),
        )
    )
    assert r1.ok, r1.error
    assert r1.state_sha256 == hashlib.sha256(first.hub.get_bytes(state_key)).hexdigest()

    second = Round(s3world, job, 2)
    second.add_update("alice", targets[1], 5)
    global1 = Download(url=first.hub.presign_get(first.key("global/1.safetensors"), EXPIRY), sha256=r1.sha256)
    state1 = Download(url=first.hub.presign_get(state_key, EXPIRY), sha256=r1.state_sha256)
    r2 = handle(
        second.ticket(
            global1,
            strategy="fedadam",
            strategy_params=params,
            state_in=state1,
            state_out=second.hub.presign_put(second.key("global/2.state.safetensors"), EXPIRY),
        )
    )
    assert r2.ok, r2.error

    for got, want in zip((first.new_global(), second.new_global()), expected):
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=0, atol=0)
    # The second step really depended on the stored moments: a fresh optimiser lands elsewhere.
    amnesiac = make_strategy("fedadam", params).aggregate(expected[0], targets[1])
    assert not torch.allclose(amnesiac[W], expected[1][W])


def test_exact_lora_round_reports_residual(s3world):
    a, b = "m.q.lora_A.weight", "m.q.lora_B.weight"
    g = torch.Generator().manual_seed(0)
    rnd = Round(s3world, job_id(), 1)
    for party in ("alice", "bob", "carol"):
        rnd.add_update(party, {a: torch.randn(1, 3, generator=g), b: torch.randn(3, 1, generator=g)}, 1)
    g0 = {a: torch.zeros(1, 3), b: torch.zeros(3, 1)}
    receipt = handle(rnd.ticket(rnd.put_global(g0), lora_mode="exact"))
    assert receipt.ok, receipt.error
    assert 0 < receipt.lora_residual < 1  # rank-3 mean of products squeezed into rank 1


@pytest.mark.parametrize("lora_mode", ["average", "exact"])
def test_updates_read_from_disk_give_the_in_memory_result(s3world, lora_mode):
    """Plain, bf16 and int8 updates, each read a tensor at a time from its downloaded file, aggregate
    to exactly what the strategies give on the same updates held in memory."""
    a, b = "m.q.lora_A.weight", "m.q.lora_B.weight"
    g = torch.Generator().manual_seed(3)
    g0 = {a: torch.randn(4, 16, generator=g), b: torch.zeros(8, 4), BIAS: torch.zeros(1)}
    rnd, encoded, weights = Round(s3world, job_id(), 1), [], [3, 1, 2]
    for party, mode, n in zip(("alice", "bob", "carol"), ("none", "bf16", "int8"), weights):
        tensors = {k: v + torch.randn(v.shape, generator=g) for k, v in g0.items()}
        encoded.append(encode(tensors, mode))
        rnd.add_update(party, tensors, n, data=encoded[-1])
    params = {"momentum": 0.5}  # a server step that reads the previous global, tensor by tensor
    receipt = handle(rnd.ticket(rnd.put_global(g0), lora_mode=lora_mode, strategy="fedavgm", strategy_params=params))
    assert receipt.ok and receipt.accepted == ["alice", "bob", "carol"], receipt.error

    in_memory = [load_verified(data, None, g0) for data in encoded]
    expected, residual = aggregate_round(g0, in_memory, weights, make_strategy("fedavgm", params), lora_mode)
    got = rnd.new_global()
    assert set(got) == set(expected) and receipt.lora_residual == residual
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0)


def test_failures_become_receipts(s3world):
    rnd = Round(s3world, job_id(), 1)
    global_in = rnd.put_global(GLOBAL0)
    bad_strategy = handle(rnd.ticket(global_in, strategy="fedsgd"))
    assert not bad_strategy.ok and "unknown strategy 'fedsgd'" in bad_strategy.error
    tampered = handle(rnd.ticket(Download(url=global_in.url, sha256="f" * 64)))
    assert not tampered.ok and tampered.error.startswith("global adapter (globalIn): sha256 mismatch")


# -- serve(): the mailbox loop (no S3 needed) ----------------------------------------------


def raw_ticket(kind: str, rnd: int, **kw) -> dict:
    return {
        "kind": kind,
        "job": "j1",
        "round": rnd,
        "attempt": 0,
        "deadline": (utcnow() + timedelta(minutes=5)).isoformat(),
        **kw,
    }


def wait_receipt(box: FileMailbox, rnd: int, kind: str = "aggregate", timeout: float = 10.0) -> dict:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        receipt = box.read_receipt()
        if receipt and receipt.get("round") == rnd and receipt.get("kind") == kind:
            return receipt
        time.sleep(0.02)
    raise AssertionError(f"no {kind} receipt for round {rnd}; mailbox holds {box.read_receipt()}")


def start(box: FileMailbox) -> tuple[threading.Thread, list[int]]:
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(serve(str(box.dir), poll=0.01)), daemon=True)
    thread.start()
    return thread, result


def test_serve_answers_each_ticket_and_exits(tmp_path):
    box = FileMailbox(tmp_path / "mb")
    box.write_ticket(raw_ticket("aggregate", 1, strategy="fedsgd"))
    thread, result = start(box)
    first = wait_receipt(box, 1)
    assert first["ok"] is False and "unknown strategy 'fedsgd'" in first["error"]
    assert AggregatorReceipt.model_validate(first).job == "j1"

    box.write_ticket({"kind": "aggregate", "job": "j1", "round": 2})  # no deadline: invalid ticket
    second = wait_receipt(box, 2)
    assert second["ok"] is False and second["error"].startswith("invalid aggregator ticket: deadline")

    box.write_ticket({"kind": "exit", "job": "j1", "round": 3})
    thread.join(timeout=10)
    assert result == [0]
    assert wait_receipt(box, 3, kind="exit")["ok"] is True


def test_serve_skips_a_ticket_answered_before_a_restart(tmp_path):
    box = FileMailbox(tmp_path / "mb")
    box.write_ticket(raw_ticket("aggregate", 4, strategy="fedsgd"))
    earlier = {"kind": "aggregate", "job": "j1", "round": 4, "attempt": 0, "ok": True, "sha256": "abc"}
    box.write_receipt(earlier)
    thread, result = start(box)
    time.sleep(0.3)  # many polls: a handled ticket would have replaced the receipt by now
    assert box.read_receipt() == earlier
    box.write_ticket(raw_ticket("exit", 5))
    thread.join(timeout=10)
    assert result == [0]


def test_serve_writes_the_receipt_copy_to_s3(s3world, tmp_path):
    rnd = Round(s3world, job_id(), 1)
    rnd.add_update("alice", upd(1.0, 1.0, 1.0), 1)
    receipt_key = rnd.key("global/1.json")
    ticket = rnd.ticket(rnd.put_global(GLOBAL0), receipt_out=rnd.hub.presign_put(receipt_key, EXPIRY))
    box = FileMailbox(tmp_path / "mb")
    box.write_ticket(ticket.to_wire())
    thread, result = start(box)
    local = wait_receipt(box, 1)
    assert local["ok"] is True
    box.write_ticket(raw_ticket("exit", 2))
    thread.join(timeout=10)
    assert result == [0]
    # The S3 copy follows the mailbox write; the pod made it before it took the exit ticket.
    assert json.loads(rnd.hub.get_bytes(receipt_key)) == local


SECURE_PARTIES = ["alice", "bob", "carol"]


def secure_ticket(s3world, bad: tuple[str, bytes | None, str | None] | None = None) -> tuple[Round, AggregatorTicket]:
    """A real secure round of alice, bob and carol (t=2, all survive and reveal), as the aggregator receives it.

    `bad`: (party, bytes it uploads instead of its masked update or None, sha256 its receipt claims or None).
    """
    rnd = Round(s3world, job_id(), 1)
    ctx = secagg.Context(job=rnd.job, round=1, attempt=0)
    keys = {p: secagg.PartyKeys.generate() for p in SECURE_PARTIES}
    roster = {p: keys[p].public() for p in SECURE_PARTIES}
    dealt = {p: secagg.deal(ctx, p, keys[p], roster, 2) for p in SECURE_PARTIES}
    objects = {p: obj for p, (obj, _) in dealt.items()}
    held = {p: secagg.open_shares(ctx, p, keys[p], roster, objects) for p in SECURE_PARTIES}
    trained = dict(zip(SECURE_PARTIES, [upd(1.0, 2.0, 0.0), upd(3.0, 6.0, 4.0), upd(6.0, 0.0, 4.0)]))

    def small(name: str, data: bytes) -> ObjectIn:
        key = rnd.key(f"round-1/{name}")
        return ObjectIn(url=rnd.hub.presign_get(key, EXPIRY), sha256=rnd.hub.put_bytes(key, data))

    for p in SECURE_PARTIES:
        vector = secagg.quantise(secure_vectors.delta_vector(GLOBAL0, trained[p]), 1.0, len(SECURE_PARTIES))
        data = secure_vectors.to_bytes(secagg.mask(ctx, p, keys[p], dealt[p][1], roster, vector))
        claimed = None
        if bad is not None and bad[0] == p:
            data, claimed = bad[1] if bad[1] is not None else data, bad[2]
        rnd.add_update(p, None, 1, claimed_sha=claimed, data=data)
    secure = SecureAggregation(
        threshold=2,
        roster={p: PublicKeys(**roster[p].to_dict()) for p in SECURE_PARTIES},
        shares_in={p: small(f"shares-{p}", objects[p]) for p in SECURE_PARTIES},
        reveals_in={
            p: small(f"reveal-{p}", secagg.reveal(ctx, p, held[p], SECURE_PARTIES, [], 2)) for p in SECURE_PARTIES
        },
    )
    return rnd, rnd.ticket(rnd.put_global(GLOBAL0), secure=secure)


def test_a_secure_round_of_well_formed_masked_updates_gives_their_mean(s3world):
    rnd, ticket = secure_ticket(s3world)
    receipt = handle(ticket)
    assert receipt.ok, receipt.error
    assert receipt.accepted == SECURE_PARTIES and receipt.rejected == {}
    new = rnd.new_global()
    torch.testing.assert_close(new[W], torch.tensor([[10 / 3, 8 / 3]]), atol=1e-5, rtol=0)
    torch.testing.assert_close(new[BIAS], torch.tensor([8 / 3]), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("upload", "claimed", "words"),
    [
        (save_numpy({secure_vectors.MASKED: np.zeros(3, np.float32)}), None, "one uint64 tensor"),
        (save_numpy({secure_vectors.MASKED: np.zeros(4, np.uint64)}), None, "of 3 values"),
        (b"not a safetensors file", None, "not a safetensors file"),
        (None, "0" * 64, "sha256"),  # not the object its receipt named
    ],
    ids=["dtype", "length", "unparsable", "sha256"],
)
def test_a_malformed_masked_update_fails_the_round_naming_its_party_as_rejected(s3world, upload, claimed, words):
    """The sum needs every survivor's masked vector: the round fails, and the party is named so the control
    plane counts it against that party (not against the round's other parties)."""
    rnd, ticket = secure_ticket(s3world, bad=("bob", upload, claimed))
    receipt = handle(ticket)
    assert not receipt.ok and receipt.accepted == []
    assert list(receipt.rejected) == ["bob"], receipt.rejected
    assert "bob" in receipt.rejected["bob"] and words in receipt.rejected["bob"], receipt.rejected
    assert "bob" in receipt.error and receipt.fault == "pod" and receipt.sha256 is None
    with pytest.raises(StorageError, match="no object"):  # nothing was uploaded
        rnd.new_global()
