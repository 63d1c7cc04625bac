"""The round state machine: pure functions from (spec, status, receipts, now) to the next status.

Shared unchanged by local mode and the Kubernetes operator; all I/O lives at the edges.
"""
