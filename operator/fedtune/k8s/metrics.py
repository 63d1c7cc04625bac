"""Prometheus metrics of the operator: rounds, bytes moved, round durations, party states, rejections."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

from fedtune.api.status import FederatedJobStatus
from fedtune.rounds.machine import Event

ROUNDS = Counter("fedtune_rounds_completed_total", "Rounds aggregated", ["job"])
BYTES = Counter("fedtune_bytes_moved_total", "Bytes moved by rounds (up + down)", ["job"])
ROUND_SECONDS = Histogram(
    "fedtune_round_duration_seconds",
    "Wall time of a round",
    ["job"],
    buckets=(5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200),
)
REJECTIONS = Counter("fedtune_updates_rejected_total", "Updates refused by the aggregator", ["job"])
RETRIES = Counter("fedtune_round_retries_total", "Rounds retried after missing quorum", ["job"])
PARTY_STATE = Gauge("fedtune_party_state", "1 for the state each party of a job is in", ["job", "party", "state"])
JOB_PHASE = Gauge("fedtune_job_phase", "1 for the phase each job is in", ["job", "phase"])
CURRENT_ROUND = Gauge("fedtune_job_current_round", "Round in progress", ["job"])
PARTY_READY = Gauge("fedtune_party_ready", "1 when a Party's bucket answers to its credentials", ["party"])
LEADER = Gauge("fedtune_operator_leader", "1 when this replica drives jobs (runs kopf), 0 while it stands by")

_PHASES = ("Pending", "Running", "Succeeded", "Failed")
_STATES = ("Pending", "Ready", "Training", "Submitted", "Straggler", "Failed", "Dropped", "Done")
_counted: dict[str, int] = {}  # job -> last round counted, so re-reconciles never double count
_serving: set[int] = set()


def serve(port: int) -> None:
    """Expose /metrics on `port` (a background thread), once per process: a standby serves it
    before kopf's startup asks again."""
    if port not in _serving:
        start_http_server(port)
        _serving.add(port)


def observe_job(namespace: str, name: str, st: FederatedJobStatus, events: list[Event]) -> None:
    """Update every metric of one job from its status and the events of one reconcile."""
    job = f"{namespace}/{name}"
    for phase in _PHASES:
        JOB_PHASE.labels(job=job, phase=phase).set(st.phase == phase)
    CURRENT_ROUND.labels(job=job).set(st.current_round)
    for p in st.parties:
        for state in _STATES:
            PARTY_STATE.labels(job=job, party=p.name, state=state).set(p.state == state)
    last = _counted.get(job, 0)
    for h in st.history:
        if h.round > last and h.finished_at is not None:
            ROUNDS.labels(job=job).inc()
            BYTES.labels(job=job).inc(h.bytes_up + h.bytes_down)
            ROUND_SECONDS.labels(job=job).observe(h.duration_seconds)
            _counted[job] = h.round
    for e in events:
        if e.reason == "UpdateRejected":
            REJECTIONS.labels(job=job).inc()
        elif e.reason == "RoundRetry":
            RETRIES.labels(job=job).inc()


def forget_job(namespace: str, name: str) -> None:
    _counted.pop(f"{namespace}/{name}", None)
