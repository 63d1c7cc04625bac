"""Operator-side S3 access with credentials (boto3, synchronous).

Only the operator holds credentials; pods get presigned URLs minted here, one per object.
Async callers wrap these calls in `asyncio.to_thread`. Every failure surfaces as a
`StorageError` whose text names the bucket, the endpoint and what to do about it.
Credentials never appear in a repr, a log line or an error message.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import string
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
from botocore.exceptions import ConnectionError as BotoConnectionError

from fedtune.api.party import StorageSpec
from fedtune.api.protocol import Multipart

log = logging.getLogger(__name__)

MIN_EXPIRY_S = 1
MAX_EXPIRY_S = 7 * 24 * 3600  # SigV4 refuses presigned URLs valid for longer than a week
_T = TypeVar("_T")


@dataclass(frozen=True)
class S3Credentials:
    """An S3 access key pair. Its repr shows the key id only, never the secret."""

    access_key_id: str
    secret_access_key: str = field(repr=False)

    @classmethod
    def generate(cls) -> S3Credentials:
        """Random credentials for local mode (AWS-shaped: 20-char key id, 40-char secret)."""
        upper = string.ascii_uppercase + string.digits
        alnum = string.ascii_letters + string.digits
        key_id = "FT" + "".join(secrets.choice(upper) for _ in range(18))
        secret = "".join(secrets.choice(alnum) for _ in range(40))
        return cls(key_id, secret)

    def __repr__(self) -> str:
        return f"S3Credentials(access_key_id={self.access_key_id!r}, secret_access_key='***')"

    __str__ = __repr__


class StorageError(RuntimeError):
    """An object-store operation that failed; `str()` names the bucket, endpoint and the fix."""


def clamp_expiry(expires_s: float) -> int:
    """Presign lifetime bounded to what SigV4 accepts: [1 s, 7 days]."""
    return int(min(max(int(expires_s), MIN_EXPIRY_S), MAX_EXPIRY_S))


_CONFIG = Config(
    signature_version="s3v4",
    s3={"addressing_style": "path"},
    # A few quick retries for transient faults; a dead endpoint must not hang a reconcile.
    retries={"max_attempts": 3, "mode": "standard"},
    connect_timeout=5,
    read_timeout=60,
    # Newer botocore adds CRC checksums by default, which several S3-compatible
    # servers (older MinIO, Ceph, …) reject; only send them where the API demands.
    request_checksum_calculation="when_required",
    response_checksum_validation="when_required",
)
# Server-side copies: CopyObject up to its 5 GiB limit, parts of 1 GiB (UploadPartCopy) above it.
_COPY_CONFIG = TransferConfig(multipart_threshold=5 * 1024**3, multipart_chunksize=1024**3)


class _ClientCache:
    """S3 clients shared per (endpoint, region, credentials), least recently used dropped first.

    The operator reconciles every job on each child event and needs a client per party each time.
    A fresh boto3 session per client costs ~0.1-0.5 s of CPU and ~10 MiB (it loads its own copy of
    the service model), which made the operator's time and memory grow with events × parties.
    Clients are thread-safe; the one session that builds them is not, hence the lock. A rotated
    secret is a new key (its sha256, so the cache holds no second copy of the secret).
    """

    def __init__(self, size: int = 128):
        self.size = size
        self._lock = threading.Lock()
        self._session: boto3.session.Session | None = None
        self._clients: OrderedDict[tuple[str | None, str, str, str], Any] = OrderedDict()

    def get(self, endpoint: str | None, region: str, creds: S3Credentials) -> Any:
        key = (endpoint, region, creds.access_key_id, hashlib.sha256(creds.secret_access_key.encode()).hexdigest())
        with self._lock:
            client = self._clients.get(key)
            if client is None:
                if self._session is None:
                    self._session = boto3.session.Session()
                # Explicit credentials: ambient AWS profiles and environment keys are never used.
                client = self._session.client(
                    "s3",
                    endpoint_url=endpoint,
                    region_name=region,
                    aws_access_key_id=creds.access_key_id,
                    aws_secret_access_key=creds.secret_access_key,
                    config=_CONFIG,
                )
                self._clients[key] = client
                while len(self._clients) > self.size:
                    self._clients.popitem(last=False)  # buckets still holding it keep it alive
            self._clients.move_to_end(key)
            return client


_clients = _ClientCache()


class Bucket:
    """One bucket reached with one set of credentials (cheap: clients are shared per credentials)."""

    def __init__(self, storage: StorageSpec, creds: S3Credentials):
        self.name: str = storage.bucket
        self.endpoint: str | None = storage.endpoint or None
        self.region: str = storage.region
        self._client = _clients.get(self.endpoint, self.region, creds)

    def __repr__(self) -> str:
        return f"Bucket({self.name!r}, endpoint={self._where()!r})"

    def _where(self) -> str:
        return self.endpoint or f"AWS S3 ({self.region})"

    # -- error mapping -------------------------------------------------------------------

    def _error(self, exc: Exception, action: str, key: str | None = None) -> StorageError:
        """Turn a botocore failure into a message a user can act on."""
        where = f"bucket {self.name!r} at {self._where()}"
        what = f"{action} {key!r} in {where}" if key else f"{action} {where}"
        if isinstance(exc, ClientError):
            err = exc.response.get("Error", {})
            code = str(err.get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("NoSuchBucket",) or (code in ("404", "NotFound") and key is None):
                hint = (
                    f"bucket {self.name!r} does not exist; create it, or fix spec.storage.bucket "
                    "(local mode creates buckets itself)"
                )
            elif code in ("NoSuchKey", "404", "NotFound"):
                hint = f"no object {key!r}; check that the step that writes it has run"
            elif code == "InvalidAccessKeyId":
                hint = "the access key id is unknown to this endpoint; fix the credentials Secret (accessKeyId)"
            elif code == "SignatureDoesNotMatch":
                hint = "the secret access key is wrong for this access key id; fix the credentials Secret"
            elif code in ("AccessDenied", "403", "Forbidden") or status == 403:
                hint = (
                    f"access denied: these credentials are not granted on bucket {self.name!r} "
                    "(or the bucket does not exist and they may not see it); grant read/write/list "
                    "on it to this key, or fix spec.storage.bucket / the credentials Secret"
                )
            else:
                hint = f"the object store answered {code or status}: {err.get('Message', '')}".rstrip(": ")
            return StorageError(f"cannot {what}: {hint}")
        if isinstance(exc, BotoConnectionError):
            return StorageError(
                f"cannot {what}: the endpoint is unreachable ({type(exc).__name__}); check "
                "spec.storage.endpoint and that the S3 server is running and reachable from the operator"
            )
        return StorageError(f"cannot {what}: {type(exc).__name__}: {exc}")

    def _call(self, action: str, key: str | None, fn: Callable[[], _T]) -> _T:
        try:
            return fn()
        except (ClientError, BotoCoreError) as exc:
            raise self._error(exc, action, key) from None

    def _probe_code(self) -> str:
        """HEAD answers carry no error body; a GET tells a wrong secret from a missing grant."""
        try:
            self._client.list_objects_v2(Bucket=self.name, MaxKeys=1)
        except ClientError as exc:
            return str(exc.response.get("Error", {}).get("Code", ""))
        except BotoCoreError:
            return ""
        return ""

    # -- operations ----------------------------------------------------------------------

    def ensure(self, create: bool = True) -> None:
        """Check the bucket is reachable with these credentials; create it if missing and allowed."""
        try:
            self._client.head_bucket(Bucket=self.name)
            return
        except ClientError as exc:
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if status == 403:
                code = self._probe_code() or "AccessDenied"
                exc.response.setdefault("Error", {})["Code"] = code
                raise self._error(exc, "access") from None
            if status != 404:
                raise self._error(exc, "access") from None
        except BotoCoreError as exc:
            raise self._error(exc, "access") from None
        if not create:
            raise StorageError(
                f"bucket {self.name!r} does not exist at {self._where()}: create it "
                "(or let fedtune create it), or fix spec.storage.bucket"
            )
        log.info("creating bucket %s at %s", self.name, self._where())
        kwargs: dict = {"Bucket": self.name}
        if self.endpoint is None and self.region != "us-east-1":
            # AWS wants the region spelled out everywhere except its default one.
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": self.region}
        try:
            self._client.create_bucket(**kwargs)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in ("BucketAlreadyOwnedByYou",):
                raise self._error(exc, "create") from None
        except BotoCoreError as exc:
            raise self._error(exc, "create") from None

    def presign_get(self, key: str, expires_s: int) -> str:
        """A URL that lets its holder GET exactly this object until it expires."""
        return self._presign("get_object", key, expires_s)

    def presign_put(self, key: str, expires_s: int) -> str:
        """A URL that lets its holder PUT exactly this object until it expires."""
        return self._presign("put_object", key, expires_s)

    def _presign(self, op: str, key: str, expires_s: int, **params: Any) -> str:
        # Signing is local: nothing is sent, so only malformed input can fail here.
        return self._call(
            "presign",
            key,
            lambda: self._client.generate_presigned_url(
                op, Params={"Bucket": self.name, "Key": key, **params}, ExpiresIn=clamp_expiry(expires_s)
            ),
        )

    def start_multipart(self, key: str, parts: int, part_size: int, expires_s: int) -> Multipart:
        """Start a multipart upload of `key` and presign its `parts` part URLs and its completion.

        Uploads of `key` left unfinished by an earlier ticket (a retried round) are aborted first,
        so their parts stop taking space. Unlike presigning, this talks to the store.
        """
        self._abort_unfinished(key)
        started = self._call(
            "start a multipart upload of",
            key,
            lambda: self._client.create_multipart_upload(Bucket=self.name, Key=key),
        )
        upload_id = started["UploadId"]
        urls = [
            self._presign("upload_part", key, expires_s, UploadId=upload_id, PartNumber=n) for n in range(1, parts + 1)
        ]
        complete = self._presign("complete_multipart_upload", key, expires_s, UploadId=upload_id)
        return Multipart(upload_id=upload_id, part_size=part_size, part_urls=urls, complete_url=complete)

    def _abort_unfinished(self, key: str) -> None:
        # Best effort: a store or policy that refuses listing uploads must not stop the round; a
        # bucket lifecycle rule (AbortIncompleteMultipartUpload) is the backstop (docs/deploy.md).
        try:
            listed = self._client.list_multipart_uploads(Bucket=self.name, Prefix=key)
            for upload in listed.get("Uploads", []):
                if upload.get("Key") == key:
                    self._client.abort_multipart_upload(Bucket=self.name, Key=key, UploadId=upload["UploadId"])
        except (ClientError, BotoCoreError) as exc:
            log.warning("could not abort unfinished uploads: %s", self._error(exc, "list uploads of", key))

    def put_bytes(self, key: str, data: bytes) -> str:
        """Upload `data` to `key`; returns its sha256 hex digest."""
        self._call("write", key, lambda: self._client.put_object(Bucket=self.name, Key=key, Body=data))
        return hashlib.sha256(data).hexdigest()

    def get_bytes(self, key: str) -> bytes:
        """Download the whole object at `key`."""
        resp = self._call("read", key, lambda: self._client.get_object(Bucket=self.name, Key=key))
        return self._call("read", key, lambda: resp["Body"].read())

    def exists(self, key: str) -> bool:
        """Whether an object is stored at `key` (refused access is an error, not False)."""
        try:
            self._client.head_object(Bucket=self.name, Key=key)
            return True
        except ClientError as exc:
            if exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
                if exc.response.get("Error", {}).get("Code") == "NoSuchBucket":
                    raise self._error(exc, "look up", key) from None
                return False
            raise self._error(exc, "look up", key) from None
        except BotoCoreError as exc:
            raise self._error(exc, "look up", key) from None

    def copy(self, src_key: str, dst_key: str) -> None:
        """Server-side copy within this bucket (bytes never pass through the operator).

        One CopyObject up to S3's 5 GiB limit for it; a larger object (a fully fine-tuned model) is
        copied in server-side parts (UploadPartCopy)."""
        source = {"Bucket": self.name, "Key": src_key}
        self._call(
            "copy",
            src_key,
            lambda: self._client.copy(source, self.name, dst_key, Config=_COPY_CONFIG),
        )

    def list(self, prefix: str) -> list[str]:
        """Keys under `prefix`, in the store's (lexicographic) order."""

        def run() -> list[str]:
            pages = self._client.get_paginator("list_objects_v2").paginate(Bucket=self.name, Prefix=prefix)
            return [obj["Key"] for page in pages for obj in page.get("Contents", [])]

        return self._call("list", prefix, run)

    def uri(self, key: str) -> str:
        """The object's s3:// address (for status fields and logs; not a credential)."""
        return f"s3://{self.name}/{key}"
