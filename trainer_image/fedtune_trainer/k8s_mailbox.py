"""A pod's mailbox in a Kubernetes Secret: `--mailbox k8s://<namespace>/<secret>`.

The Secret holds the same two documents as a local mailbox directory, base64 JSON under
`data["ticket.json"]` (written by the operator) and `data["receipt.json"]` (written by the
pod). The pod's ServiceAccount needs only `get`, `watch` and `patch` on that one Secret
(a Role rule with `resourceNames: [<secret>]`); a watch restricted that way must name the
object with `fieldSelector=metadata.name=<secret>`, which is what `wait_ticket` sends.

It speaks plain HTTP through urllib3 rather than the `kubernetes` client, so the trainer
image stays small. In a pod it uses the mounted ServiceAccount (token, CA, namespace) and
`KUBERNETES_SERVICE_HOST/PORT`; tests point it elsewhere with `FEDTUNE_KUBE_API` (URL;
http:// means no TLS), `FEDTUNE_KUBE_TOKEN_FILE` and `FEDTUNE_KUBE_CA_FILE`.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import urllib3
from fedtune.api.mailbox import RECEIPT, TICKET, ticket_id

log = logging.getLogger(__name__)

SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
WATCH_SECONDS = 60  # each watch is ended by the server after this; then re-read and re-watch
RETRY_MAX = 5.0  # the longest pause between attempts while the API server is unreachable
MIN_PAUSE = 0.1  # an API server is not a local file: never ask it more often than this


class MailboxError(RuntimeError):
    """The mailbox Secret cannot be used (missing, forbidden, bad credentials, bad content)."""


class BadDocument(MailboxError, ValueError):
    """A document in the Secret is not base64 JSON (something overwrote it)."""


class SecretMailbox:
    """The mailbox of one pod, kept in the Secret `namespace/name` (interface of FileMailbox)."""

    def __init__(
        self,
        namespace: str,
        name: str,
        *,
        api: str | None = None,
        token_file: str | None = None,
        ca_file: str | None = None,
        watch_seconds: int = WATCH_SECONDS,
        retry_seconds: float = 60,
    ):
        self.namespace, self.name = namespace, name
        self.retry_seconds = retry_seconds  # how long reads and writes ride out an unreachable API server
        self.api = (api or os.environ.get("FEDTUNE_KUBE_API") or _in_cluster_api()).rstrip("/")
        self.token_file = token_file or os.environ.get("FEDTUNE_KUBE_TOKEN_FILE") or str(SA_DIR / "token")
        self.watch_seconds = watch_seconds
        self.path = f"/api/v1/namespaces/{namespace}/secrets/{name}"
        if self.api.startswith("https://"):
            ca = ca_file or os.environ.get("FEDTUNE_KUBE_CA_FILE") or str(SA_DIR / "ca.crt")
            self._http = urllib3.PoolManager(cert_reqs="CERT_REQUIRED", ca_certs=ca if Path(ca).exists() else None)
        else:
            self._http = urllib3.PoolManager()

    @classmethod
    def from_uri(cls, uri: str, **kwargs: Any) -> SecretMailbox:
        """`k8s://<namespace>/<secret>`, or `k8s://<secret>` for the pod's own namespace."""
        rest = uri.removeprefix("k8s://").strip("/")
        namespace, _, name = rest.rpartition("/")
        if not name or "/" in namespace:
            raise ValueError(f"bad mailbox {uri!r}: expected k8s://<namespace>/<secret>")
        if not namespace:
            try:
                namespace = (SA_DIR / "namespace").read_text().strip()
            except OSError:
                raise ValueError(f"mailbox {uri!r} names no namespace and none is mounted") from None
        return cls(namespace, name, **kwargs)

    def __repr__(self) -> str:
        return f"SecretMailbox({self.namespace}/{self.name} at {self.api})"

    # --- the FileMailbox interface ------------------------------------------------------------

    def read_ticket(self) -> dict[str, Any] | None:
        return self._decode(self._retrying(self._get, "read"), TICKET)

    def read_receipt(self) -> dict[str, Any] | None:
        return self._decode(self._retrying(self._get, "read"), RECEIPT)

    def write_ticket(self, ticket: dict[str, Any]) -> None:
        """Used by the operator and tests; a pod only answers."""
        self._retrying(lambda: self._put_key(TICKET, ticket), "write the ticket to")

    def write_receipt(self, receipt: dict[str, Any]) -> None:
        # A receipt stands for a whole round of training: ride out a short API outage.
        self._retrying(lambda: self._put_key(RECEIPT, receipt), "write the receipt to")

    def wait_ticket(
        self, newer_than: str | None, poll: float = MIN_PAUSE, timeout: float | None = None
    ) -> dict[str, Any]:
        """Block until the ticket differs from the one identified by `newer_than` (its id string).

        Read the Secret, then watch it from that resourceVersion until a new ticket arrives.
        Each watch ends after `watch_seconds` (or at 410 Gone, or on a dropped connection);
        then the Secret is read again, so nothing is missed between two watches. `poll` is
        the least pause between attempts (at least MIN_PAUSE: the callers' default is the local
        mailboxes' file poll), doubled up to RETRY_MAX while the API server is unreachable: a
        flapping server is never hammered.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        poll = max(poll, MIN_PAUSE)
        pause = poll
        while True:
            started = time.monotonic()
            try:
                secret = self._get()
                ticket = self._decode(secret, TICKET)
                if ticket is not None and ticket_id(ticket) != newer_than:
                    return ticket
                left = self.watch_seconds if deadline is None else min(self.watch_seconds, deadline - started)
                if left > 0:
                    for obj in self._watch(secret["metadata"].get("resourceVersion", "0"), max(1, int(left))):
                        ticket = self._decode(obj, TICKET)
                        if ticket is not None and ticket_id(ticket) != newer_than:
                            return ticket
                pause = poll  # a healthy round: back to the short pause
            except _Transient as exc:
                if deadline is not None and time.monotonic() + pause >= deadline:
                    raise TimeoutError(f"no new ticket in Secret {self.namespace}/{self.name}: {exc}") from exc
                log.warning("mailbox %s/%s: %s; retrying in %.1fs", self.namespace, self.name, exc, pause)
                time.sleep(pause)
                pause = min(pause * 2, RETRY_MAX)
                continue
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"no new ticket in Secret {self.namespace}/{self.name} after {timeout}s")
            if time.monotonic() - started < poll:
                time.sleep(poll)  # a watch that ended at once (410, a closing server): do not spin

    def _retrying(self, fn: Any, what: str) -> Any:
        pause, deadline = 0.2, time.monotonic() + self.retry_seconds
        while True:
            try:
                return fn()
            except _Transient as exc:
                if time.monotonic() + pause > deadline:
                    raise MailboxError(f"could not {what} Secret {self.namespace}/{self.name}: {exc}") from exc
                log.warning("mailbox %s/%s: %s; retrying in %.1fs", self.namespace, self.name, exc, pause)
                time.sleep(pause)
                pause = min(pause * 2, RETRY_MAX)

    # --- HTTP ---------------------------------------------------------------------------------

    def _get(self) -> dict[str, Any]:
        return self._call("GET", self.path, verb="get")

    def _put_key(self, key: str, doc: dict[str, Any]) -> None:
        """Write one key only (JSON merge patch), leaving the other document alone."""
        patch = {"data": {key: encode_doc(doc)}}
        self._call("PATCH", self.path, verb="patch", body=patch, content_type="application/merge-patch+json")

    def _watch(self, resource_version: str, seconds: int) -> Iterator[dict[str, Any]]:
        """The Secret's states from one watch request; ends when the server ends the watch."""
        query = urllib.parse.urlencode(
            {
                "watch": "true",
                "fieldSelector": f"metadata.name={self.name}",
                "allowWatchBookmarks": "true",
                "resourceVersion": resource_version,
                "timeoutSeconds": seconds,
            }
        )
        path = f"/api/v1/namespaces/{self.namespace}/secrets?{query}"
        # The server ends the stream after `seconds`; silence well past that is a dead connection.
        resp = self._request("GET", path, verb="watch", stream=True, read_timeout=seconds + 15)
        try:
            for line in resp:
                if not line.strip():
                    continue
                event = json.loads(line)
                kind, obj = event.get("type"), event.get("object") or {}
                if kind == "ERROR":
                    if obj.get("code") == 410:
                        return  # our resourceVersion is too old: the caller re-reads the Secret
                    raise MailboxError(f"watch of Secret {self.namespace}/{self.name} failed: {obj.get('message')}")
                if kind == "DELETED":
                    raise MailboxError(f"mailbox Secret {self.namespace}/{self.name} was deleted (was the job?)")
                if kind in ("ADDED", "MODIFIED"):
                    yield obj
        except (urllib3.exceptions.HTTPError, OSError, ValueError) as exc:
            raise _Transient(f"watch interrupted: {exc}") from exc
        finally:
            resp.close()
            resp.release_conn()

    def _call(
        self, method: str, path: str, *, verb: str, body: Any = None, content_type: str | None = None
    ) -> dict[str, Any]:
        resp = self._request(method, path, verb=verb, body=body, content_type=content_type)
        try:
            return json.loads(resp.data)
        except ValueError as exc:
            raise _Transient(f"unreadable answer to {verb}: {exc}") from exc

    def _request(
        self,
        method: str,
        path: str,
        *,
        verb: str,
        body: Any = None,
        content_type: str | None = None,
        stream: bool = False,
        read_timeout: float = 30,
    ) -> urllib3.BaseHTTPResponse:
        headers = {"Accept": "application/json"}
        token = self._token()
        if token:
            headers["Authorization"] = f"Bearer {token}"
        if content_type:
            headers["Content-Type"] = content_type
        try:
            resp = self._http.request(
                method,
                self.api + path,
                headers=headers,
                body=None if body is None else json.dumps(body).encode(),
                preload_content=not stream,
                retries=False,
                timeout=urllib3.Timeout(connect=5, read=read_timeout),
            )
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise _Transient(f"API server {self.api} unreachable: {exc}") from exc
        if resp.status < 300:
            return resp
        data = resp.read() if stream else resp.data
        resp.release_conn()
        raise self._error(resp.status, data, verb)

    def _token(self) -> str | None:
        """Read on every call: projected ServiceAccount tokens are rotated on disk."""
        try:
            return Path(self.token_file).read_text().strip() or None
        except OSError:
            return None

    def _error(self, status: int, data: bytes, verb: str) -> Exception:
        try:
            message = json.loads(data).get("message", "")
        except (ValueError, AttributeError):
            message = data[:200].decode(errors="replace")
        where = f"Secret {self.namespace}/{self.name}"
        if status == 401:
            return MailboxError(
                f"the API server rejected this pod's credentials for {where} (401 {message}): the ServiceAccount "
                f"token {self.token_file} is missing, expired or not mounted (automountServiceAccountToken)"
            )
        if status == 403:
            return MailboxError(
                f"forbidden to {verb} {where} (403 {message}): the pod's ServiceAccount needs a Role in namespace "
                f"{self.namespace} allowing get, watch and patch on secrets with resourceNames [{self.name}], "
                f"bound to it by a RoleBinding"
            )
        if status == 404:
            return MailboxError(
                f"mailbox {where} does not exist (404): the operator creates it before the pod; "
                f"was the job deleted, or is --mailbox wrong?"
            )
        if status == 429 or status >= 500:
            return _Transient(f"API server answered {status} to {verb} {where}: {message}")
        return MailboxError(f"API server answered {status} to {verb} {where}: {message}")

    def _decode(self, secret: dict[str, Any], key: str) -> dict[str, Any] | None:
        try:
            return decode_doc(secret, key)
        except ValueError as exc:
            raise BadDocument(f"{key} in Secret {self.namespace}/{self.name} is not base64 JSON: {exc}") from exc


def encode_doc(doc: dict[str, Any]) -> str:
    """A mailbox document as a Secret `data` value (base64 JSON); for the operator's Secrets too."""
    return base64.b64encode(json.dumps(doc, indent=1, sort_keys=True).encode()).decode()


def decode_doc(secret: dict[str, Any], key: str) -> dict[str, Any] | None:
    """The document under `key` ("ticket.json", "receipt.json") of a Secret body; None if absent."""
    raw = (secret.get("data") or {}).get(key)
    return json.loads(base64.b64decode(raw, validate=True)) if raw else None


class _Transient(MailboxError):
    """A failure worth retrying (connection trouble, 429, 5xx), as opposed to a MailboxError."""


def _in_cluster_api() -> str:
    host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT", "443")
    if not host:
        raise MailboxError("not in a pod (KUBERNETES_SERVICE_HOST is unset) and FEDTUNE_KUBE_API is not set")
    return f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"
