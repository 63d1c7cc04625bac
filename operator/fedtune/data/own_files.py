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
from fedtune.api.records import DataError, check_records

if TYPE_CHECKING:
    from fedtune.storage.s3 import Bucket


@dataclass
class OwnSplit:
    """One split of one party: what is uploaded, and its records (for summaries)."""

    key: str
    body: bytes
    records: list[dict]
    shown: str  # the path as the job file wrote it


def _files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix == ".jsonl" and p.is_file())
        if not files:
            raise DataError(f"{path}: a directory with no *.jsonl files")
        return files
    if not path.is_file():
        raise DataError(f"{path}: no such file or directory")
    return [path]


def read_split(party: Party, written: str, key: str, job: FederatedJob, base_dir: Path) -> OwnSplit:
    """Read and check one split; a problem is a SpecError naming the party, the file and the line."""
    path = Path(written).expanduser()
    path = path if path.is_absolute() else base_dir / path
    spec = job.spec
    try:
        bodies, records = [], []
        for f in _files(path):
            body = f.read_bytes()
            records += check_records(body, spec.data, spec.model.task, source=str(f))
            bodies.append(body if body.endswith(b"\n") else body + b"\n")  # non-empty: checked above
    except (DataError, OSError) as exc:
        raise SpecError(f"Party {party.key}: {exc}") from None
    return OwnSplit(key=key, body=b"".join(bodies), records=records, shown=written)


def read_own_data(
    job: FederatedJob, parties: list[Party], base_dir: Path, evaluator: Party | None = None
) -> dict[str, tuple[OwnSplit | None, OwnSplit]]:
    """party key -> (train, eval) for parties that name their own files; all of them or none.

    The evaluator (spec.evaluator), if it names a file, gets (None, its held-out test set).
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
    out: dict[str, tuple[OwnSplit | None, OwnSplit]] = {}
    for p in own:
        d = p.spec.data
        out[p.key] = (
            read_split(p, d.train_path, d.train_key, job, base_dir),
            read_split(p, d.eval_path, d.eval_key, job, base_dir),
        )
    if evaluator is not None and evaluator.spec.data.eval_path is not None:
        d = evaluator.spec.data
        out[evaluator.key] = (None, read_split(evaluator, d.eval_path, d.eval_key, job, base_dir))
    return out


def upload_own_data(splits: Mapping[str, tuple[OwnSplit | None, OwnSplit]], buckets: Mapping[str, Bucket]) -> None:
    """Each party's splits into its own bucket, through its own credentials (a thread per party)."""

    def upload(key: str) -> None:
        for split in splits[key]:
            if split is not None:
                buckets[key].put_bytes(split.key, split.body)

    with ThreadPoolExecutor(max_workers=min(8, len(splits) or 1)) as pool:
        list(pool.map(upload, splits))
