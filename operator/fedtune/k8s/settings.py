"""Operator configuration: one documented model, read from FEDTUNE_* environment variables."""

from __future__ import annotations

import os

from pydantic import BaseModel, Field

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

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> OperatorSettings:
        env = os.environ if environ is None else environ
        values = {name: env[PREFIX + name.upper()] for name in cls.model_fields if PREFIX + name.upper() in env}
        return cls.model_validate(values)
