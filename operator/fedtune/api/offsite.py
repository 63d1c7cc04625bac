"""Offsite tuning (Xiao et al., 2023): parties train against an emulator, never the full model.

The model owner (the coordinator) derives an emulator from the base model once per job
(`fedtune emulator`): the first and last `adapterLayers` transformer layers stay as they are and
are the adapter, trained and federated; the layers between them, the middle, are compressed by
dropping a `dropRatio` share of them, keeping the rest evenly spaced, frozen. Parties download the
emulator only (it is the model source their tickets name) and train the adapter (and a
classifier's head) on it. The final adapter is plugged back into the full model: emulator layer i
becomes full layer kept[i], which for the adapter layers is a fixed offset.

Pure functions of layer counts, shared by the emulator builder, the plug-back and the validation.
"""

from __future__ import annotations

import math
import re
from typing import Any

from fedtune.api.method_params import Table, method_params

# peft.config of offsite: key -> (default, low, high, whether an integer). Keys in the job's camelCase.
OFFSITE_PARAMS: Table = {
    "adapterLayers": (2, 1, 1024, True),  # k: the first k and the last k layers train
    "dropRatio": (0.5, 0.0, 1.0, False),  # share of the middle layers the emulator drops
}

# A finished job's final/: the trained adapter layers and head (emulator names), and what plugging them needs.
OFFSITE_TENSORS = "offsite.safetensors"
OFFSITE_DOC = "offsite.json"

# The key of a model's config.json that marks it as an emulator and says how it was derived.
CONFIG_KEY = "fedtune_offsite"


def offsite_params(config: dict[str, Any]) -> dict[str, float]:
    """offsite's peft.config with defaults filled in. Raises ValueError naming the field at fault."""
    return method_params("offsite", OFFSITE_PARAMS, config, floats_open_low=False)


def kept_layers(total: int, adapter_layers: int, drop_ratio: float) -> list[int]:
    """The full model's layer indices the emulator keeps, in order: emulator layer i is full layer kept[i].

    The first and last `adapter_layers` always; of the m middle layers round(m·(1 − drop_ratio)), evenly
    spaced (index ⌊j·m/n⌋ of the middle for j < n). ValueError when the model has no middle to compress.
    """
    k = adapter_layers
    if total <= 2 * k:
        most = max((total - 1) // 2, 0)
        raise ValueError(
            f"peft.config.adapterLayers ({k}) leaves no middle to compress in a model of {total} layers: "
            f"the first and last {k} would be all of it; set adapterLayers to at most {most}"
            if most
            else f"a model of {total} layer(s) has no middle to compress: offsite tuning needs at least 3 layers"
        )
    middle = total - 2 * k
    keep = min(middle, math.floor(middle * (1.0 - drop_ratio) + 0.5))
    return [*range(k), *(k + j * middle // keep for j in range(keep)), *range(total - k, total)]


def adapter_map(kept: list[int], adapter_layers: int) -> dict[int, int]:
    """Emulator layer index -> full model layer index, for the adapter layers only (what plugs back)."""
    return {i: kept[i] for i in adapter_layer_indices(len(kept), adapter_layers)}


def adapter_layer_indices(emulator_layers: int, adapter_layers: int) -> list[int]:
    """The emulator's layer indices that train: its first and last `adapter_layers`."""
    return [*range(adapter_layers), *range(emulator_layers - adapter_layers, emulator_layers)]


def plugged_name(name: str, layers_path: str, mapping: dict[int, int]) -> str:
    """A tensor's name in the full model: `<layers_path>.<i>.rest` becomes `<layers_path>.<mapping[i]>.rest`.

    Names outside the layer list (a classifier's head) are the same in both. KeyError for a layer
    that is not an adapter layer: only those train, so only those may travel back.
    """
    m = re.fullmatch(re.escape(layers_path) + r"\.(\d+)\.(.+)", name)
    if m is None:
        return name
    return f"{layers_path}.{mapping[int(m.group(1))]}.{m.group(2)}"
