"""HTTP transfer through presigned URLs: sha256-verified GET (into memory or streamed to a file),
PUT (one request, or an S3 multipart upload with a URL per part), retries with backoff.

Only the URL's path is ever logged or put into an error: its query string carries a signature.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit
from xml.sax.saxutils import escape

import urllib3
from fedtune.api.protocol import Multipart, Upload

log = logging.getLogger(__name__)

_HTTP = urllib3.PoolManager(retries=False, timeout=urllib3.Timeout(connect=10, read=300))
RETRY_STATUS = {408, 429, 500, 502, 503, 504}
CHUNK = 1024 * 1024  # a streamed download is read, hashed and written this much at a time
# An object store this slow to answer one request is said in the pod's log: a paused or overloaded server
# only delays a round (the read timeout is far longer), and the log is where the delay is explained.
SLOW_ANSWER_SECONDS = 5.0
_T = TypeVar("_T")


class TransferError(RuntimeError):
    """A transfer that failed for good (refused, corrupt, or out of retries)."""


class StorageFailure(TransferError):
    """The object store could not be reached, or kept answering 408/429/5xx, through every retry.

    The storage's failure, not the pod's: receipts say so (`fault: storage`), and the control plane
    waits for the storage instead of blaming the party.
    """


class _Transient(Exception):
    """A failure worth another attempt (connection lost, 5xx, throttled); `str()` is the reason."""


def redact(url: str) -> str:
    """The URL without its query string (which holds the signature)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}"


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _error_code(body: bytes) -> str:
    text = body[:300].decode("utf-8", "replace")
    return text.split("<Code>", 1)[1].split("</Code>", 1)[0] if "<Code>" in text else ""


def _explain(status: int, body: bytes, url: str) -> str:
    code = _error_code(body)
    if status == 403:
        hint = "the presigned URL was refused: it expired, was altered, or does not grant this object"
    elif code == "NoSuchUpload":
        hint = "the multipart upload is gone: aborted because a newer ticket replaced this one, or already completed"
    elif status == 404:
        hint = "no such object or bucket"
    else:
        hint = "unexpected answer from the object store"
    return f"HTTP {status}{f' ({code})' if code else ''} for {redact(url)}: {hint}"


def _send(
    method: str, url: str, body: object = None, *, what: str | None = None, stream: bool = False
) -> urllib3.BaseHTTPResponse:
    """One request. Returns the 2xx response; raises _Transient (worth retrying) or TransferError."""
    start = time.monotonic()
    try:
        resp = _HTTP.request(method, url, body=body, preload_content=not stream)
    except urllib3.exceptions.HTTPError as exc:
        raise _Transient(f"{type(exc).__name__} for {redact(url)}") from None
    finally:
        if (waited := time.monotonic() - start) > SLOW_ANSWER_SECONDS:
            log.warning("%s %s: the object store took %.1f s to answer", what or method, redact(url), waited)
    if 200 <= resp.status < 300:
        return resp
    reason = _explain(resp.status, resp.data, url)
    if resp.status in RETRY_STATUS:
        raise _Transient(reason)
    raise TransferError(f"{what or method} failed: {reason}")


def _retrying(what: str, attempts: int, backoff: float, once: Callable[[], _T]) -> _T:
    """`once()` until it succeeds; transient failures back off exponentially (with jitter)."""
    delay = backoff
    for attempt in range(1, attempts + 1):
        try:
            return once()
        except _Transient as exc:
            reason = str(exc)
        if attempt == attempts:
            raise StorageFailure(f"{what} failed after {attempts} attempts: {reason}")
        log.warning("%s attempt %d/%d failed (%s); retrying in %.1fs", what, attempt, attempts, reason, delay)
        time.sleep(delay * (1 + 0.25 * random.random()))
        delay *= 2
    raise AssertionError("unreachable")


def _check_sha256(got: str, expected: str | None, url: str) -> None:
    if expected is not None and got != expected.lower():
        raise TransferError(f"sha256 mismatch for {redact(url)}: expected {expected[:12]}…, got {got[:12]}…")


def get(url: str, sha256: str | None = None, attempts: int = 5, backoff: float = 0.5) -> bytes:
    """Download an object into memory; when `sha256` is given, refuse content that does not match it."""
    data = _retrying("GET", attempts, backoff, lambda: _send("GET", url).data)
    _check_sha256(sha256_hex(data), sha256, url)
    return data


def get_to_file(
    url: str,
    path: Path,
    sha256: str | None = None,
    attempts: int = 5,
    backoff: float = 0.5,
    max_bytes: int | None = None,
) -> tuple[str, int]:
    """Stream an object into `path`, hashing it on the way; returns (sha256, size in bytes).

    Memory stays at one chunk whatever the object's size. Bytes land in `<path>.part`, renamed to
    `path` only once complete (and matching `sha256`, when given), so `path` is never half a file.
    A connection lost mid-body restarts the download, within the same retries as a failed request.
    An object larger than `max_bytes` is refused (not retried) before more than that reaches disk.
    """
    path = Path(path)
    partial = path.with_name(path.name + ".part")

    def too_large() -> TransferError:
        return TransferError(f"GET of {redact(url)} refused: the object is larger than the limit of {max_bytes} bytes")

    def once() -> tuple[str, int]:
        resp = _send("GET", url, stream=True)
        digest, size = hashlib.sha256(), 0
        try:
            if max_bytes is not None and int(resp.headers.get("Content-Length") or 0) > max_bytes:
                raise too_large()
            with open(partial, "wb") as out:
                for chunk in resp.stream(CHUNK):
                    size += len(chunk)
                    if max_bytes is not None and size > max_bytes:
                        raise too_large()
                    digest.update(chunk)
                    out.write(chunk)
        except urllib3.exceptions.HTTPError as exc:
            raise _Transient(f"{type(exc).__name__} while reading {redact(url)}") from None
        finally:
            resp.close()  # a connection left halfway through a body cannot serve another request
        return digest.hexdigest(), size

    try:
        got, size = _retrying("GET", attempts, backoff, once)
        _check_sha256(got, sha256, url)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, path)
    return got, size


def put(target: str | Upload, data: bytes, attempts: int = 5, backoff: float = 0.5) -> str:
    """Upload `data` to a presigned URL, or in parts when `target` is a multipart upload; returns its sha256.

    `data` may be anything with the buffer protocol (bytes, a memoryview, an mmap of a file): parts
    are sent as slices of it, never copied.
    """
    upload = Upload.model_validate(target)
    if upload.multipart is not None:
        _put_parts(upload.multipart, memoryview(data).cast("B"), attempts, backoff)
    else:
        _retrying("PUT", attempts, backoff, lambda: _send("PUT", upload.url, data))
    return hashlib.sha256(data).hexdigest()


def _put_parts(upload: Multipart, data: memoryview, attempts: int, backoff: float) -> None:
    """Send the parts one by one, each with its own retries, then complete the upload.

    A part that fails is re-sent alone: the parts before it are stored and not sent again.
    """
    urls = upload.part_urls
    # Presigned part URLs do not sign the body size: data beyond the parts offered goes in larger parts.
    size = max(upload.part_size, -(-len(data) // len(urls)))
    count = max(1, -(-len(data) // size))
    etags = []
    for n in range(count):
        what = f"PUT of part {n + 1}/{count} (upload {upload.upload_id})"
        part = data[n * size : (n + 1) * size]
        resp = _retrying(what, attempts, backoff, functools.partial(_send, "PUT", urls[n], part, what=what))
        etag = resp.headers.get("ETag")
        if not etag:
            raise TransferError(f"{what} failed: {redact(urls[n])} answered without an ETag, needed to complete")
        etags.append(etag)
    what, body = f"completing upload {upload.upload_id}", _completion(etags)
    tries = 0

    def complete() -> None:
        nonlocal tries
        tries += 1
        try:
            _complete(upload.complete_url, body, what)
        except TransferError as exc:
            # On a retry, NoSuchUpload may mean the lost answer of an attempt that did complete it;
            # the pod has no URL to check, so it still fails, saying so.
            if tries > 1 and "(NoSuchUpload)" in str(exc):
                raise TransferError(
                    f"{exc} (an earlier attempt's answer was lost, so the upload may have completed; "
                    "the round's retry will send it again)"
                ) from None
            raise

    _retrying(what, attempts, backoff, complete)


def _completion(etags: list[str]) -> bytes:
    """The CompleteMultipartUpload document: every part's number and the ETag the store gave it."""
    parts = (f"<Part><PartNumber>{n}</PartNumber><ETag>{escape(etag)}</ETag></Part>" for n, etag in enumerate(etags, 1))
    return f"<CompleteMultipartUpload>{''.join(parts)}</CompleteMultipartUpload>".encode()


def _complete(url: str, body: bytes, what: str) -> None:
    resp = _send("POST", url, body, what=what)
    # S3 answers 200 before it knows the outcome and may then report a failure in the body,
    # which AWS documents as worth retrying.
    if b"<Error>" in resp.data:
        raise _Transient(f"{_error_code(resp.data) or 'error'} in the answer for {redact(url)}")
