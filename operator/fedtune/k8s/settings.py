"""Operator configuration: one documented model, read from FEDTUNE_* environment variables."""

from __future__ import annotations

import os

from pydantic import BaseModel, Field, model_validator

PREFIX = "FEDTUNE_"


class OperatorSettings(BaseModel):
    """Every knob of the operator. Environment: FEDTUNE_<FIELD_NAME_IN_CAPS>, e.g. FEDTUNE_RESYNC_SECONDS=5."""

    resync_seconds: float = Field(10.0, gt=0, description="Longest wait between two reconciles of a running job.")
    watch_server_timeout: int = Field(300, ge=10, description="Server-side watch timeout (kopf #1276: silent stalls).")
    watch_client_timeout: int = Field(330, ge=10, description="Client-side watch timeout, a bit above the server's.")
    max_pod_restarts: int = Field(5, ge=0, description="Recreations of a failed pod before it is left failed.")
    pod_backoff_seconds: float = Field(2.0, gt=0, description="First delay before recreating a failed pod; doubles.")
    metrics_port: int = Field(9090, ge=0, le=65535, description="Prometheus /metrics port (0 = off).")
    kube_api: str | None = Field(None, description="API server URL for development and tests (insecure, no auth).")
    check_nodes: bool = Field(True, description="Check that some node can hold each pod before creating it.")
    log_format: str = Field("json", pattern="^(json|text)$", description="Log line format.")
    # Leader election (fedtune.k8s.leader): names and timings as client-go's --leader-elect-* flags.
    leader_election: bool = Field(
        False, description="Only the holder of a coordination.k8s.io Lease drives jobs; other replicas stand by."
    )
    leader_election_namespace: str | None = Field(
        None, description="Namespace of the Lease (default: the pod's own, read from its ServiceAccount mount)."
    )
    leader_election_lease: str = Field("fedtune-operator", min_length=1, description="Name of the Lease.")
    lease_duration_seconds: int = Field(
        15, ge=1, description="A standby takes over once the Lease has gone this long without a renewal it saw."
    )
    renew_deadline_seconds: int = Field(
        10, ge=1, description="A leader that has not renewed for this long stops (exits); below the lease duration."
    )
    retry_period_seconds: int = Field(2, ge=1, description="Time between two tries to acquire or renew the Lease.")

    @model_validator(mode="after")
    def _election_timings(self) -> OperatorSettings:
        # The rules of the elector (kubernetes.leaderelection.electionconfig), said before it would sys.exit on them:
        # a leader must give up before a standby may take over, and have time for more than one try.
        if self.renew_deadline_seconds >= self.lease_duration_seconds:
            raise ValueError("renew_deadline_seconds must be below lease_duration_seconds")
        if self.renew_deadline_seconds <= 1.2 * self.retry_period_seconds:
            raise ValueError("renew_deadline_seconds must be above 1.2 x retry_period_seconds")
        return self

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> OperatorSettings:
        env = os.environ if environ is None else environ
        values = {name: env[PREFIX + name.upper()] for name in cls.model_fields if PREFIX + name.upper() in env}
        return cls.model_validate(values)
