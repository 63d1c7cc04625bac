"""Offsite tuning's emulator on this machine: built from the full model by the trainer package, in a child.

`fedtune emulator` builds it on request; `fedtune run` builds it before the pods start when the job's
local model.emulator is not there yet (once per job: a resumed or repeated run finds it). The control
plane never imports torch: `python -m fedtune_trainer emulator` does the work.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from fedtune.api.errors import SpecError
from fedtune.api.job import FederatedJobSpec
from fedtune.api.methods import OFFSITE
from fedtune.api.protocol import TrainerConfig
from fedtune.api.support import local_model_dir


def build(spec: FederatedJobSpec, output: str) -> str:
    """Derive the emulator of spec.model into `output`; returns the trainer's summary (layers kept, bytes).

    SpecError, with the trainer's message, on failure."""
    if spec.peft.method != OFFSITE:
        raise SpecError(f"spec.peft.method is {spec.peft.method}: an emulator is for peft.method offsite")
    try:
        local_model_dir(spec.model.source)
    except FileNotFoundError as exc:
        raise SpecError(f"spec.model.source: {exc}") from None
    # The full model, as the model owner holds it: the one config that names model.source, not the emulator.
    config = TrainerConfig(
        model=spec.model, peft=spec.peft, data=spec.data, training=spec.training, deepspeed=spec.deepspeed
    )
    with tempfile.TemporaryDirectory(prefix="fedtune-emulator-") as tmp:
        path = Path(tmp) / "config.json"
        path.write_text(json.dumps(config.to_wire()))
        argv = [sys.executable, "-m", "fedtune_trainer", "emulator", "--config", str(path), "--output", output]
        done = subprocess.run(argv, check=False, capture_output=True, text=True)
    if done.returncode != 0:
        why = done.stderr.strip().splitlines()[-1:] or [f"exit status {done.returncode}"]
        raise SpecError(f"building the emulator into {output} failed: {why[0].removeprefix('error: ')}")
    return done.stdout.strip().splitlines()[-1] if done.stdout.strip() else f"emulator written to {output}"


def ensure(spec: FederatedJobSpec, say: Callable[[str], None]) -> None:
    """Offsite jobs: build the local model.emulator unless it is there. SpecError for one local mode cannot read."""
    emulator = spec.model.emulator
    if spec.peft.method != OFFSITE or emulator is None:
        return
    if emulator.startswith("s3://"):
        raise SpecError(
            "spec.model.emulator: s3:// sources are read from a real S3 bucket; local mode's embedded S3 starts "
            "empty, so use a directory (file:///path; `fedtune run` builds it there if it is missing)"
        )
    try:
        local_model_dir(emulator)
        return
    except FileNotFoundError:
        if emulator.startswith(("pkg://", "hf://")):
            raise SpecError(f"spec.model.emulator {emulator} is not installed here") from None
    say(f"building the offsite-tuning emulator from {spec.model.source} into {emulator} (once per job) …")
    say(build(spec, emulator.removeprefix("file://")))
