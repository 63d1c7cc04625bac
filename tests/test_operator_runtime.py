"""Operator runtime pieces: settings from the environment, spec-change rules, metrics, the CLI entry."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from fedtune.api.status import FederatedJobStatus, PartyState, RoundRecord
from fedtune.cli import build_parser
from fedtune.k8s import metrics
from fedtune.k8s.settings import OperatorSettings
from fedtune.k8s.spec_changes import changed_fields, review_change
from fedtune.rounds.machine import Event
from prometheus_client import REGISTRY
from pydantic import ValidationError


def test_settings_come_from_fedtune_variables():
    s = OperatorSettings.from_env({"FEDTUNE_RESYNC_SECONDS": "2.5", "FEDTUNE_METRICS_PORT": "0", "OTHER": "x"})
    assert s.resync_seconds == 2.5 and s.metrics_port == 0 and s.max_pod_restarts == 5
    with pytest.raises(ValidationError, match="resync_seconds"):
        OperatorSettings.from_env({"FEDTUNE_RESYNC_SECONDS": "-1"})
    with pytest.raises(ValidationError, match="log_format"):
        OperatorSettings.from_env({"FEDTUNE_LOG_FORMAT": "xml"})


@pytest.mark.parametrize(
    "old,new,ok,text",
    [
        ({"rounds": 3}, {"rounds": 5}, True, "rounds"),
        (
            {"rounds": 3, "roundTimeoutSeconds": 60},
            {"rounds": 3, "roundTimeoutSeconds": 90},
            True,
            "roundTimeoutSeconds",
        ),
        (
            {"rounds": 3, "peft": {"config": {"r": 8}}},
            {"rounds": 3, "peft": {"config": {"r": 16}}},
            False,
            "peft.config.r cannot change",
        ),
        ({"model": {"source": "a"}}, {"model": {"source": "b"}}, False, "model.source"),
        ({"parties": [{"name": "a"}]}, {"parties": [{"name": "b"}]}, False, "parties"),
        ({"rounds": 5}, {"rounds": 1}, False, "below the round in progress (2)"),
    ],
)
def test_spec_change_rules(old, new, ok, text):
    allowed, why = review_change(old, new, current_round=2)
    assert allowed is ok and text in why


def test_changed_fields_are_leaf_paths():
    assert changed_fields({"a": {"b": 1, "c": 2}}, {"a": {"b": 1, "c": 3}, "d": 4}) == ["a.c", "d"]


def _value(name, **labels):
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_metrics_count_each_round_once_and_track_states():
    now = datetime(2026, 1, 1, tzinfo=UTC)
    st = FederatedJobStatus(
        phase="Running",
        current_round=2,
        parties=[PartyState(name="o/a", state="Submitted")],
        history=[
            RoundRecord(round=0),
            RoundRecord(round=1, bytes_up=100, bytes_down=50, duration_seconds=12.0, finished_at=now),
        ],
    )
    events = [Event("Warning", "UpdateRejected", "x"), Event("Warning", "RoundRetry", "y")]
    for _ in range(3):  # re-reconciles of the same status must not count again
        metrics.observe_job("ns", "m1", st, events if _ == 0 else [])
    assert _value("fedtune_rounds_completed_total", job="ns/m1") == 1
    assert _value("fedtune_bytes_moved_total", job="ns/m1") == 150
    assert _value("fedtune_updates_rejected_total", job="ns/m1") == 1
    assert _value("fedtune_round_retries_total", job="ns/m1") == 1
    assert _value("fedtune_party_state", job="ns/m1", party="o/a", state="Submitted") == 1
    assert _value("fedtune_party_state", job="ns/m1", party="o/a", state="Training") == 0
    assert _value("fedtune_job_phase", job="ns/m1", phase="Running") == 1
    assert _value("fedtune_round_duration_seconds_count", job="ns/m1") == 1


def test_operator_command_parses():
    args = build_parser().parse_args(["operator", "--namespace", "a", "--namespace", "b", "--liveness", ""])
    assert args.namespace == ["a", "b"] and args.liveness == "" and args.func.__name__ == "_cmd_operator"


@pytest.mark.asyncio
async def test_job_daemon_retries_after_a_transient_error(monkeypatch):
    import asyncio

    import fedtune.k8s.operator as op

    calls = []

    async def flaky_once(body, rejections):
        calls.append(body["metadata"]["name"])
        if len(calls) == 1:
            raise RuntimeError("HTTP 500 from the API server")
        return True  # the job is over

    class FakeKube:
        async def get(self, url):
            return {"metadata": {"name": "j1"}}

    class NotStopped:
        def __bool__(self):
            return False

    monkeypatch.setattr(op, "_reconcile_once", flaky_once)
    monkeypatch.setattr(op, "kube", lambda: FakeKube())
    monkeypatch.setattr(op, "SETTINGS", OperatorSettings(resync_seconds=0.05, metrics_port=0))
    await asyncio.wait_for(op.drive_job(name="j1", namespace="ns", stopped=NotStopped()), timeout=5)
    assert calls == ["j1", "j1"] and ("ns", "j1") not in op._wakers


def _daemon_fakes(monkeypatch, reconcile_once, patch=None):
    """drive_job with its reconcile and its client replaced; returns the operator module."""
    import fedtune.k8s.operator as op

    class FakeKube:
        async def get(self, url):
            return {"metadata": {"name": "j1", "namespace": "ns", "generation": 1}}

        async def patch(self, url, body):
            if patch is not None:
                await patch(url, body)

    monkeypatch.setattr(op, "_reconcile_once", reconcile_once)
    monkeypatch.setattr(op, "kube", lambda: FakeKube())
    monkeypatch.setattr(op, "SETTINGS", OperatorSettings(resync_seconds=0.05, metrics_port=0))
    return op


class _NotStopped:
    def __bool__(self):
        return False


def _api_exception(status: int, message: str):
    from kubernetes.client.rest import ApiException

    exc = ApiException(status=status, reason="Reason")
    exc.body = json.dumps({"kind": "Status", "message": message, "code": status})
    return exc


@pytest.mark.asyncio
async def test_a_server_hiccup_is_one_warning_line_with_the_servers_words(monkeypatch, caplog):
    import asyncio

    calls = []

    async def busy_once(body, rejections):
        calls.append(1)
        if len(calls) == 1:
            raise _api_exception(429, "the server is busy, try again")
        return True

    op = _daemon_fakes(monkeypatch, busy_once)
    with caplog.at_level("DEBUG", logger="fedtune.operator"):
        await asyncio.wait_for(op.drive_job(name="j1", namespace="ns", stopped=_NotStopped()), timeout=5)
    (record,) = [r for r in caplog.records if r.name == "fedtune.operator"]
    assert record.levelname == "WARNING" and record.exc_info is None  # a line per resync, not a traceback
    assert "429" in record.getMessage() and "the server is busy, try again" in record.getMessage()
    assert len(calls) == 2


@pytest.mark.asyncio
async def test_a_refusal_whose_report_fails_too_does_not_end_the_daemon(monkeypatch, caplog):
    """The Forbidden report's own status patch fails with something else than an ApiException: logged,
    and the daemon carries on at the next resync (not kopf's backoff)."""
    import asyncio

    calls, patches = [], []

    async def refused_once(body, rejections):
        calls.append(1)
        if len(calls) == 1:
            raise _api_exception(403, 'pods is forbidden: cannot create resource "pods"')
        return True

    async def broken_patch(url, body):
        patches.append(url)
        raise ConnectionResetError("connection reset by peer")

    op = _daemon_fakes(monkeypatch, refused_once, broken_patch)
    await asyncio.wait_for(op.drive_job(name="j1", namespace="ns", stopped=_NotStopped()), timeout=5)
    assert len(calls) == 2 and patches == ["/apis/fedtune.io/v1alpha1/namespaces/ns/federatedjobs/j1/status"]
    assert "could not record that on FederatedJob ns/j1: ConnectionResetError" in caplog.text


def test_a_running_job_gets_its_round_back_on_ready_once_a_refusal_or_wait_is_over():
    from fedtune.api.job import FederatedJob
    from fedtune.k8s.reconcile import _back_to_running
    from fedtune.rounds import conditions as cond

    now = datetime(2026, 1, 1, tzinfo=UTC)
    job = FederatedJob.model_validate(
        {
            "apiVersion": "fedtune.io/v1alpha1",
            "kind": "FederatedJob",
            "metadata": {"name": "j", "namespace": "hub"},
            "spec": {
                "model": {"source": "hf://m", "task": "sequence-classification"},
                "data": {"labels": ["negative", "positive"]},
                "rounds": 3,
                "minParties": 1,
                "parties": [{"name": "a", "namespace": "org-a"}],
            },
        }
    )
    st = FederatedJobStatus(phase="Running", stage="training", current_round=2, attempt=1)
    cond.mark_running(st, "round 2/3, attempt 1", now)
    refused = "the API server refused the operator: pods is forbidden"
    cond.set_condition(st, cond.READY, "False", "Forbidden", refused, now)
    cond.set_condition(st, cond.RECONCILING, "True", "Forbidden", refused, now)
    st.message = refused
    _back_to_running(job, st, now)
    ready, reconciling = st.condition(cond.READY), st.condition(cond.RECONCILING)
    assert (ready.status, ready.reason, ready.message) == ("False", "RoundInProgress", "round 2/3, attempt 1")
    assert (reconciling.status, reconciling.reason) == ("True", "RoundInProgress") and st.message == ""
    # A job that ended keeps its outcome; one that is still in its round is left alone.
    done = FederatedJobStatus(phase="Succeeded", stage="done")
    cond.mark_succeeded(done, "3 round(s) done", now)
    before = done.model_copy(deep=True)
    _back_to_running(job, done, now)
    assert done == before
    _back_to_running(job, st, now)
    assert st.condition(cond.READY).message == "round 2/3, attempt 1"
