"""The party trainer answering real tickets through presigned URLs of a real S3 server (SeaweedFS)."""

from __future__ import annotations

import hashlib
import json
import logging
import socket
import threading
import time
import uuid
from datetime import timedelta

import pytest
from fedtune.api.job import ModelSpec
from fedtune.api.mailbox import FileMailbox
from fedtune.api.protocol import Download, TrainerReceipt, TrainerTicket, Upload
from fedtune.api.status import utcnow
from fedtune_trainer.adapters import from_bytes
from fedtune_trainer.models import fingerprint, load_base_model
from fedtune_trainer.party import PartyRuntime, handle, serve
from trainer_helpers import config, keyword_jsonl, tiny_paths

CLS = "sequence-classification"
TTL = 600


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_paths(tmp_path_factory)


class World:
    """One party's bucket with its data under a fresh prefix, and a ticket factory."""

    def __init__(self, s3world, tiny, name="alice", train=None):
        self.bucket = s3world.bucket(name)
        self.job = uuid.uuid4().hex[:12]
        self.cfg = config(tiny[CLS], CLS, local_steps=25, learning_rate=3e-2, batch_size=8)
        self.train_key, self.eval_key = f"{self.job}/data/train.jsonl", f"{self.job}/data/eval.jsonl"
        self.bucket.put_bytes(self.train_key, train or keyword_jsonl(48, seed=1))
        self.bucket.put_bytes(self.eval_key, keyword_jsonl(16, seed=2))

    def key(self, rnd: int, what: str) -> str:
        return f"{self.job}/round-{rnd}/{what}"

    def get(self, key: str) -> Download:
        data = self.bucket.get_bytes(key)
        return Download(url=self.bucket.presign_get(key, TTL), sha256=hashlib.sha256(data).hexdigest())

    def ticket(self, kind: str, rnd: int, global_key: str | None = None, **extra) -> TrainerTicket:
        fields = dict(
            kind=kind,
            job=self.job,
            party="alice",
            round=rnd,
            deadline=utcnow() + timedelta(seconds=TTL),
            config=self.cfg,
            train_data=Download(url=self.bucket.presign_get(self.train_key, TTL)),
            eval_data=Download(url=self.bucket.presign_get(self.eval_key, TTL)),
        )
        if global_key:
            fields["global_in"] = self.get(global_key)
        if kind in ("init", "train"):
            fields["update_out"] = self.bucket.presign_put(self.key(rnd, "update.safetensors"), TTL)
        return TrainerTicket(**{**fields, **extra})


def test_init_train_eval_rounds(s3world, tiny, caplog):
    w, rt = World(s3world, tiny), PartyRuntime()
    config_out = w.bucket.presign_put(f"{w.job}/adapter_config.json", TTL)
    init = handle(w.ticket("init", 0, adapter_config_out=config_out), rt)
    assert init.ok, init.error
    global0 = w.bucket.get_bytes(w.key(0, "update.safetensors"))
    assert init.sha256 == hashlib.sha256(global0).hexdigest() and init.update_bytes == len(global0)
    assert init.base_model_fingerprint == rt.fingerprint and len(rt.fingerprint) == 64
    assert (init.num_samples, init.num_eval_samples) == (48, 16)
    adapter_config = json.loads(w.bucket.get_bytes(f"{w.job}/adapter_config.json"))
    assert adapter_config["peft_type"] == "LORA" and adapter_config["task_type"] == "SEQ_CLS"
    assert init.bytes_up == len(global0) + len(w.bucket.get_bytes(f"{w.job}/adapter_config.json"))

    caplog.set_level(logging.INFO)
    first = handle(w.ticket("train", 1, w.key(0, "update.safetensors")), rt)
    assert first.ok, first.error
    update1 = w.bucket.get_bytes(w.key(1, "update.safetensors"))
    assert first.sha256 == hashlib.sha256(update1).hexdigest() and first.bytes_up == first.update_bytes == len(update1)
    assert first.bytes_down == len(global0), "data was read at init and must come from the cache"
    assert first.num_samples == 48 and first.num_eval_samples == 16
    assert first.metrics.train_loss is not None and first.timings.train_seconds > 0
    assert set(from_bytes(update1)) == set(from_bytes(global0)) and update1 != global0

    # A multipart upload (what the control plane mints for large adapters): this small one fits one part.
    parts = w.bucket.start_multipart(w.key(2, "update.safetensors"), 2, 5 * 1024 * 1024, TTL)
    second = handle(w.ticket("train", 2, w.key(1, "update.safetensors"), update_out=Upload(multipart=parts)), rt)
    assert second.ok, second.error
    assert second.sha256 == hashlib.sha256(w.bucket.get_bytes(w.key(2, "update.safetensors"))).hexdigest()
    # Round 2's eval metrics describe the adapter received (round 1's update): it learnt the task.
    assert second.metrics.eval_loss < first.metrics.eval_loss
    assert second.metrics.eval_accuracy > first.metrics.eval_accuracy

    final = handle(w.ticket("eval", 3, w.key(2, "update.safetensors"), update_out=None), rt)
    assert final.ok and final.bytes_up == 0 and final.metrics.eval_accuracy >= 0.9
    assert final.base_model_fingerprint == init.base_model_fingerprint
    assert "round 1" in caplog.text and "X-Amz" not in caplog.text, "logs must never carry URL signatures"


def test_parties_agree_on_global_zero_and_fingerprint(s3world, tiny):
    answers = []
    for name in ("alice", "bob"):
        w = World(s3world, tiny, name)
        receipt = handle(w.ticket("init", 0), PartyRuntime())
        assert receipt.ok, receipt.error
        answers.append((receipt.sha256, receipt.base_model_fingerprint))
    assert answers[0] == answers[1]


def test_wrong_sha_of_global_is_refused(s3world, tiny):
    w, rt = World(s3world, tiny), PartyRuntime()
    assert handle(w.ticket("init", 0), rt).ok
    ticket = w.ticket("train", 1, w.key(0, "update.safetensors"))
    ticket.global_in = Download(url=ticket.global_in.url, sha256="0" * 64)
    receipt = handle(ticket, rt)
    assert not receipt.ok and "sha256" in receipt.error
    assert "X-Amz" not in receipt.error and "?" not in receipt.error
    assert not w.bucket.exists(w.key(1, "update.safetensors")), "nothing is uploaded after a failure"


def test_a_party_tells_a_storage_failure_from_its_own_in_its_receipt(s3world, tiny, monkeypatch):
    monkeypatch.setattr("fedtune_trainer.transfer.time.sleep", lambda _: None)  # the retries, without the waits
    w, rt = World(s3world, tiny), PartyRuntime()
    assert handle(w.ticket("init", 0), rt).ok
    own = w.ticket("train", 1, w.key(0, "update.safetensors"))
    own.global_in = Download(url=own.global_in.url, sha256="0" * 64)
    mine = handle(own, rt)
    assert not mine.ok and mine.fault == "pod" and not mine.storage_failed
    with socket.socket() as closed:  # a port nothing listens on: the storage is down
        closed.bind(("127.0.0.1", 0))
        down = f"http://127.0.0.1:{closed.getsockname()[1]}/alice-bkt/global.safetensors?X-Amz-Signature=s"
    ticket = w.ticket("train", 1, w.key(0, "update.safetensors"), attempt=1)
    ticket.global_in = Download(url=down, sha256=ticket.global_in.sha256)
    storage = handle(ticket, rt)
    assert not storage.ok and storage.fault == "storage" and storage.storage_failed
    assert "GET failed after 5 attempts" in storage.error and "Signature" not in storage.error


def test_malformed_data_line_is_reported(s3world, tiny):
    bad = keyword_jsonl(3) + b'{"text": "broken", \n'
    w = World(s3world, tiny, train=bad)
    receipt = handle(w.ticket("init", 0), PartyRuntime())
    assert not receipt.ok and "train.jsonl line 4: invalid JSON" in receipt.error


def test_expired_ticket_and_missing_global(s3world, tiny):
    w, rt = World(s3world, tiny), PartyRuntime()
    late = handle(w.ticket("init", 0, deadline=utcnow() - timedelta(seconds=1)), rt)
    assert not late.ok and "deadline" in late.error
    missing = handle(w.ticket("train", 1), rt)
    assert not missing.ok and "globalIn" in missing.error


def _wait_receipt(mailbox: FileMailbox, ticket: TrainerTicket, timeout: float = 60) -> dict:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        receipt = mailbox.read_receipt()
        if receipt and TrainerReceipt.model_validate(receipt).answers(ticket):
            return receipt
        time.sleep(0.05)
    raise AssertionError(f"no receipt for {ticket.ticket_id}")


def test_serve_answers_restarts_and_exits(s3world, tiny, tmp_path):
    w = World(s3world, tiny)
    mailbox = FileMailbox(tmp_path / "mailbox")
    receipt_key = f"{w.job}/round-0/receipt.json"
    init = w.ticket("init", 0, receipt_out=w.bucket.presign_put(receipt_key, TTL))
    mailbox.write_ticket(init.to_wire())
    result: list[int] = []
    server = threading.Thread(target=lambda: result.append(serve(str(mailbox.dir), poll=0.02)), daemon=True)
    server.start()
    answered = _wait_receipt(mailbox, init)
    assert answered["ok"] is True

    bad = {"kind": "train", "job": w.job, "party": "alice", "round": 1, "attempt": 0}
    mailbox.write_ticket(bad)
    start = time.monotonic()
    while (mailbox.read_receipt() or {}).get("round") != 1 and time.monotonic() - start < 30:
        time.sleep(0.02)
    receipt = mailbox.read_receipt()
    assert receipt["ok"] is False and "invalid trainer ticket" in receipt["error"]

    mailbox.write_ticket(w.ticket("exit", 2, train_data=None, eval_data=None).to_wire())
    server.join(timeout=30)
    assert result == [0] and mailbox.read_receipt()["kind"] == "exit"
    # The S3 copy follows the mailbox write (the control plane waits on the mailbox only): by the
    # time the pod took its next ticket, it was there.
    assert json.loads(w.bucket.get_bytes(receipt_key))["sha256"] == answered["sha256"]

    # A restarted pod finding its current ticket already answered does not redo the work.
    mailbox.write_ticket(init.to_wire())
    mailbox.write_receipt(answered)
    restarted = threading.Thread(target=lambda: result.append(serve(str(mailbox.dir), poll=0.02)), daemon=True)
    restarted.start()
    time.sleep(0.5)
    assert mailbox.read_receipt() == answered
    mailbox.write_ticket(w.ticket("exit", 1, train_data=None, eval_data=None).to_wire())
    restarted.join(timeout=30)
    assert result == [0, 0]


def test_runtime_loads_once_and_reloads_when_the_model_changes(tiny):
    rt = PartyRuntime()
    cfg = config(tiny[CLS], CLS)
    assert rt.ensure(cfg) > 0
    model, fp = rt.model, rt.fingerprint
    # Per-round settings (and presigned URLs) do not reload the model.
    assert rt.ensure(cfg.model_copy(update={"training": cfg.training.model_copy(update={"learning_rate": 0.1})})) == 0
    assert rt.model is model
    bigger = cfg.model_copy(update={"peft": cfg.peft.model_copy(update={"config": {"r": 8}})})
    assert rt.ensure(bigger) > 0 and rt.model is not model and rt.fingerprint == fp
    assert any(v.shape[0] == 8 for k, v in rt.initial.items() if "lora_A" in k)


def test_s3_model_source_is_read_through_presigned_urls(s3world, tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("FEDTUNE_CACHE", str(tmp_path / "cache"))
    bucket, prefix = s3world.bucket("hub"), f"models/{uuid.uuid4().hex[:8]}"
    files = {}
    for path in sorted(tiny[CLS].iterdir()):
        bucket.put_bytes(f"{prefix}/{path.name}", path.read_bytes())
        files[path.name] = bucket.presign_get(f"{prefix}/{path.name}", TTL)
    cfg = config(tiny[CLS], CLS)
    remote = ModelSpec(source=f"s3://hub-bkt/{prefix}", task=CLS)
    model, tokenizer = load_base_model(remote, cfg.data, 0, files)
    assert fingerprint(model) == fingerprint(load_base_model(cfg.model, cfg.data, 0)[0])
    assert tokenizer.pad_token == "[PAD]"
    # Cached: a second load needs no URLs that still work.
    load_base_model(remote, cfg.data, 0, {name: "http://127.0.0.1:9/gone" for name in files})
