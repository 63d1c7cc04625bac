"""A job file's data, checked before anything starts: by `fedtune validate`, `fedtune run` and
`fedtune data partition` alike.

Every problem is one line naming the job file, the document, the field and the data file (and the
line, where one line is at fault). Files are read a line at a time and only counts are kept, so a
large corpus is checked in little memory. The rules are the ones enforced later: each record
against the job's schema (fedtune.api.records, what the trainer reads) and, for a Dataset, what
dealing it out needs (fedtune.data.partition). `DatasetTally` is pure; the functions below it read.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedtune.api.dataset import DatasetSpec
from fedtune.api.errors import SpecError
from fedtune.api.job import FederatedJob
from fedtune.api.records import DataError, check_record, field, label_name

if TYPE_CHECKING:
    from fedtune.documents import Documents

MAX_LABELS_KEPT = 1000  # distinct labels counted; a field of free text must not fill the memory
SHOWN = 8  # labels named in one message


def _names(labels: Any) -> str:
    labels = list(labels)
    more = f" and {len(labels) - SHOWN} more" if len(labels) > SHOWN else ""
    return ", ".join(map(str, labels[:SHOWN])) + more


class DatasetTally:
    """What dealing a Dataset out needs to know of its records, gathered one record at a time.

    `add` raises DataError for a record the job cannot use (naming its line); `problems` says, once
    every record was added, what is wrong with the whole: labels the Dataset keeps that no record
    has, labels the job does not list, too few records for the parties.
    """

    def __init__(self, spec: DatasetSpec, job: FederatedJob, where: str):
        self.spec, self.job, self.where = spec, job, where
        self.kept = 0  # records that pass the Dataset's labels filter
        self.kept_labels: Counter[str] = Counter()  # their labels (spec.labelField)
        self.all_labels: Counter[str] = Counter()  # every record's, for messages
        self.unknown: dict[str, int] = {}  # label the job does not list -> first line with it

    def add(self, number: int, record: dict[str, Any]) -> None:
        spec, schema, task = self.spec, self.job.spec.data, self.job.spec.model.task
        key = spec.label_field
        label = str(record[key]) if key in record else None
        if label is not None and (label in self.all_labels or len(self.all_labels) < MAX_LABELS_KEPT):
            self.all_labels[label] += 1
        if spec.labels and label not in spec.labels:
            return  # the labels filter drops it
        if label is None and (spec.balance or spec.partition.method == "dirichlet"):
            step = "balance" if spec.balance else "the dirichlet partition"
            field(record, key, number, self.where, f"the Dataset's spec.labelField, which {step} needs on every record")
        self.kept += 1
        if label is not None:
            self.kept_labels[label] += 1
        if task != "sequence-classification":
            check_record(record, schema, task, number, self.where)
            return
        field(record, schema.text_field, number, self.where, "the job's spec.data.textField")
        value = field(record, schema.label_field, number, self.where, "the job's spec.data.labelField")
        if label_name(value) not in schema.labels:
            self.unknown.setdefault(str(value), number)

    def problems(self, parties: int, test_samples: int | None) -> list[str]:
        """What is wrong with the whole, once every record was added; `test_samples` held out for an evaluator."""
        spec, out = self.spec, []
        missing = [lab for lab in spec.labels if not self.kept_labels[lab]]
        if missing and not self.all_labels:
            out.append(
                f"{self.where}: no record has the field {spec.label_field!r} (the Dataset's spec.labelField) that "
                f"its spec.labels ({', '.join(spec.labels)}) filter on: name the field holding the class there"
            )
        elif missing:
            out.append(
                f"{self.where}: label(s) {', '.join(missing)} of the Dataset's spec.labels not found in the data "
                f"(field {spec.label_field!r}); it has: {_names(self.all_labels) or 'no labels'}"
            )
        if self.unknown:
            first = min(self.unknown.values())
            out.append(
                f"{self.where} yields label(s) {_names(self.unknown)} (first at line {first}) that the job's "
                f"spec.data.labels ({', '.join(self.job.spec.data.labels)}) does not list: add them there, or keep "
                "only the job's classes with the Dataset's spec.labels"
            )
        if out:
            return out
        n = self.kept
        if spec.balance and self.kept_labels:
            n = min(self.kept_labels.values()) * len(self.kept_labels)
        if test_samples:
            if test_samples >= n:
                return [
                    f"{self.where}: the Dataset's spec.testSamples ({test_samples}) takes every record ({n} after "
                    "the labels filter and balancing): lower it so the parties keep data to train on"
                ]
            n -= test_samples
        if n < parties:
            return [f"{self.where}: {n} record(s) to deal cannot give each of {parties} parties at least one"]
        return []


def dataset_problems(docs: Documents) -> list[str]:
    """The Dataset's source read through once (a line at a time for a file): its problems, one line each."""
    from fedtune.data.sources import iter_source, source_path

    ds, job = docs.dataset, docs.job
    if ds is None:
        return []
    at = f"{docs.source}: Dataset {ds.metadata.name}: spec.source"
    path = source_path(ds.spec.source)
    tally = DatasetTally(ds.spec, job, str(path) if path is not None else ds.spec.source)
    try:
        for number, record in iter_source(ds.spec.source):
            tally.add(number, record)
    except FileNotFoundError as exc:
        if path is None:  # a corpus whose package is not installed
            return [f"{at}: {exc}"]
        return [
            f"{at}: {path} does not exist (write file:///absolute/path.jsonl, or file://relative/path.jsonl "
            f"from the working directory, {Path.cwd()})"
        ]
    except DataError as exc:
        return [f"{at}: {exc}"]
    except OSError as exc:
        return [f"{at}: cannot read {exc.filename or path}: {exc.strerror}"]
    test = ds.spec.test_samples if job.evaluator_key else None
    return [f"{at}: {p}" for p in tally.problems(len(job.party_keys), test)]


def own_file_problems(docs: Documents) -> list[str]:
    """The parties' own files (spec.data.trainPath, evalPath), each read through once: problems, one line each."""
    from fedtune.data.own_files import check_split, own_splits

    job = docs.job
    parties = [docs.parties[k] for k in job.party_keys if k in docs.parties]
    evaluator = docs.parties.get(job.evaluator_key) if job.evaluator_key else None
    base = docs.base_dir or Path.cwd()
    out = []
    try:
        for party, setting, written, _ in own_splits(parties, evaluator):
            try:
                check_split(party, setting, written, job, base)
            except SpecError as exc:
                out.append(f"{docs.source}: {exc}")
    except SpecError as exc:
        out.append(f"{docs.source}: {exc}")
    return out


def data_problems(docs: Documents) -> list[str]:
    """Every problem of the file's data: the Dataset's source and the parties' own files."""
    return dataset_problems(docs) + own_file_problems(docs)


def check_data(docs: Documents) -> None:
    """Raise SpecError, one line per problem, when the file's data cannot be used as it is."""
    problems = data_problems(docs)
    if problems:
        raise SpecError("\n".join(problems))
