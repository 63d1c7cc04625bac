"""Where a pod computes, and in what precision: chosen once per process, from what it was granted.

A pod granted `nvidia.com/gpu` sees CUDA and trains there; otherwise it uses the CPU. The choice
is logged once. Mixed precision (training.precision) is autocast around the forward passes; the
adapter's weights, their gradients and what travels stay in the adapter's own dtype.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from functools import cache

import torch

log = logging.getLogger(__name__)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@cache
def pick_device() -> torch.device:
    """CUDA when this process can use a GPU, else the CPU; logged the first time it is asked."""
    if torch.cuda.is_available():
        dev = torch.device("cuda", torch.cuda.current_device())
        log.info("device: %s (%s, %d visible)", dev, torch.cuda.get_device_name(dev), torch.cuda.device_count())
    else:
        dev = torch.device("cpu")
        log.info("device: cpu (%d thread(s))", torch.get_num_threads())
    return dev


def model_device(model: torch.nn.Module) -> torch.device:
    """The device the model's weights are on (where its batches must go)."""
    return next(model.parameters()).device


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@contextlib.contextmanager
def autocast(device: torch.device, precision: str) -> Iterator[None]:
    """Mixed precision for the forward pass (a no-op at fp32)."""
    if precision == "fp32":
        yield
        return
    with torch.autocast(device_type=device.type, dtype=DTYPES[precision]):
        yield
