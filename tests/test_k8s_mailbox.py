"""The Secret-backed mailbox of pods, against the emulated API server."""

from __future__ import annotations

import base64
import json
import threading
import time

import pytest
from fedtune.api.mailbox import ticket_id
from fedtune_trainer.k8s_mailbox import MIN_PAUSE, MailboxError, SecretMailbox, decode_doc, encode_doc
from kube import KubeEmulator, kube_fixture  # noqa: F401  (the `kube` fixture)


@pytest.fixture
def mailbox(kube: KubeEmulator, tmp_path, monkeypatch) -> SecretMailbox:
    """A mailbox Secret `jobs/pod-0` and a client reaching it the way a pod would (token file)."""
    token = tmp_path / "token"
    token.write_text(kube.token + "\n")
    monkeypatch.setenv("FEDTUNE_KUBE_API", kube.url)
    monkeypatch.setenv("FEDTUNE_KUBE_TOKEN_FILE", str(token))
    kube.create(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "pod-0", "namespace": "jobs"},
            "data": {"other": base64.b64encode(b"kept").decode()},
        }
    )
    return SecretMailbox.from_uri("k8s://jobs/pod-0", watch_seconds=2, retry_seconds=1)


def ticket(round_: int, attempt: int = 0) -> dict:
    return {"kind": "train", "job": "j", "round": round_, "attempt": attempt, "deadline": "soon"}


def requests_to(kube: KubeEmulator) -> int:
    return kube.call(lambda: len(list(kube.server)))


def test_round_trip_writes_only_its_key(kube: KubeEmulator, mailbox: SecretMailbox) -> None:
    assert mailbox.read_ticket() is None and mailbox.read_receipt() is None
    mailbox.write_ticket(ticket(1))
    mailbox.write_receipt({"kind": "train", "round": 1, "numSamples": 12})
    assert mailbox.read_ticket() == ticket(1)
    assert mailbox.read_receipt() == {"kind": "train", "round": 1, "numSamples": 12}

    data = kube.get("secrets", "jobs", "pod-0")["data"]
    assert set(data) == {"other", "ticket.json", "receipt.json"}
    assert json.loads(base64.b64decode(data["ticket.json"])) == ticket(1)
    assert decode_doc({"data": data}, "ticket.json") == ticket(1) and decode_doc({}, "receipt.json") is None
    assert decode_doc({"data": {"x": encode_doc(ticket(2))}}, "x") == ticket(2)
    assert base64.b64decode(data["other"]) == b"kept"


def test_wait_ticket_wakes_on_a_watch_event(kube: KubeEmulator, mailbox: SecretMailbox) -> None:
    mailbox.write_ticket(ticket(1))
    assert mailbox.wait_ticket(newer_than=None, timeout=1) == ticket(1)  # already there: no wait

    got: list[dict] = []
    waiter = threading.Thread(
        target=lambda: got.append(mailbox.wait_ticket(ticket_id(ticket(1)), poll=0.01, timeout=10))
    )
    before = requests_to(kube)
    waiter.start()
    time.sleep(2.5)  # past one server-side watch timeout: the mailbox re-reads and re-watches
    assert not got
    started = time.monotonic()
    mailbox.write_ticket(ticket(2))
    waiter.join(5)
    assert got == [ticket(2)] and time.monotonic() - started < 1.5  # an event, not the next watch period
    # A GET and a WATCH per watch period, not a poll every 10 ms.
    assert requests_to(kube) - before <= 7


def test_wait_ticket_times_out(mailbox: SecretMailbox) -> None:
    mailbox.write_ticket(ticket(3))
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="jobs/pod-0"):
        mailbox.wait_ticket(ticket_id(ticket(3)), timeout=1)
    assert 0.9 < time.monotonic() - started < 3


def test_wait_ticket_rides_out_expired_watches(kube: KubeEmulator, mailbox: SecretMailbox) -> None:
    """410 Gone at every watch: the mailbox falls back to reading, with pauses, and still sees the ticket."""
    mailbox.write_ticket(ticket(1))
    kube.call(lambda: setattr(kube.server, "_history_floor", 10**9))
    got: list[dict] = []
    waiter = threading.Thread(
        target=lambda: got.append(mailbox.wait_ticket(ticket_id(ticket(1)), poll=0.2, timeout=10))
    )
    before = requests_to(kube)
    waiter.start()
    time.sleep(1)
    mailbox.write_ticket(ticket(1, attempt=1))
    waiter.join(5)
    assert got == [ticket(1, attempt=1)]
    assert requests_to(kube) - before <= 20  # about 2 requests per 0.2 s pause, never a hot loop


def test_a_short_local_poll_does_not_hammer_the_api_server(mailbox: SecretMailbox, monkeypatch) -> None:
    """Pods pass the local mailboxes' 0.02 s poll; against the API the pause stays at least MIN_PAUSE."""
    mailbox.write_ticket(ticket(1))
    reads = []
    get = mailbox._get
    monkeypatch.setattr(mailbox, "_get", lambda: reads.append(1) or get())
    monkeypatch.setattr(mailbox, "_watch", lambda rv, seconds: iter(()))  # a server closing each watch at once
    with pytest.raises(TimeoutError):
        mailbox.wait_ticket(ticket_id(ticket(1)), poll=0.005, timeout=1)
    assert len(reads) <= 1 / MIN_PAUSE + 2


def test_missing_secret_is_a_clear_error(mailbox: SecretMailbox) -> None:
    gone = SecretMailbox("jobs", "pod-9")
    with pytest.raises(MailboxError, match=r"mailbox Secret jobs/pod-9 does not exist \(404\)"):
        gone.read_ticket()
    with pytest.raises(MailboxError, match="jobs/pod-9"):
        gone.wait_ticket(None, timeout=1)


def test_credentials_and_rbac_errors_say_what_is_needed(tmp_path, monkeypatch) -> None:
    with KubeEmulator(tokens={"right"}) as kube:
        kube.create({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "pod-0", "namespace": "jobs"}})
        token = tmp_path / "token"
        token.write_text("wrong")
        box = SecretMailbox("jobs", "pod-0", api=kube.url, token_file=str(token))
        with pytest.raises(MailboxError, match="rejected this pod's credentials.*401"):
            box.read_receipt()
        token.write_text("right")  # re-read on each call, as rotated tokens must be
        assert box.read_receipt() is None

        kube.call(lambda: kube.server["get /api/v1/namespaces/jobs/secrets/pod-0"] << 403)
        with pytest.raises(MailboxError, match=r"forbidden to get Secret jobs/pod-0 .*resourceNames \[pod-0\]"):
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
