"""Full fine-tuning's final model in transformers layout, assembled without torch.

The weights are the last global (the aggregator's safetensors, which transformers reads as
model.safetensors). The small files beside them (config.json, generation_config.json, the
tokenizer's files) are written at init by the party that uploads global 0, where the model and
tokenizer are loaded, and travel as one JSON bundle {file name: base64 bytes}; the control plane
unpacks it into final/ with no ML library.
"""

from __future__ import annotations

import base64
import binascii
import json
import re

FINAL_MODEL = "model.safetensors"
# A tokenizer.json of a large vocabulary is tens of MiB; anything far beyond is not config.
MAX_BUNDLE_BYTES = 256 * 1024 * 1024
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# What the bundle may not overwrite in final/: the weights, and fedtune's own reports.
RESERVED = frozenset({FINAL_MODEL, "model.safetensors.index.json", "metrics.json", "metrics.png"})


def pack(files: dict[str, bytes]) -> bytes:
    """The bundle of `files` (flat names only, as a transformers model directory has them)."""
    for name in files:
        _check_name(name)
    return json.dumps({n: base64.b64encode(b).decode() for n, b in sorted(files.items())}).encode()


def unpack(raw: bytes) -> dict[str, bytes]:
    """The files of a bundle; ValueError for anything but a bundle of flat, unreserved names."""
    if len(raw) > MAX_BUNDLE_BYTES:
        raise ValueError(f"the model files bundle has {len(raw)} bytes, more than {MAX_BUNDLE_BYTES}")
    try:
        doc = json.loads(raw)
    except ValueError as exc:
        raise ValueError(f"the model files bundle is not JSON: {exc}") from None
    if not isinstance(doc, dict) or not all(isinstance(v, str) for v in doc.values()):
        raise ValueError("the model files bundle must be an object of file name -> base64 text")
    out = {}
    for name, text in doc.items():
        _check_name(name)
        try:
            out[name] = base64.b64decode(text, validate=True)
        except binascii.Error as exc:
            raise ValueError(f"the model files bundle: {name} is not base64 ({exc})") from None
    return out


def _check_name(name: str) -> None:
    if not _NAME.match(name) or name in RESERVED or ".." in name:
        raise ValueError(f"the model files bundle may not hold a file named {name!r}")
