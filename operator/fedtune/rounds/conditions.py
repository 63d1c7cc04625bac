"""kstatus-style conditions: Ready, Reconciling, Stalled and fedtune's specific ones."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from fedtune.api.status import Condition, FederatedJobStatus

# Reasons are CamelCase constants so tools can match on them.
READY = "Ready"
RECONCILING = "Reconciling"
STALLED = "Stalled"
QUORUM_LOST = "QuorumLost"
DEGRADED = "Degraded"
INVALID_SPEC = "InvalidSpec"
# The object store does not answer: rounds pause (True, reason StorageUnreachable) until it does (False,
# reason StorageAnswers); reason and phase Failed once the outage outlasts spec.storageOutageTimeoutSeconds.
STORAGE_UNAVAILABLE = "StorageUnavailable"
STORAGE_UNREACHABLE = "StorageUnreachable"
STORAGE_ANSWERS = "StorageAnswers"
# The job stopped before a round that would have spent more ε than spec.privacy.dp.budget; it Succeeded with
# the global adapter of the last round the budget allowed.
PRIVACY_BUDGET_EXHAUSTED = "PrivacyBudgetExhausted"
# A round with secure aggregation failed because fewer than its threshold t of parties uploaded, or revealed:
# the sum cannot be recovered. True (reason BelowThreshold) from then on, False once a round aggregates again.
SECURE_AGGREGATION_FAILED = "SecureAggregationFailed"
BELOW_THRESHOLD = "BelowThreshold"
# Why a local run stopped before its job ended (phase Stopped).
INTERRUPTED = "Interrupted"  # SIGINT (Ctrl-C) or SIGTERM: the runner stopped every child and said so
RUNNER_CRASHED = "RunnerCrashed"  # an error in the runner itself
RUNNER_LOST = "RunnerLost"  # the runner vanished without a word (SIGKILL, power loss); seen afterwards
STARTING = "Starting"  # a local run's storage, data and base model are getting ready (phase Pending)


def set_condition(
    status: FederatedJobStatus,
    ctype: str,
    value: Literal["True", "False", "Unknown"],
    reason: str,
    message: str,
    now: datetime,
) -> None:
    """Add or update a condition; lastTransitionTime changes only when the status value does."""
    for i, c in enumerate(status.conditions):
        if c.type == ctype:
            when = c.last_transition_time if c.status == value else now
            status.conditions[i] = Condition(
                type=ctype,
                status=value,
                reason=reason,
                message=message,
                last_transition_time=when,
                observed_generation=status.observed_generation,
            )
            return
    status.conditions.append(
        Condition(
            type=ctype,
            status=value,
            reason=reason,
            message=message,
            last_transition_time=now,
            observed_generation=status.observed_generation,
        )
    )


def mark_running(status: FederatedJobStatus, message: str, now: datetime) -> None:
    set_condition(status, READY, "False", "RoundInProgress", message, now)
    set_condition(status, RECONCILING, "True", "RoundInProgress", message, now)
    set_condition(status, STALLED, "False", "RoundInProgress", "", now)


def mark_starting(status: FederatedJobStatus, message: str, now: datetime) -> None:
    """A local runner holds the job and gets it ready (phase Pending): not Ready yet, Reconciling."""
    status.phase = "Pending"
    status.message = message
    set_condition(status, READY, "False", STARTING, message, now)
    set_condition(status, RECONCILING, "True", STARTING, message, now)
    set_condition(status, STALLED, "False", STARTING, "", now)


def mark_succeeded(status: FederatedJobStatus, message: str, now: datetime) -> None:
    status.phase = "Succeeded"
    set_condition(status, READY, "True", "Succeeded", message, now)
    set_condition(status, RECONCILING, "False", "Succeeded", "", now)
    set_condition(status, STALLED, "False", "Succeeded", "", now)


def mark_halted(
    status: FederatedJobStatus, phase: Literal["Failed", "Stopped"], reason: str, message: str, now: datetime
) -> None:
    """Nothing runs any more: the job Failed (final), or its controller Stopped before the job ended (local
    mode: nothing is lost, it resumes). Either way not Ready, not Reconciling, Stalled, saying why."""
    status.phase = phase
    status.message = message
    set_condition(status, READY, "False", reason, message, now)
    set_condition(status, RECONCILING, "False", reason, "", now)
    set_condition(status, STALLED, "True", reason, message, now)
