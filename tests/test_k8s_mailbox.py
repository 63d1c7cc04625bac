"""The Secret-backed mailbox of pods, against the session's real API server (tests/kube.py).

The mailbox client reaches the server as a pod does: https with the cluster CA, and the token of
its own ServiceAccount, which a Role allows get, watch and patch on its one mailbox Secret
(resourceNames), as the operator grants pods. The audit log counts what the mailbox asks.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from fedtune.api.mailbox import ticket_id
from fedtune_trainer.k8s_mailbox import MIN_PAUSE, MailboxError, SecretMailbox, decode_doc, encode_doc
from kube import ApiError, Identity, KubeTest, secret_doc


@dataclass
class Pod:
    """A ServiceAccount with a mailbox Role, its TokenRequest token in a file, as a pod holds them."""

    namespace: str
    service_account: str
    token_file: Path

    @property
    def user(self) -> str:
        """Its username in the audit log."""
        return f"system:serviceaccount:{self.namespace}:{self.service_account}"


def grant_mailbox(kube: KubeTest, namespace: str, service_account: str, secret: str) -> None:
    """A Role allowing what the mailbox needs on `secret` only (get, watch, patch), bound to `service_account`."""
    name = f"mailbox-{secret}"
    rule = {"apiGroups": [""], "resources": ["secrets"], "resourceNames": [secret], "verbs": ["get", "watch", "patch"]}
    meta = {"name": name, "namespace": namespace}
    kube.create({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": meta, "rules": [rule]})
    kube.create(
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": meta,
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
            "subjects": [{"kind": "ServiceAccount", "name": service_account, "namespace": namespace}],
        }
    )


def service_account_token(kube: KubeTest, namespace: str, name: str, path: Path) -> Path:
    kube.create({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name, "namespace": namespace}})
    path.write_text(kube.token_for(namespace, name) + "\n")
    return path


def wait_allowed(kube: KubeTest, pod: Pod, secret: str) -> None:
    """Until the server's RBAC cache has the new RoleBinding (a get of `secret` is no longer 403)."""
    client = kube.as_identity(Identity(pod.user, token=pod.token_file.read_text().strip()))

    def allowed() -> bool:
        try:
            client.get("secrets", pod.namespace, secret)
        except ApiError as exc:
            if exc.status == 403:
                return False
            raise
        return True

    kube.wait_for(allowed, timeout=10, what=f"{pod.user} allowed to get Secret {secret}")


@pytest.fixture
def pod(kube: KubeTest, tmp_path, monkeypatch) -> Pod:
    """Namespace `jobs-<id>` with the mailbox Secret `pod-0` (holding another key), and the identity
    of its pod; FEDTUNE_KUBE_* point the mailbox client at the server, as the pod executor does."""
    ns = kube.namespace("jobs")
    kube.create(secret_doc(ns, "pod-0", {"other": "kept"}))
    pod = Pod(ns, "pod-0", service_account_token(kube, ns, "pod-0", tmp_path / "token"))
    grant_mailbox(kube, ns, "pod-0", "pod-0")
    wait_allowed(kube, pod, "pod-0")
    monkeypatch.setenv("FEDTUNE_KUBE_API", kube.url)
    monkeypatch.setenv("FEDTUNE_KUBE_TOKEN_FILE", str(pod.token_file))
    monkeypatch.setenv("FEDTUNE_KUBE_CA_FILE", str(kube.cluster.ca_file))
    return pod


@pytest.fixture
def mailbox(pod: Pod) -> SecretMailbox:
    return SecretMailbox.from_uri(f"k8s://{pod.namespace}/pod-0", watch_seconds=2, retry_seconds=1)


def ticket(round_: int, attempt: int = 0) -> dict:
    return {"kind": "train", "job": "j", "round": round_, "attempt": attempt, "deadline": "soon"}


def watch_from_stale_versions(mailbox: SecretMailbox, monkeypatch) -> None:
    """Every watch of the mailbox starts from resourceVersion "1", older than the server's watch
    cache holds (kube_cluster ages etcd first): the server answers each with 410 Expired."""
    get = mailbox._get

    def stale_get() -> dict:
        secret = get()
        secret["metadata"]["resourceVersion"] = "1"
        return secret

    monkeypatch.setattr(mailbox, "_get", stale_get)


def test_round_trip_writes_only_its_key(kube: KubeTest, pod: Pod, mailbox: SecretMailbox) -> None:
    assert mailbox.api.startswith("https://")
    assert mailbox.read_ticket() is None and mailbox.read_receipt() is None
    mailbox.write_ticket(ticket(1))
    mailbox.write_receipt({"kind": "train", "round": 1, "numSamples": 12})
    assert mailbox.read_ticket() == ticket(1)
    assert mailbox.read_receipt() == {"kind": "train", "round": 1, "numSamples": 12}

    data = kube.get("secrets", pod.namespace, "pod-0")["data"]
    assert set(data) == {"other", "ticket.json", "receipt.json"}
    assert json.loads(base64.b64decode(data["ticket.json"])) == ticket(1)
    assert decode_doc({"data": data}, "ticket.json") == ticket(1) and decode_doc({}, "receipt.json") is None
    assert decode_doc({"data": {"x": encode_doc(ticket(2))}}, "x") == ticket(2)
    assert base64.b64decode(data["other"]) == b"kept"


def test_wait_ticket_wakes_on_a_watch_event(kube: KubeTest, pod: Pod) -> None:
    # Watches of 4 s: the wake-up below must beat the end of the watch by a margin a slow machine keeps.
    mailbox = SecretMailbox.from_uri(f"k8s://{pod.namespace}/pod-0", watch_seconds=4, retry_seconds=1)
    mailbox.write_ticket(ticket(1))
    assert mailbox.wait_ticket(newer_than=None, timeout=1) == ticket(1)  # already there: no wait

    got: list[dict] = []
    waiter = threading.Thread(
        target=lambda: got.append(mailbox.wait_ticket(ticket_id(ticket(1)), poll=0.01, timeout=30))
    )
    audit = kube.audit()

    def watches() -> list[dict]:
        return [e for e in audit.entries(pod.user, stage="RequestReceived") if e["verb"] == "watch"]

    waiter.start()
    # The server ends the first watch after watch_seconds; the mailbox re-reads and watches again.
    kube.wait_for(lambda: len(watches()) >= 2, timeout=20, what="the mailbox's second watch")
    assert not got
    started = time.monotonic()
    mailbox.write_ticket(ticket(2))
    waiter.join(10)
    # An event of the watch in progress, not the re-read at its end (4 s after it began).
    assert got == [ticket(2)] and time.monotonic() - started < 2.5
    # A GET and a WATCH per watch period (and the write above), not a poll every 10 ms.
    assert len(watches()) == 2
    assert audit.requests(pod.user) <= 7


def test_wait_ticket_times_out(pod: Pod, mailbox: SecretMailbox) -> None:
    mailbox.write_ticket(ticket(3))
    started = time.monotonic()
    with pytest.raises(TimeoutError, match=f"{pod.namespace}/pod-0"):
        mailbox.wait_ticket(ticket_id(ticket(3)), timeout=1)
    assert 0.9 < time.monotonic() - started < 3


def test_a_stale_resource_version_gets_410_from_the_real_server(kube: KubeTest, pod: Pod) -> None:
    """What the next two tests rely on: a watch from "1" is answered 410 Expired (an ERROR event),
    while a watch from the Secret's current version is accepted."""
    client = kube.as_identity(Identity(pod.user, token=pod.token_file.read_text().strip()))
    current = client.get("secrets", pod.namespace, "pod-0")["metadata"]["resourceVersion"]
    answers = {}
    for rv in ("1", current):
        params = {"watch": "true", "fieldSelector": "metadata.name=pod-0", "resourceVersion": rv, "timeoutSeconds": 1}
        answers[rv] = client.request("GET", client.path("secrets", pod.namespace), params=params)
    assert answers["1"]["type"] == "ERROR" and answers["1"]["object"]["code"] == 410, answers["1"]
    assert answers["1"]["object"]["reason"] == "Expired"
    assert answers[current] is None, "nothing changed since the current version: an empty watch"


def test_wait_ticket_rides_out_expired_watches(kube: KubeTest, pod: Pod, mailbox: SecretMailbox, monkeypatch) -> None:
    """410 Gone at every watch: the mailbox falls back to reading, with pauses, and still sees the ticket."""
    mailbox.write_ticket(ticket(1))
    watch_from_stale_versions(mailbox, monkeypatch)
    got: list[dict] = []
    failed: list[BaseException] = []

    def wait() -> None:
        try:
            got.append(mailbox.wait_ticket(ticket_id(ticket(1)), poll=0.2, timeout=10))
        except BaseException as exc:  # noqa: BLE001 - reported by the test thread below
            failed.append(exc)

    waiter = threading.Thread(target=wait)
    audit = kube.audit()
    waiter.start()
    time.sleep(1)
    mailbox.write_ticket(ticket(1, attempt=1))
    waiter.join(5)
    assert not failed, failed
    assert got == [ticket(1, attempt=1)]
    watches = [e for e in audit.entries(pod.user, stage="RequestReceived") if e["verb"] == "watch"]
    assert len(watches) >= 3 and all("resourceVersion=1&" in e["requestURI"] for e in watches)
    assert audit.requests(pod.user) <= 20  # about 2 requests per 0.2 s pause, never a hot loop


def test_a_short_local_poll_does_not_hammer_the_api_server(
    kube: KubeTest, pod: Pod, mailbox: SecretMailbox, monkeypatch
) -> None:
    """Pods pass the local mailboxes' 0.02 s poll; against the API the pause stays at least MIN_PAUSE,
    even when the server ends every watch at once (410 here)."""
    mailbox.write_ticket(ticket(1))
    watch_from_stale_versions(mailbox, monkeypatch)
    audit = kube.audit()
    with pytest.raises(TimeoutError):
        mailbox.wait_ticket(ticket_id(ticket(1)), poll=0.005, timeout=1)
    reads = [e for e in audit.entries(pod.user, stage="RequestReceived") if e["verb"] == "get"]
    assert 3 <= len(reads) <= 1 / MIN_PAUSE + 2


def test_missing_secret_is_a_clear_error(kube: KubeTest, pod: Pod) -> None:
    grant_mailbox(kube, pod.namespace, pod.service_account, "pod-9")  # allowed, but never created
    gone = SecretMailbox(pod.namespace, "pod-9")

    def answered_404() -> bool:
        try:
            gone.read_ticket()
        except MailboxError as exc:
            if "(403" in str(exc):  # the new Role is not in the server's RBAC cache yet
                return False
            raise
        return True

    with pytest.raises(MailboxError, match=rf"mailbox Secret {pod.namespace}/pod-9 does not exist \(404\)"):
        kube.wait_for(answered_404, timeout=10, what="the Role for pod-9 to take effect")
    with pytest.raises(MailboxError, match=f"{pod.namespace}/pod-9"):
        gone.wait_ticket(None, timeout=1)


def test_credentials_and_rbac_errors_say_what_is_needed(kube: KubeTest, pod: Pod, tmp_path) -> None:
    token = tmp_path / "pod-token"
    token.write_text("not-a-token")
    box = SecretMailbox(pod.namespace, "pod-0", api=kube.url, token_file=str(token), ca_file=str(kube.cluster.ca_file))
    with pytest.raises(MailboxError, match="rejected this pod's credentials.*401"):
        box.read_receipt()
    token.write_text(pod.token_file.read_text())  # re-read on each call, as rotated tokens must be
    assert box.read_receipt() is None

    # A ServiceAccount that no Role names: its valid token is refused.
    service_account_token(kube, pod.namespace, "no-role", token)
    with pytest.raises(MailboxError, match=rf"forbidden to get Secret {pod.namespace}/pod-0 .*resourceNames \[pod-0\]"):
        box.read_ticket()


def test_unreachable_api_server_is_retried_then_reported(tmp_path) -> None:
    box = SecretMailbox("jobs", "pod-0", api="http://127.0.0.1:9", token_file=str(tmp_path / "none"), retry_seconds=0.5)
    with pytest.raises(MailboxError, match="could not write the receipt to Secret jobs/pod-0"):
        box.write_receipt({"round": 1})
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="jobs/pod-0.*unreachable"):
        box.wait_ticket(None, poll=0.05, timeout=0.5)  # the timeout holds while the server is down
    assert time.monotonic() - started < 2


def test_uri_forms(monkeypatch) -> None:
    monkeypatch.setenv("FEDTUNE_KUBE_API", "http://127.0.0.1:1")
    box = SecretMailbox.from_uri("k8s://team-a/fj-x-party-alice")
    assert (box.namespace, box.name) == ("team-a", "fj-x-party-alice")
    with pytest.raises(ValueError):
        SecretMailbox.from_uri("k8s://a/b/c")
