"""Storage outages in the round state machine. Pure: the controller probes the storage, this decides.

An outage is the storage's, not the parties': while the object store does not answer, the job pauses
(no receipt is judged, no deadline runs, no retry is counted, no party is blamed) with the condition
StorageUnavailable True; when it answers again the current step gets the time back, and the job goes
on. An outage longer than spec.storageOutageTimeoutSeconds fails the job, naming the storage.
"""

from __future__ import annotations

from datetime import datetime

from fedtune.api.job import FederatedJobSpec
from fedtune.api.status import FederatedJobStatus
from fedtune.rounds import conditions as cond
from fedtune.rounds.events import Event

AVAILABLE = "StorageAvailable"  # the event saying the storage answers again


def paused(
    spec: FederatedJobSpec, st: FederatedJobStatus, storage_error: str | None, now: datetime, events: list[Event]
) -> bool:
    """Whether the job waits for its storage now (`storage_error`: why it does not answer, None when it does).

    Fails the job once the outage outlasts the bound. Ends a pause when the storage answers again.
    """
    if storage_error is None:
        if st.storage_unavailable_since is not None:
            _resume(spec, st, now, events)
        return False
    bound = spec.storage_outage_timeout_seconds
    if st.storage_unavailable_since is None:
        st.storage_unavailable_since = now
        events.append(
            Event(
                "Warning",
                cond.STORAGE_UNAVAILABLE,
                f"{storage_error}; round {st.current_round} paused until it answers (no retry counted, no party "
                f"blamed; the job fails after spec.storageOutageTimeoutSeconds={bound}s)",
            )
        )
    down = (now - st.storage_unavailable_since).total_seconds()
    if down >= bound:
        fail(
            st,
            f"{storage_error}; unavailable for {down:.0f}s, longer than spec.storageOutageTimeoutSeconds ({bound}s)",
            now,
            events,
        )
        return True
    message = f"{storage_error}; round {st.current_round} paused since {st.storage_unavailable_since:%H:%M:%S}"
    cond.set_condition(st, cond.STORAGE_UNAVAILABLE, "True", cond.STORAGE_UNREACHABLE, storage_error, now)
    cond.set_condition(st, cond.READY, "False", cond.STORAGE_UNREACHABLE, message, now)
    cond.set_condition(st, cond.RECONCILING, "True", cond.STORAGE_UNREACHABLE, message, now)
    st.message = message
    return True


def fail(st: FederatedJobStatus, why: str, now: datetime, events: list[Event]) -> None:
    """End the job for a storage that does not come back."""
    msg = f"{why}; bring the storage back (or raise spec.storageOutageTimeoutSeconds) and run the job again"
    cond.set_condition(st, cond.STORAGE_UNAVAILABLE, "True", cond.STORAGE_UNAVAILABLE, msg, now)
    cond.mark_halted(st, "Failed", cond.STORAGE_UNAVAILABLE, msg, now)
    st.stage = "done"
    events.append(Event("Warning", cond.STORAGE_UNAVAILABLE, msg))


def _resume(spec: FederatedJobSpec, st: FederatedJobStatus, now: datetime, events: list[Event]) -> None:
    down = now - st.storage_unavailable_since
    st.storage_unavailable_since = None
    if st.round_deadline is not None:  # the outage was nobody's fault: the step gets its time back
        st.round_deadline += down
    secs = down.total_seconds()
    cond.set_condition(
        st, cond.STORAGE_UNAVAILABLE, "False", cond.STORAGE_ANSWERS, f"answers again after {secs:.0f}s", now
    )
    cond.mark_running(st, f"round {st.current_round}/{spec.rounds}, attempt {st.attempt}", now)
    st.message = ""
    events.append(
        Event(
            "Normal",
            AVAILABLE,
            f"the storage answers again after {secs:.0f}s; round {st.current_round} goes on (its deadline "
            "moved by as much)",
        )
    )


def cleared_for_resume(st: FederatedJobStatus, now: datetime) -> None:
    """A controller that starts again probes the storage afresh: an outage it did not see is forgotten."""
    if st.storage_unavailable_since is not None:
        st.storage_unavailable_since = None
        cond.set_condition(st, cond.STORAGE_UNAVAILABLE, "False", cond.STORAGE_ANSWERS, "the run resumed", now)


def free_retry(spec: FederatedJobSpec, st: FederatedJobStatus, why: str, now: datetime, events: list[Event]) -> bool:
    """Whether the round may run again for a storage failure pods reported, without counting a retry.

    Pods see failures the probe may miss (an outage between two probes, a path only they use). Such
    retries are free while the round's first one is younger than the bound; then the job fails.
    """
    if st.storage_retry_since is None:
        st.storage_retry_since = now
    failing = (now - st.storage_retry_since).total_seconds()
    bound = spec.storage_outage_timeout_seconds
    if failing >= bound:
        fail(
            st,
            f"{why}; the storage kept failing for {failing:.0f}s, longer than spec.storageOutageTimeoutSeconds "
            f"({bound}s)",
            now,
            events,
        )
        return False
    st.storage_retries += 1
    return True
