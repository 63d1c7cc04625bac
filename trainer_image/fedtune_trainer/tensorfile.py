"""A safetensors file on disk, read one tensor at a time: how the aggregator holds P updates at once.

`TensorFile` is a read-only Mapping[str, Tensor]. Opening it reads the header only (names,
shapes, dtypes; safetensors checks that the offsets fit the file). Each access memory-maps the
file, takes one tensor (decoding a compressed update, see `compression`) and closes the handle;
the mapping goes when the caller drops the tensor. Touched pages of a mapping count towards the
process's resident memory for as long as it is mapped, so one handle kept open per file would by
the last tensor hold every file in memory; reopening per access costs a header parse (~30 µs).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from fedtune_trainer.compression import decode_tensor, decoded_dtype, mode_of, payload_names

# safetensors' dtype names (from its format) for every dtype adapters and server states are stored in.
_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass(frozen=True)
class Spec:
    """Shape and dtype of a tensor, known without reading its values."""

    shape: tuple[int, ...]
    dtype: torch.dtype


class _Handle(Mapping[str, torch.Tensor]):
    """An open safe_open handle as a Mapping; membership comes from the header, not from reading."""

    def __init__(self, handle: Any, names: set[str]):
        self._handle, self._names = handle, names

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._handle.get_tensor(name)

    def __contains__(self, name: object) -> bool:
        return name in self._names

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


class TensorFile(Mapping[str, torch.Tensor]):
    """The tensors of a safetensors file, each read from disk when accessed (see the module docstring)."""

    def __init__(self, path: Path, dtypes: Mapping[str, torch.dtype] | None = None):
        """Read the header of `path`. `dtypes`: what a compressed file's tensors decode to (the global's).

        Raises safetensors' error for a file that is not safetensors, ValueError for a dtype no
        adapter is stored in, and CompressionError for an inconsistent compressed file.
        """
        self.path = Path(path)
        self._dtypes = dict(dtypes) if dtypes is not None else None
        with safe_open(self.path, framework="pt") as handle:
            metadata = handle.metadata() or {}
            stored = {name: handle.get_slice(name) for name in handle.keys()}
            stored_specs = {name: (tuple(s.get_shape()), s.get_dtype()) for name, s in stored.items()}
        self.mode = mode_of(metadata)
        self._stored = set(stored_specs)
        self.specs: dict[str, Spec] = {}
        for name in payload_names(stored_specs, self.mode):
            shape, dtype_name = stored_specs[name]
            if dtype_name not in _DTYPES:
                raise ValueError(f"tensor {name} has dtype {dtype_name}, which no adapter is stored in")
            dtype = decoded_dtype(name, _DTYPES[dtype_name], self._stored, self.mode, self._dtypes)
            self.specs[name] = Spec(shape, dtype)

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.specs:
            raise KeyError(name)
        with safe_open(self.path, framework="pt") as handle:
            return decode_tensor(name, _Handle(handle, self._stored), self.mode, self._dtypes)

    def __contains__(self, name: object) -> bool:
        return name in self.specs

    def __iter__(self) -> Iterator[str]:
        return iter(self.specs)

    def __len__(self) -> int:
        return len(self.specs)

    def __repr__(self) -> str:
        return f"TensorFile({str(self.path)!r}, {len(self)} tensors)"


def specs_of(tensors: Mapping[str, torch.Tensor]) -> dict[str, Spec]:
    """Name -> Spec of any name -> tensor mapping; a TensorFile answers from its header, reading nothing."""
    if isinstance(tensors, TensorFile):
        return tensors.specs
    return {name: Spec(tuple(t.shape), t.dtype) for name, t in tensors.items()}
