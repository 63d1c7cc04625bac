"""Local mailboxes are event-driven: a waiting pod or control loop sleeps in the kernel until a write."""

from __future__ import annotations

import sys
import threading
import time

import pytest
from fedtune.api import mailbox as mb
from fedtune.api.mailbox import RECEIPT, TICKET, FileMailbox, Waiter


def later(seconds: float, action) -> threading.Thread:
    t = threading.Thread(target=lambda: (time.sleep(seconds), action()))
    t.start()
    return t


def test_a_waiter_wakes_on_its_file_and_not_on_others(tmp_path):
    box = FileMailbox(tmp_path)
    waiter = Waiter([tmp_path], [RECEIPT])
    assert waiter.event_driven  # Linux, inotify-simple locked: no polling
    later(0.1, lambda: box.write_ticket({"kind": "train"})).join()
    assert waiter.wait(0.3) is False  # a ticket is not what this waiter waits for
    t = later(0.1, lambda: box.write_receipt({"kind": "train"}))
    assert waiter.wait(30) is True
    t.join()
    waiter.close()


def test_a_write_before_the_wait_is_not_missed(tmp_path):
    waiter = Waiter([tmp_path], [TICKET])
    FileMailbox(tmp_path).write_ticket({"kind": "init"})  # between the caller's read and its wait
    assert waiter.wait(30) is True
    waiter.close()


def test_waiting_for_a_ticket_never_polls(tmp_path, monkeypatch):
    box = FileMailbox(tmp_path)
    box.write_ticket({"kind": "init", "round": 0})

    def no_sleep(_):
        raise AssertionError("wait_ticket polled (time.sleep) instead of waiting for an inotify event")

    monkeypatch.setattr(mb.time, "sleep", no_sleep)
    writer = threading.Thread(target=lambda: (threading.Event().wait(0.2), box.write_ticket({"kind": "train"})))
    writer.start()
    assert box.wait_ticket(newer_than="init-r0-a0")["kind"] == "train"
    writer.join()


def test_without_inotify_it_polls(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "inotify_simple", None)  # as on a system without it
    box = FileMailbox(tmp_path)
    waiter = Waiter([tmp_path], [TICKET], poll=0.01)
    assert not waiter.event_driven and waiter.wait(1.0) is False
    later(0.1, lambda: box.write_ticket({"kind": "train", "round": 2}))
    assert box.wait_ticket(newer_than=None, poll=0.01, timeout=30)["round"] == 2
    with pytest.raises(TimeoutError, match="no new ticket"):
        box.wait_ticket(newer_than="train-r2-a0", poll=0.01, timeout=0.1)
