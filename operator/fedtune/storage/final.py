"""The final/ prefix of a finished job: the last global in the layout its method loads from.

PEFT methods: adapter_model.safetensors + adapter_config.json (PeftModel.from_pretrained).
Full fine-tuning: model.safetensors + the config and tokenizer files of the party's bundle
(transformers' from_pretrained; fedtune.api.full_export). FedKSeed: fedkseed.safetensors (the per-seed
accumulator), fedkseed.json (what replaying it needs) and the same config and tokenizer files;
`python -m fedtune_trainer.fedkseed FINAL OUT` replays it into a transformers model directory.
Offsite tuning: offsite.safetensors (the emulator's trained adapter layers and head) and offsite.json
(the full model and how the emulator was derived from it); `python -m fedtune_trainer.offsite FINAL
OUT` plugs them into the full model, which only the model owner holds.
Server-side copies of the weights: they never pass through the control plane.
"""

from __future__ import annotations

import json

from fedtune.api.full_export import FINAL_MODEL, unpack
from fedtune.api.job import FederatedJob
from fedtune.api.methods import FEDKSEED, FULL, OFFSITE, fedkseed_params
from fedtune.api.offsite import OFFSITE_DOC, OFFSITE_TENSORS, offsite_params
from fedtune.storage import layout
from fedtune.storage.s3 import Bucket


def export_final(job: FederatedJob, coord: Bucket, rnd: int) -> list[str]:
    """Write final/ from global `rnd` (idempotent); returns what went wrong without stopping it.

    Raises StorageError when the store fails (the caller tries again later).
    """
    uid = job.metadata.uid
    prefix = layout.final_prefix(uid)
    method = job.spec.peft.method
    if method == OFFSITE:  # the emulator's bundle would describe the emulator, not the model it plugs into
        coord.copy(layout.global_key(uid, rnd), prefix + OFFSITE_TENSORS)
        coord.put_bytes(prefix + OFFSITE_DOC, offsite_json(job))
        return []
    if method not in (FULL, FEDKSEED):
        coord.copy(layout.global_key(uid, rnd), prefix + layout.FINAL_ADAPTER)
        coord.copy(layout.adapter_config_key(uid), prefix + layout.FINAL_CONFIG)
        return []
    if method == FEDKSEED:
        coord.copy(layout.global_key(uid, rnd), prefix + FEDKSEED_STEPS)
        coord.put_bytes(prefix + FEDKSEED_REPLAY, fedkseed_replay_json(job))
    else:
        coord.copy(layout.global_key(uid, rnd), prefix + FINAL_MODEL)
    try:
        files = unpack(coord.get_bytes(layout.model_files_key(uid)))
    except ValueError as exc:  # a party's doing: the weights are exported, the rest is reported
        return [f"final/ holds the weights only: {exc}"]
    for name, data in files.items():
        coord.put_bytes(prefix + name, data)
    return []


FEDKSEED_STEPS = "fedkseed.safetensors"
FEDKSEED_REPLAY = "fedkseed.json"


def _rebuild_json(job: FederatedJob, method: str, params: dict[str, float]) -> bytes:
    """The base model as the job built it (its spec, data schema and seed: a new head is seeded) and the method's
    parameters: what turning a final/ of FedKSeed or offsite tuning into a model needs besides its tensors."""
    spec = job.spec
    doc = {"model": spec.model.to_wire(), "data": spec.data.to_wire(), "seed": spec.training.seed, method: params}
    return json.dumps(doc, indent=2, sort_keys=True).encode()


def fedkseed_replay_json(job: FederatedJob) -> bytes:
    """What replaying a FedKSeed accumulator needs besides it: the base model as the parties built it."""
    return _rebuild_json(job, "fedkseed", fedkseed_params(job.spec.peft.config))


def offsite_json(job: FederatedJob) -> bytes:
    """What plugging an offsite adapter back needs besides it: the full model (the owner's source, which the
    parties never saw) and the emulator's derivation, which the plug-back recomputes from the full model."""
    return _rebuild_json(job, "offsite", offsite_params(job.spec.peft.config))


def final_names(job: FederatedJob, coord: Bucket) -> list[str]:
    """The model files in final/ (not the metrics fedtune writes beside them)."""
    if job.spec.peft.method == OFFSITE:
        return [OFFSITE_TENSORS, OFFSITE_DOC]
    if job.spec.peft.method not in (FULL, FEDKSEED):
        return [layout.FINAL_ADAPTER, layout.FINAL_CONFIG]
    prefix = layout.final_prefix(job.metadata.uid)
    skip = {layout.FINAL_METRICS, layout.FINAL_PLOT}
    return [n for key in coord.list(prefix) if (n := key[len(prefix) :]) and "/" not in n and n not in skip]
