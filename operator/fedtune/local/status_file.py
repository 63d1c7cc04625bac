"""A local run's status.json: written whole or not at all, and never left saying Running when nothing runs.

Readers (a person polling it, a dashboard, a resume) see the previous status or the next one, never
a half-written file: each write goes to a temporary file in the same directory, is flushed to disk,
and replaces status.json by rename (atomic on POSIX). The runner marks a status it cannot finish
Stopped itself (Ctrl-C, SIGTERM, a crash); a runner killed outright leaves Running behind, and the
next look at the work directory with the runner's lock free (`settle_lost`) marks it RunnerLost.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path

from fedtune.api.status import FederatedJobStatus
from fedtune.rounds import conditions as cond

STATUS_FILE = "status.json"
LIVE_PHASES = ("Pending", "Running")  # what only a live runner may claim


def write_atomic(path: Path, text: str) -> None:
    """Replace `path` with `text` in one step: a reader or a crash sees the old file or the new, whole.

    One writer at a time (a work directory's writers hold its run lock): the temporary file's name is
    fixed, so one left by a killed writer is simply overwritten by the next write.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a power loss
    finally:
        os.close(dir_fd)


def write_status(workdir: Path, st: FederatedJobStatus) -> str:
    """Write the status atomically; returns the text written."""
    doc = st.model_dump_json(by_alias=True, exclude_none=True, indent=1)
    write_atomic(Path(workdir) / STATUS_FILE, doc)
    return doc


def read_status(workdir: Path) -> FederatedJobStatus:
    """The status in a work directory (OSError, or ValueError for a file that is not a status)."""
    return FederatedJobStatus.model_validate_json((Path(workdir) / STATUS_FILE).read_text(encoding="utf-8"))


def where_stopped(st: FederatedJobStatus, rounds: int | None = None) -> str:
    """Where a run was when its runner stopped: 'while starting' or 'in training of round 3/5'. Pure."""
    if st.phase == "Pending":
        return "while starting"
    return f"in {st.stage} of round {st.current_round}" + (f"/{rounds}" if rounds else "")


def lost_message(st: FederatedJobStatus, holder: dict, last_written: datetime, workdir: Path) -> str:
    """What a status left Running by a runner that is gone says instead. Pure."""
    who = f"pid {holder['pid']}" if "pid" in holder else "its process"
    job_file = holder.get("jobFile", "JOB.yaml")
    return (
        f"the runner ({who}) ended without finishing, {where_stopped(st)}; its last status was written at "
        f"{last_written:%Y-%m-%d %H:%M:%S} UTC. Resume with: fedtune run {job_file} --workdir {workdir}"
    )


def settle_lost(workdir: Path, holder: dict, now: datetime | None = None) -> FederatedJobStatus | None:
    """With the work directory's lock held by the caller: a status still claiming a live runner was left by
    one that is gone (`holder`: what it wrote in the lock). Mark it Stopped (RunnerLost) and return it;
    None when the status already told the truth."""
    st = read_status(workdir)
    if st.phase not in LIVE_PHASES:
        return None
    written = datetime.fromtimestamp((Path(workdir) / STATUS_FILE).stat().st_mtime, UTC)
    now = now or datetime.now(UTC)
    message = lost_message(st, holder, written, Path(workdir).resolve())  # read later, from anywhere
    cond.mark_halted(st, "Stopped", cond.RUNNER_LOST, message, now)
    write_status(workdir, st)
    return st
