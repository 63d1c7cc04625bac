"""HTTP transfer through presigned URLs: sha256-verified GET, PUT, retries with backoff.

Only the URL's path is ever logged or put into an error: its query string carries a signature.
"""

from __future__ import annotations

import hashlib
import logging
import random
import time
from urllib.parse import urlsplit

import urllib3

log = logging.getLogger(__name__)

_HTTP = urllib3.PoolManager(retries=False, timeout=urllib3.Timeout(connect=10, read=300))
RETRY_STATUS = {408, 429, 500, 502, 503, 504}


class TransferError(RuntimeError):
    """A transfer that failed for good (refused, corrupt, or out of retries)."""


def redact(url: str) -> str:
    """The URL without its query string (which holds the signature)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}"


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _explain(status: int, body: bytes, url: str) -> str:
    text = body[:300].decode("utf-8", "replace")
    if status == 403:
        hint = "the presigned URL was refused: it expired, was altered, or does not grant this object"
    elif status == 404:
        hint = "no such object or bucket"
    else:
        hint = "unexpected answer from the object store"
    code = ""
    if "<Code>" in text:
        code = " (" + text.split("<Code>", 1)[1].split("</Code>", 1)[0] + ")"
    return f"HTTP {status}{code} for {redact(url)}: {hint}"


def _request(method: str, url: str, body: bytes | None, attempts: int, backoff: float) -> bytes:
    delay = backoff
    for attempt in range(1, attempts + 1):
        try:
            resp = _HTTP.request(method, url, body=body, preload_content=True)
        except urllib3.exceptions.HTTPError as exc:
            reason = f"{type(exc).__name__} for {redact(url)}"
            status = None
        else:
            if 200 <= resp.status < 300:
                return resp.data
            reason = _explain(resp.status, resp.data, url)
            status = resp.status
            if status not in RETRY_STATUS:
                raise TransferError(f"{method} failed: {reason}")
        if attempt == attempts:
            raise TransferError(f"{method} failed after {attempts} attempts: {reason}")
        log.warning("%s attempt %d/%d failed (%s); retrying in %.1fs", method, attempt, attempts, reason, delay)
        time.sleep(delay * (1 + 0.25 * random.random()))
        delay *= 2
    raise AssertionError("unreachable")


def get(url: str, sha256: str | None = None, attempts: int = 5, backoff: float = 0.5) -> bytes:
    """Download an object; when `sha256` is given, refuse content that does not match it."""
    data = _request("GET", url, None, attempts, backoff)
    if sha256 is not None:
        got = sha256_hex(data)
        if got != sha256:
            raise TransferError(f"sha256 mismatch for {redact(url)}: expected {sha256[:12]}…, got {got[:12]}…")
    return data


def put(url: str, data: bytes, attempts: int = 5, backoff: float = 0.5) -> str:
    """Upload an object; returns its sha256."""
    _request("PUT", url, data, attempts, backoff)
    return sha256_hex(data)
