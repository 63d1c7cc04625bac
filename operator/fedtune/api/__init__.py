"""API models (pydantic v2): the one source of truth for FederatedJob, Party and the round protocol."""

from fedtune.api.job import FederatedJob, FederatedJobSpec
from fedtune.api.party import Party, PartySpec
from fedtune.api.status import Condition, FederatedJobStatus, PartyState, RoundRecord

__all__ = [
    "Condition",
    "FederatedJob",
    "FederatedJobSpec",
    "FederatedJobStatus",
    "Party",
    "PartySpec",
    "PartyState",
    "RoundRecord",
]
