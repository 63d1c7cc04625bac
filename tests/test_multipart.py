"""Large objects: multipart uploads through presigned part URLs and streamed, hashed downloads.

Against a real SeaweedFS (`s3world`); the only stand-in is a spy on the pods' HTTP layer that
counts requests and, where a test says so, fails one of them.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import uuid
from urllib.parse import parse_qs, urlsplit

import pytest
import urllib3
from fedtune.api.protocol import Multipart, Upload
from fedtune.rounds.intents import (
    MAX_PARTS,
    MULTIPART_THRESHOLD,
    PART_SIZE,
    aggregator_intent,
    build_aggregator_ticket,
    build_trainer_ticket,
    trainer_intents,
    upload_target,
)
from fedtune.storage.s3 import StorageError
from fedtune.storage.signer import BucketSigner
from fedtune_trainer import transfer
from fedtune_trainer.transfer import TransferError
from pydantic import ValidationError
from test_held_out import Signer, party_doc
from test_round_machine import T0, Sim, make_job

MiB = 1024 * 1024
TTL = 600


def _key() -> str:
    return f"test/{uuid.uuid4().hex}/update.safetensors"


class Spy:
    """Wraps the pods' HTTP pool: records (method, part number) per request; `fail` may replace one."""

    def __init__(self, monkeypatch, fail=None):
        self.calls: list[tuple[str, int | None]] = []
        self._real = transfer._HTTP.request
        self._fail = fail
        monkeypatch.setattr(transfer._HTTP, "request", self)

    def __call__(self, method, url, **kw):
        part = parse_qs(urlsplit(url).query).get("partNumber", [None])[0]
        call = (method, int(part) if part else None)
        self.calls.append(call)
        if self._fail is not None:
            failed = self._fail(call, self.calls.count(call), lambda: self._real(method, url, **kw))
            if failed is not None:
                return failed
        return self._real(method, url, **kw)

    def count(self, method: str, part: int | None = None) -> int:
        return sum(1 for m, p in self.calls if m == method and (part is None or p == part))


def test_a_200_mb_update_goes_up_in_parts_and_streams_back_to_disk(s3world, tmp_path, monkeypatch):
    bucket, key = s3world.bucket("alice"), _key()
    data = os.urandom(200 * MiB)
    # Minted as the control plane mints an update's target, sized from the global adapter's size.
    target = upload_target(BucketSigner({"alice": bucket}), "alice", key, TTL, len(data))
    assert target.url is None and target.multipart.part_size == PART_SIZE
    parts = -(-len(data) // PART_SIZE)
    assert len(target.multipart.part_urls) == parts + 1  # one spare
    spy = Spy(monkeypatch)

    digest = transfer.put(target, data, backoff=0.01)
    assert digest == hashlib.sha256(data).hexdigest()
    assert spy.count("PUT") == parts and spy.count("POST") == 1

    path = tmp_path / "update.safetensors"
    del data  # the download below is checked by its hash alone
    assert transfer.get_to_file(bucket.presign_get(key, TTL), path, sha256=digest) == (digest, 200 * MiB)
    assert path.stat().st_size == 200 * MiB and not (tmp_path / "update.safetensors.part").exists()


def _three_parts(s3world) -> tuple[Multipart, bytes, str]:
    bucket, key = s3world.bucket("bob"), _key()
    return bucket.start_multipart(key, 3, 5 * MiB, TTL), os.urandom(11 * MiB), key


def _answer_500(call, seen, send):
    if call == ("PUT", 2) and seen == 1:
        return urllib3.HTTPResponse(body=io.BytesIO(b"<Error><Code>InternalError</Code></Error>"), status=500)
    return None


def _lose_the_answer(call, seen, send):
    if call == ("PUT", 2) and seen == 1:
        send()  # the store has the part; its answer never arrives
        raise urllib3.exceptions.ProtocolError("Connection aborted.", ConnectionResetError(104, "reset by peer"))
    return None


@pytest.mark.parametrize("fail", [_answer_500, _lose_the_answer], ids=["http-500", "connection-lost"])
def test_a_failed_part_is_sent_again_alone_and_the_upload_completes(s3world, monkeypatch, caplog, fail):
    multipart, data, key = _three_parts(s3world)
    spy = Spy(monkeypatch, fail)
    caplog.set_level(logging.WARNING, logger="fedtune_trainer.transfer")

    assert transfer.put(Upload(multipart=multipart), data, backoff=0.01) == hashlib.sha256(data).hexdigest()
    assert [spy.count("PUT", n) for n in (1, 2, 3)] == [1, 2, 1]  # parts 1 and 3 were not re-sent
    assert spy.count("POST") == 1
    assert s3world.bucket("bob").get_bytes(key) == data
    assert "PUT of part 2/3" in caplog.text and "retrying" in caplog.text
    assert "X-Amz-Signature" not in caplog.text and "uploadId=" not in caplog.text


def test_a_refused_part_fails_at_once_naming_the_part_without_its_signature(s3world, monkeypatch):
    multipart, data, _ = _three_parts(s3world)
    url = multipart.part_urls[1]
    at = url.index("X-Amz-Signature=") + len("X-Amz-Signature=")
    multipart.part_urls[1] = url[:at] + ("0" if url[at] != "0" else "1") + url[at + 1 :]
    spy = Spy(monkeypatch)
    with pytest.raises(TransferError) as info:
        transfer.put(Upload(multipart=multipart), data, backoff=0.01)
    msg = str(info.value)
    assert msg.startswith(f"PUT of part 2/3 (upload {multipart.upload_id}) failed: HTTP 403")
    assert "presigned URL was refused" in msg and "X-Amz-Signature" not in msg
    assert spy.count("PUT", 2) == 1 and spy.count("POST") == 0  # a 403 is not retried


def test_no_such_upload_after_a_lost_completion_answer_says_it_may_have_completed(s3world, monkeypatch):
    multipart, data, _ = _three_parts(s3world)

    def lose_then_gone(call, seen, send):
        if call == ("POST", None) and seen == 1:
            send()  # completed; the answer never arrives
            raise urllib3.exceptions.ProtocolError("Connection aborted.", ConnectionResetError(104, "reset by peer"))
        if call == ("POST", None):  # what a store that forgot the completed upload answers
            return urllib3.HTTPResponse(body=io.BytesIO(b"<Error><Code>NoSuchUpload</Code></Error>"), status=404)
        return None

    Spy(monkeypatch, lose_then_gone)
    with pytest.raises(TransferError, match="NoSuchUpload.*the upload may have completed; the round's retry"):
        transfer.put(Upload(multipart=multipart), data, backoff=0.01)


def test_more_data_than_offered_parts_goes_in_larger_parts(s3world, monkeypatch):
    bucket, key = s3world.bucket("carol"), _key()
    multipart = bucket.start_multipart(key, 2, 5 * MiB, TTL)
    data = os.urandom(13 * MiB)  # three 5 MiB parts' worth, two parts offered
    spy = Spy(monkeypatch)
    transfer.put(Upload(multipart=multipart), data)
    assert spy.count("PUT") == 2 and bucket.get_bytes(key) == data


def test_a_new_multipart_upload_aborts_the_unfinished_one(s3world):
    bucket, key = s3world.bucket("alice"), _key()
    stale = bucket.start_multipart(key, 2, 5 * MiB, TTL)
    transfer.put(stale.part_urls[0], os.urandom(5 * MiB))  # half-done when its round was retried
    fresh = bucket.start_multipart(key, 2, 5 * MiB, TTL)
    pending = bucket._client.list_multipart_uploads(Bucket=bucket.name, Prefix=key).get("Uploads", [])
    assert [u["UploadId"] for u in pending] == [fresh.upload_id]
    with pytest.raises(TransferError, match="NoSuchUpload.*aborted because a newer ticket replaced this one"):
        transfer.put(Upload(multipart=stale), os.urandom(6 * MiB))


def test_a_streamed_download_with_the_wrong_sha256_is_refused_and_leaves_nothing(s3world, tmp_path):
    bucket, key = s3world.bucket("hub"), _key()
    bucket.put_bytes(key, b"payload" * 1000)
    path = tmp_path / "obj"
    with pytest.raises(TransferError, match="sha256 mismatch") as info:
        transfer.get_to_file(bucket.presign_get(key, TTL), path, sha256="0" * 64)
    assert "X-Amz-Signature" not in str(info.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("announced", [True, False], ids=["content-length", "streamed"])
def test_a_download_over_its_limit_is_refused_at_once_and_leaves_nothing(s3world, tmp_path, monkeypatch, announced):
    bucket, key = s3world.bucket("carol"), _key()
    bucket.put_bytes(key, os.urandom(3 * MiB))

    def no_length(call, seen, send):  # a chunked answer: the size shows only while streaming
        real = send()
        return urllib3.HTTPResponse(body=real, status=200, preload_content=False)

    spy = Spy(monkeypatch, None if announced else no_length)
    path, url = tmp_path / "obj", bucket.presign_get(key, TTL)
    with pytest.raises(TransferError) as info:
        transfer.get_to_file(url, path, max_bytes=2 * MiB, backoff=0.01)
    assert (
        str(info.value)
        == f"GET of {transfer.redact(url)} refused: the object is larger than the limit of {2 * MiB} bytes"
    )
    assert spy.count("GET") == 1 and list(tmp_path.iterdir()) == []  # not retried; no .part left


def test_a_download_cut_short_starts_again(s3world, tmp_path, monkeypatch):
    bucket, key = s3world.bucket("hub"), _key()
    data = os.urandom(3 * MiB)
    digest = bucket.put_bytes(key, data)

    def cut_short(call, seen, send):  # the first answer promises every byte but breaks off after 1 MiB
        if seen == 1:
            headers = {"content-length": str(len(data))}
            return urllib3.HTTPResponse(body=io.BytesIO(data[:MiB]), headers=headers, status=200, preload_content=False)
        return None

    spy = Spy(monkeypatch, cut_short)
    path = tmp_path / "obj"
    assert transfer.get_to_file(bucket.presign_get(key, TTL), path, sha256=digest, backoff=0.01) == (digest, len(data))
    assert spy.count("GET") == 2 and path.read_bytes() == data


# -- the protocol and the control plane's choice ------------------------------------------


def test_a_single_put_travels_as_the_plain_url_it_always_was():
    assert Upload.model_validate("https://s3/put?sig").to_wire() == "https://s3/put?sig"
    multipart = Multipart(upload_id="u", part_size=5 * MiB, part_urls=["p1"], complete_url="c")
    wire = Upload(multipart=multipart).to_wire()
    assert wire == {"multipart": {"uploadId": "u", "partSize": 5 * MiB, "partUrls": ["p1"], "completeUrl": "c"}}
    assert Upload.model_validate(wire).multipart == multipart
    for both_or_neither in ({"url": "x", "multipart": wire["multipart"]}, {}):
        with pytest.raises(ValidationError, match="either a url or a multipart upload"):
            Upload.model_validate(both_or_neither)


class PartSigner(Signer):
    """The held-out tests' fake signer, which also starts (pretend) multipart uploads."""

    def start_multipart(self, owner, key, parts, part_size, expires_s):
        urls = [f"part{n}:{owner}:{key}" for n in range(1, parts + 1)]
        return Multipart(upload_id="u", part_size=part_size, part_urls=urls, complete_url=f"complete:{owner}:{key}")


def _tickets(adapter_bytes: int | None, strategy: str = "fedavg"):
    """A train ticket of party a and the aggregator's ticket of round 1 for a job whose global 0 has that size."""
    sim = Sim(make_job(n=2))
    sim.job.spec.strategy.name = strategy
    while sim.st.stage != "aggregating":
        sim.step()
    sim.st.adapter_bytes = adapter_bytes
    train_intent = trainer_intents(sim.job, sim.st)["default/a"]
    train = build_trainer_ticket(sim.job, train_intent, party_doc("a"), sim.st, PartSigner(), T0)
    agg = build_aggregator_ticket(sim.job, aggregator_intent(sim.job, sim.st), sim.st, PartSigner(), T0)
    return train, agg


def test_small_or_unknown_adapters_keep_single_puts():
    for size in (None, 1000, MULTIPART_THRESHOLD // 2):  # fedadam's state (m and v) is twice the size
        train, agg = _tickets(size, "fedadam")
        assert train.update_out.url.startswith("put:default/a:")
        assert agg.global_out.url and agg.state_out.url


def test_large_adapters_get_parts_sized_from_the_global_adapter():
    size = 200 * MiB
    train, agg = _tickets(size, "fedadam")
    assert train.update_out.multipart.part_urls[0] == "part1:default/a:fedtune/uid-1/round-1/update.safetensors"
    assert len(train.update_out.multipart.part_urls) == -(-size // PART_SIZE) + 1
    assert len(agg.global_out.multipart.part_urls) == -(-size // PART_SIZE) + 1
    assert len(agg.state_out.multipart.part_urls) == -(-2 * size // PART_SIZE) + 1  # fedadam keeps m and v
    _, stateless = _tickets(size, "fedavg")
    assert stateless.state_out.url is not None  # never used: no multipart upload left hanging


def test_a_multi_gib_adapter_gets_larger_parts_not_more_part_urls():
    signer = RecordingSigner()
    # Each part URL takes ~1 KB of a 1 MiB mailbox Secret; FedAdam's state of a 4 GiB adapter is 8 GiB.
    for gib in (4, 8, 40, 1000):
        size = gib * 1024 * MiB + 12345
        target = upload_target(signer, "alice", "k", TTL, size)
        (parts, part_size) = signer.started[-1]
        assert len(target.multipart.part_urls) == parts <= MAX_PARTS + 1
        assert part_size % MiB == 0 and PART_SIZE <= part_size <= 5 * 1024 * MiB  # S3's largest part
        assert (parts - 1) * part_size >= size  # the spare part is still spare
    upload_target(signer, "alice", "k", TTL, 200 * MiB)
    assert signer.started[-1] == (-(-200 * MiB // PART_SIZE) + 1, PART_SIZE)  # smaller ones keep 16 MiB parts


class RecordingSigner(PartSigner):
    """Records (parts, part size) of every multipart upload started."""

    def __init__(self):
        self.started: list[tuple[int, int]] = []

    def start_multipart(self, owner, key, parts, part_size, expires_s):
        self.started.append((parts, part_size))
        return super().start_multipart(owner, key, parts, part_size, expires_s)


class UnreachableStoreSigner(PartSigner):
    def start_multipart(self, owner, key, parts, part_size, expires_s):
        raise StorageError("cannot start a multipart upload of k in bucket b at http://s3: endpoint unreachable")


def test_a_store_that_cannot_start_a_multipart_upload_gets_a_single_put(caplog):
    caplog.set_level(logging.WARNING, logger="fedtune.rounds.intents")
    target = upload_target(UnreachableStoreSigner(), "default/a", "k", TTL, 200 * MiB)
    assert target.multipart is None and target.url == "put:default/a:k"
    assert "falling back to a single PUT for k: cannot start a multipart upload" in caplog.text
    # Ticket building (the operator's reconcile, local mode's runner) goes on with single PUTs.
    sim = Sim(make_job(n=2))
    while sim.st.stage != "aggregating":
        sim.step()
    sim.st.adapter_bytes = 200 * MiB
    train = build_trainer_ticket(
        sim.job, trainer_intents(sim.job, sim.st)["default/a"], party_doc("a"), sim.st, UnreachableStoreSigner(), T0
    )
    agg = build_aggregator_ticket(sim.job, aggregator_intent(sim.job, sim.st), sim.st, UnreachableStoreSigner(), T0)
    assert train.update_out.url and agg.global_out.url


def test_the_init_receipt_tells_the_control_plane_the_adapter_size():
    sim = Sim(make_job(n=2))
    while sim.st.stage == "init":
        sim.step()
    assert sim.st.adapter_bytes == 90  # the size the simulated lead party reported for global 0
