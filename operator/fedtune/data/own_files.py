"""Each organisation's own data files in local mode: read, checked against the job, uploaded.

A Party may name its splits on this machine (spec.data.trainPath / evalPath: a JSON-lines file or
a directory of *.jsonl files). Every file is checked before anything starts, and a bad one is an
error naming the party, the file and the line; then each split goes into that party's own bucket,
written with that party's credentials only (fedtune.data.upload's rule for dealt shards too).
"""

from __future__ import annotations

from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fedtune.api.errors import SpecError
from fedtune.api.job import FederatedJob
from fedtune.api.party import Party
from fedtune.api.records import DataError, check_record, check_records

if TYPE_CHECKING:
    from fedtune.storage.s3 import Bucket


@dataclass
class OwnSplit:
    """One split of one party: what is uploaded, and its records (for summaries)."""

    key: str
    body: bytes
    records: list[dict]
    shown: str  # the path as the job file wrote it


def split_files(written: str, base_dir: Path) -> list[Path]:
    """The JSON-lines files of a split as the job file wrote it: one file, or a directory's *.jsonl."""
    path = Path(written).expanduser()
    path = path if path.is_absolute() else base_dir / path
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix == ".jsonl" and p.is_file())
        if not files:
            raise DataError(f"{path}: a directory with no *.jsonl files")
        return files
    if not path.is_file():
        raise DataError(f"{path}: no such file or directory")
    return [path]


def own_splits(parties: list[Party], evaluator: Party | None = None) -> list[tuple[Party, str, str, str]]:
    """(party, setting, path as written, bucket key) of every split the parties name on this machine. Pure.

    Raises SpecError when the parties name them half-way: all of the trainers or none, both splits
    each, and the evaluator (spec.evaluator) its test set alone (evalPath).
    """
    own = [p for p in parties if p.spec.data.train_path is not None]
    if own and len(own) != len(parties):
        missing = ", ".join(p.key for p in parties if p.spec.data.train_path is None)
        raise SpecError(
            f"Parties {missing} name no files of their own (spec.data.trainPath/evalPath) while the others "
            "do: give every party its files, or none and a Dataset document to deal a corpus out"
        )
    for p in parties:
        if p.spec.data.train_path is None and p.spec.data.eval_path is not None:
            raise SpecError(f"Party {p.key}: spec.data.evalPath without trainPath: a party that trains needs both")
    if evaluator is not None and evaluator.spec.data.train_path is not None:
        raise SpecError(
            f"Party {evaluator.key} is the job's evaluator (spec.evaluator) and never trains: remove its "
            "spec.data.trainPath and give its held-out test set as evalPath"
        )
    out = []
    for p in own:
        d = p.spec.data
        out.append((p, "spec.data.trainPath", d.train_path, d.train_key))
        out.append((p, "spec.data.evalPath", d.eval_path, d.eval_key))
    if evaluator is not None and evaluator.spec.data.eval_path is not None:
        d = evaluator.spec.data
        out.append((evaluator, "spec.data.evalPath", d.eval_path, d.eval_key))
    return out


def check_split(party: Party, setting: str, written: str, job: FederatedJob, base_dir: Path) -> None:
    """Check one split a line at a time (nothing is kept); a problem is a SpecError naming the party,
    the setting, the file and the line."""
    from fedtune.data.sources import iter_jsonl

    spec = job.spec
    try:
        for f in split_files(written, base_dir):
            for number, record in iter_jsonl(f):
                check_record(record, spec.data, spec.model.task, number, str(f))
    except (DataError, OSError) as exc:
        raise SpecError(f"Party {party.key}: {setting}: {_said(exc)}") from None


def _said(exc: Exception) -> str:
    return f"{exc.filename}: {exc.strerror}" if isinstance(exc, OSError) and exc.strerror else str(exc)


def read_split(party: Party, setting: str, written: str, key: str, job: FederatedJob, base_dir: Path) -> OwnSplit:
    """Read and check one split; a problem is a SpecError naming the party, the setting, the file and the line."""
    spec = job.spec
    try:
        bodies, records = [], []
        for f in split_files(written, base_dir):
            body = f.read_bytes()
            records += check_records(body, spec.data, spec.model.task, source=str(f))
            bodies.append(body if body.endswith(b"\n") else body + b"\n")  # non-empty: checked above
    except (DataError, OSError) as exc:
        raise SpecError(f"Party {party.key}: {setting}: {_said(exc)}") from None
    return OwnSplit(key=key, body=b"".join(bodies), records=records, shown=written)


def read_own_data(
    job: FederatedJob, parties: list[Party], base_dir: Path, evaluator: Party | None = None
) -> dict[str, tuple[OwnSplit | None, OwnSplit]]:
    """party key -> (train, eval) for parties that name their own files; all of them or none.

    The evaluator (spec.evaluator), if it names a file, gets (None, its held-out test set).
    """
    read: dict[str, list[OwnSplit]] = {}
    for party, setting, written, key in own_splits(parties, evaluator):
        read.setdefault(party.key, []).append(read_split(party, setting, written, key, job, base_dir))
    return {k: (splits[0], splits[1]) if len(splits) == 2 else (None, splits[0]) for k, splits in read.items()}


def upload_own_data(splits: Mapping[str, tuple[OwnSplit | None, OwnSplit]], buckets: Mapping[str, Bucket]) -> None:
    """Each party's splits into its own bucket, through its own credentials (a thread per party)."""

    def upload(key: str) -> None:
        for split in splits[key]:
            if split is not None:
                buckets[key].put_bytes(split.key, split.body)

    with ThreadPoolExecutor(max_workers=min(8, len(splits) or 1)) as pool:
        list(pool.map(upload, splits))
