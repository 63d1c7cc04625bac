"""The final/ prefix of a finished job: the last global in the layout its method loads from.

PEFT methods: adapter_model.safetensors + adapter_config.json (PeftModel.from_pretrained).
Full fine-tuning: model.safetensors + the config and tokenizer files of the party's bundle
(transformers' from_pretrained; fedtune.api.full_export). Server-side copies of the weights:
they never pass through the control plane.
"""

from __future__ import annotations

from fedtune.api.full_export import FINAL_MODEL, unpack
from fedtune.api.job import FederatedJob
from fedtune.api.methods import FULL
from fedtune.storage import layout
from fedtune.storage.s3 import Bucket


def export_final(job: FederatedJob, coord: Bucket, rnd: int) -> list[str]:
    """Write final/ from global `rnd` (idempotent); returns what went wrong without stopping it.

    Raises StorageError when the store fails (the caller tries again later).
    """
    uid = job.metadata.uid
    prefix = layout.final_prefix(uid)
    if job.spec.peft.method != FULL:
        coord.copy(layout.global_key(uid, rnd), prefix + layout.FINAL_ADAPTER)
        coord.copy(layout.adapter_config_key(uid), prefix + layout.FINAL_CONFIG)
        return []
    coord.copy(layout.global_key(uid, rnd), prefix + FINAL_MODEL)
    try:
        files = unpack(coord.get_bytes(layout.model_files_key(uid)))
    except ValueError as exc:  # a party's doing: the weights are exported, the rest is reported
        return [f"final/ holds the weights only: {exc}"]
    for name, data in files.items():
        coord.put_bytes(prefix + name, data)
    return []


def final_names(job: FederatedJob, coord: Bucket) -> list[str]:
    """The model files in final/ (not the metrics fedtune writes beside them)."""
    if job.spec.peft.method != FULL:
        return [layout.FINAL_ADAPTER, layout.FINAL_CONFIG]
    prefix = layout.final_prefix(job.metadata.uid)
    skip = {layout.FINAL_METRICS, layout.FINAL_PLOT}
    return [n for key in coord.list(prefix) if (n := key[len(prefix) :]) and "/" not in n and n not in skip]
