"""Party reconcile: can the operator reach the party's bucket with the party's own credentials?"""

from __future__ import annotations

import asyncio
from datetime import datetime

from fedtune.api.party import Party, PartyStatus
from fedtune.api.status import Condition, FederatedJobStatus
from fedtune.k8s.kube import Kube
from fedtune.k8s.preconditions import InvalidSpec, Wait, read_credentials
from fedtune.rounds.conditions import set_condition
from fedtune.storage.s3 import Bucket, StorageError


def _set(st: PartyStatus, ctype: str, value: str, reason: str, message: str, now: datetime) -> None:
    # Conditions work the same on both kinds; reuse the job's helper through a shim status.
    shim = FederatedJobStatus(conditions=list(st.conditions), observed_generation=st.observed_generation)
    set_condition(shim, ctype, value, reason, message, now)
    st.conditions = [Condition.model_validate(c.model_dump()) for c in shim.conditions]


async def reconcile_party(body: dict, kube: Kube, now: datetime) -> PartyStatus:
    """The Party's status: Ready when its bucket answers to its credentials (created if missing)."""
    party = Party.model_validate({k: v for k, v in body.items() if k != "status"})
    st = PartyStatus(
        observed_generation=body["metadata"].get("generation"),
        conditions=(PartyStatus.model_validate(body.get("status") or {}).conditions if body.get("status") else []),
    )
    try:
        creds = await read_credentials(kube, party.metadata.namespace, party.spec.storage, f"Party {party.key}")
        bucket = await asyncio.to_thread(Bucket, party.spec.storage, creds)
        await asyncio.to_thread(bucket.ensure, True)
    except (Wait, InvalidSpec, StorageError) as exc:
        reason = exc.reason if isinstance(exc, Wait) else type(exc).__name__
        st.phase = "Error"
        _set(st, "StorageReady", "False", reason, str(exc), now)
        _set(st, "Ready", "False", reason, str(exc), now)
        # kstatus: Stalled = needs a person (credentials, bucket); Flux then fails fast instead of timing out.
        _set(st, "Stalled", "True", reason, str(exc), now)
        _set(st, "Reconciling", "False", reason, "", now)
        return st
    st.phase = "Ready"
    msg = f"bucket {party.spec.storage.bucket} reachable with the party's credentials"
    _set(st, "StorageReady", "True", "BucketReachable", msg, now)
    _set(st, "Ready", "True", "BucketReachable", msg, now)
    _set(st, "Stalled", "False", "BucketReachable", "", now)
    _set(st, "Reconciling", "False", "BucketReachable", "", now)
    return st
