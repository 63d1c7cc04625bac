"""Checks an uploaded adapter must pass before it may touch the global model.

Bytes from a party are untrusted: they are parsed only as safetensors (a JSON header plus
raw buffers, nothing executable; never pickle or torch.load), and must match the hash the
party reported, the reference adapter's tensor names, shapes and dtypes, and hold finite
values. Compressed updates (bf16, int8: see `compression`) are decoded to the reference's
dtypes first, so every check runs on what the strategies will see. Every refusal says who
sent what and what was expected. `load_verified` checks bytes in memory; `open_verified` a
downloaded file, which it leaves on disk and reads one tensor at a time (see `tensorfile`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors

from fedtune_trainer.compression import CompressionError, decode, read_metadata
from fedtune_trainer.tensorfile import Spec, TensorFile, specs_of

_SHOWN = 3  # names listed in one message before "… and N more"


class UpdateRejected(ValueError):
    """An update that failed verification; `str()` is a reason a person can act on."""


def _names(names: list[str]) -> str:
    shown = ", ".join(names[:_SHOWN])
    return shown + (f" … and {len(names) - _SHOWN} more" if len(names) > _SHOWN else "")


def _dtype(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _summary(problems: list[str]) -> str:
    text = "; ".join(problems[:_SHOWN])
    return text + (f"; and {len(problems) - _SHOWN} more problem(s)" if len(problems) > _SHOWN else "")


def _structure_problems(specs: Mapping[str, Spec], reference: Mapping[str, Spec]) -> list[str]:
    problems = []
    missing = sorted(set(reference) - set(specs))
    extra = sorted(set(specs) - set(reference))
    if missing:
        problems.append(f"{len(missing)} tensor(s) missing: {_names(missing)}")
    if extra:
        problems.append(f"{len(extra)} unexpected tensor(s): {_names(extra)}")
    for name in sorted(set(specs) & set(reference)):
        got, want = specs[name], reference[name]
        if got.shape != want.shape:
            problems.append(f"tensor {name} has shape {got.shape}, expected {want.shape}")
        if got.dtype != want.dtype:
            problems.append(f"tensor {name} has dtype {_dtype(got.dtype)}, expected {_dtype(want.dtype)}")
    return problems


def _finite_problems(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """Non-finite values, reading one tensor at a time (a TensorFile holds only that one in memory)."""
    problems = []
    for name in sorted(tensors):
        t = tensors[name]
        if not t.is_floating_point() or bool(torch.isfinite(t).all()):
            continue
        nan = int(torch.isnan(t).sum())
        inf = int(torch.isinf(t).sum())
        what = " and ".join(part for part in (f"{nan} NaN" if nan else "", f"{inf} Inf" if inf else "") if part)
        problems.append(f"tensor {name} holds {what} value(s)")
    return problems


def _check_sha256(got: str, expected: str | None, source: str) -> None:
    if expected is not None and got != expected.lower():
        raise UpdateRejected(
            f"{source}: sha256 mismatch: expected {expected[:12]}…, got {got[:12]}… "
            "(the object was altered or replaced after its receipt was written)"
        )


def _not_safetensors(exc: Exception, source: str) -> UpdateRejected:
    detail = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
    return UpdateRejected(f"{source}: not a valid safetensors file ({detail})")


def _check_contents(tensors: Mapping[str, torch.Tensor], reference: Mapping[str, Spec] | None, source: str) -> None:
    """Names, shapes and dtypes against `reference` (None skips them), then finite values."""
    if not tensors:
        raise UpdateRejected(f"{source}: holds no tensors (an empty update)")
    problems = _structure_problems(specs_of(tensors), reference) if reference is not None else []
    if problems:
        raise UpdateRejected(f"{source}: does not match the global adapter: {_summary(problems)}")
    try:
        problems = _finite_problems(tensors)
    except CompressionError as exc:  # a lazily decoded tensor fails when it is read
        raise UpdateRejected(f"{source}: cannot decode the compressed update: {exc}") from None
    if problems:
        raise UpdateRejected(f"{source}: {_summary(problems)}")


def _dtypes(reference: Mapping[str, Spec] | None) -> dict[str, torch.dtype] | None:
    return {name: spec.dtype for name, spec in reference.items()} if reference is not None else None


def load_verified(
    data: bytes,
    expected_sha256: str | None,
    reference: Mapping[str, torch.Tensor] | None,
    *,
    source: str = "update",
) -> dict[str, torch.Tensor]:
    """Parse `data` as safetensors after checking it; raise UpdateRejected with the reason.

    Checks, in order: not empty; sha256 equals `expected_sha256` (None skips this, for objects
    whose hash the control plane does not know); a valid safetensors file holding at least one
    tensor; a consistent compression, decoded to the reference's dtypes; the same tensor names,
    shapes and dtypes as `reference` (None skips this, e.g. for the global adapter, which is
    itself the reference); finite values in every float tensor.
    Messages start with `source`, e.g. "update from alice".
    """
    if not data:
        raise UpdateRejected(f"{source}: the object is empty (0 bytes)")
    _check_sha256(hashlib.sha256(data).hexdigest(), expected_sha256, source)
    try:
        tensors = load_safetensors(bytes(data))
    except Exception as exc:  # the parser's error types vary by version; all mean "not safetensors"
        raise _not_safetensors(exc, source) from None
    ref = specs_of(reference) if reference is not None else None
    try:
        tensors = decode(tensors, read_metadata(data), _dtypes(ref))
    except CompressionError as exc:
        raise UpdateRejected(f"{source}: cannot decode the compressed update: {exc}") from None
    _check_contents(tensors, ref, source)
    return tensors


def open_verified(
    path: Path,
    sha256: str,
    expected_sha256: str | None,
    reference: Mapping[str, torch.Tensor] | None,
    *,
    source: str = "update",
) -> TensorFile:
    """The downloaded file at `path` as a TensorFile, after the checks of load_verified.

    `sha256` is the file's, computed while it was downloaded. Names, shapes and dtypes come from
    the headers of the file and of `reference` (a TensorFile reference is not read either);
    finiteness reads one tensor at a time, as every later use does.
    """
    if path.stat().st_size == 0:
        raise UpdateRejected(f"{source}: the object is empty (0 bytes)")
    _check_sha256(sha256, expected_sha256, source)
    ref = specs_of(reference) if reference is not None else None
    try:
        tensors = TensorFile(path, _dtypes(ref))
    except CompressionError as exc:
        raise UpdateRejected(f"{source}: cannot decode the compressed update: {exc}") from None
    except Exception as exc:  # safetensors' error types vary by version; all mean "not safetensors"
        raise _not_safetensors(exc, source) from None
    _check_contents(tensors, ref, source)
    return tensors
