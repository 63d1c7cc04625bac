"""Where every object of a job lives. Pure functions; one place to change the layout.

Party bucket:        fedtune/<job>/round-<r>/update.safetensors, …/receipt.json, data/… (its own data),
                     personalization: fedtune/<job>/round-<r>/personal-a<attempt>.safetensors and
                     fedtune/<job>/personal.safetensors (the final one): the personal part, never elsewhere
Coordinator bucket:  fedtune/<job>/job.json, fedtune/<job>/global/<r>.safetensors (+ .json receipt, .state.safetensors),
                     fedtune/<job>/global/adapter_config.json (PEFT) or …/global/model_files.json (full
                     fine-tuning: config and tokenizer files, fedtune.api.full_export), fedtune/<job>/final/…
"""

from __future__ import annotations


def _job(job: str) -> str:
    return f"fedtune/{job}"


def update_key(job: str, rnd: int) -> str:
    return f"{_job(job)}/round-{rnd}/update.safetensors"


def party_receipt_key(job: str, rnd: int) -> str:
    return f"{_job(job)}/round-{rnd}/receipt.json"


def personal_key(job: str, rnd: int, attempt: int) -> str:
    """Personalization: the party's personal part after training round `rnd` (attempt `attempt`), in its own bucket.

    One object per attempt: a retried round never overwrites the part the status names before its receipt is in."""
    return f"{_job(job)}/round-{rnd}/personal-a{attempt}.safetensors"


def final_personal_key(job: str) -> str:
    """Personalization: the party's final personal part, in its own bucket (with the final adapter: its model)."""
    return f"{_job(job)}/personal.safetensors"


def shares_key(job: str, rnd: int, attempt: int) -> str:
    """Secure aggregation: a party's encrypted shares (and their commitments) for one attempt of a round."""
    return f"{_job(job)}/round-{rnd}/secagg-a{attempt}/shares.json"


def reveal_key(job: str, rnd: int, attempt: int) -> str:
    """Secure aggregation: the shares a party reveals to unmask the sum of one attempt of a round."""
    return f"{_job(job)}/round-{rnd}/secagg-a{attempt}/reveal.json"


def global_key(job: str, rnd: int) -> str:
    return f"{_job(job)}/global/{rnd}.safetensors"


def global_receipt_key(job: str, rnd: int) -> str:
    return f"{_job(job)}/global/{rnd}.json"


def state_key(job: str, rnd: int) -> str:
    return f"{_job(job)}/global/{rnd}.state.safetensors"


def adapter_config_key(job: str) -> str:
    return f"{_job(job)}/global/adapter_config.json"


def model_files_key(job: str) -> str:
    """Full fine-tuning: the bundle of the final model's small files (config, tokenizer)."""
    return f"{_job(job)}/global/model_files.json"


def job_key(job: str) -> str:
    """The job as it ran (its spec), beside what it produced."""
    return f"{_job(job)}/job.json"


def final_prefix(job: str) -> str:
    return f"{_job(job)}/final/"


FINAL_ADAPTER = "adapter_model.safetensors"
FINAL_CONFIG = "adapter_config.json"
FINAL_METRICS = "metrics.json"
FINAL_PLOT = "metrics.png"
