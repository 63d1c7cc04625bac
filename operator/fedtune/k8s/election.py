"""Leader election among operator replicas: the pure rules. The Lease I/O is in `leader.py`.

A standby counts the lease duration from when *it* last saw the Lease change (its own clock, as
client-go does: no comparison of clocks across machines), and looks every retry period. A leader
that died right after a renewal was last seen by the standby at most one retry period later; the
standby then takes the Lease at its first look after a lease duration, at most one more retry
period on. Hence the bound on a handover, counted from the leader's death.
"""

from __future__ import annotations


def handover_bound(lease_duration: float, retry_period: float) -> float:
    """Seconds from the leader's death until a standby holds the Lease, at most (API latency aside)."""
    return lease_duration + 2 * retry_period


def identity(hostname: str, suffix: str) -> str:
    """A candidate's name in the Lease: its pod (the hostname) and a suffix of its own, so that a
    restarted container is a new candidate, not the leader it replaces."""
    return f"{hostname}_{suffix}"


def leadership_lost(me: str, holder: str | None, now: float, renewed: float, renew_deadline: float) -> str | None:
    """Why a leader must stop driving jobs now, or None while it may go on.

    `holder`: who the Lease names, as last read; `renewed`: when this process last saw its own
    renewal succeed (seconds, one monotonic-enough clock with `now`). A leader must stop before any
    standby may take over: another holder means one already did, and a renewal older than the renew
    deadline means one may soon (the deadline is below the lease duration)."""
    if holder != me:
        return f"the Lease now names {holder or 'no holder'}"
    age = now - renewed
    if age > renew_deadline:
        return f"not renewed for {age:.1f}s (renew deadline {renew_deadline:g}s)"
    return None
