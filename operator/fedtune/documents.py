"""Read FederatedJob, Party and Dataset documents from YAML, with errors that point at the document."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from fedtune.api.errors import SpecError, describe
from fedtune.api.job import FederatedJob
from fedtune.api.party import Party

KINDS = ("FederatedJob", "Party", "Dataset")


@dataclass
class Documents:
    """The resources of one job file."""

    job: FederatedJob
    parties: dict[str, Party]  # namespace/name -> Party
    dataset: Any | None = None  # fedtune.api.dataset.Dataset
    base_dir: Path | None = None  # the job file's directory: relative paths in it are relative to it
    source: str = "<input>"  # the job file as named: what messages call it

    @property
    def real_storage(self) -> bool:
        """Some bucket of the file is a real store (an endpoint or a credentials Secret, as on Kubernetes):
        local mode fills in neither, and a local-mode file names neither."""
        stores = [p.spec.storage for p in self.parties.values()]
        if self.job.spec.storage is not None:
            stores.append(self.job.spec.storage)
        return any(s.endpoint or s.credentials_secret for s in stores)

    @property
    def runs_here(self) -> bool:
        """The file runs on this machine, model included: its Parties bring their own files, or it deals a
        Dataset out into local mode's buckets. A Dataset beside real stores is for `fedtune data partition`
        (a Kubernetes trial: the shards go to the parties' buckets and the job runs on the cluster)."""
        own = any(p.spec.data.train_path or p.spec.data.eval_path for p in self.parties.values())
        return own or (self.dataset is not None and not self.real_storage)


def _model_for(kind: str):
    if kind == "FederatedJob":
        return FederatedJob
    if kind == "Party":
        return Party
    from fedtune.api.dataset import Dataset

    return Dataset


def _test_set_problem(job: FederatedJob, parties: dict[str, Party], dataset: Any | None) -> str | None:
    """The evaluator's held-out test set comes from exactly one place: its own file or the Dataset."""
    held_out = dataset is not None and dataset.spec.test_samples is not None
    if job.evaluator_key is None:
        if held_out:
            return (
                f"Dataset {dataset.metadata.name}: spec.testSamples holds a test set out, but the job names no "
                "evaluator to hold it: add spec.evaluator (a Party of the file that never trains) or drop testSamples"
            )
        return None
    own = parties[job.evaluator_key].spec.data.eval_path is not None
    if own and held_out:
        return (
            f"the evaluator {job.evaluator_key} names its own test set (spec.data.evalPath) and the Dataset holds "
            "one out too (spec.testSamples): keep one of the two"
        )
    if not own and not held_out:
        return (
            f"spec.evaluator: Party {job.evaluator_key} needs a held-out test set: give it spec.data.evalPath "
            "(a JSON-lines file of its own), or set the Dataset's spec.testSamples to hold one out of the corpus"
        )
    return None


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """A YAML error in one line: what is wrong and where (PyYAML's own text spans several lines)."""
    if not isinstance(exc, yaml.MarkedYAMLError):
        return " ".join(str(exc).split())
    what = ", ".join(x for x in (exc.context, exc.problem) if x)
    mark = exc.problem_mark or exc.context_mark
    return f"{what} (line {mark.line + 1}, column {mark.column + 1})" if mark else what


def parse_documents(text: str, source: str = "<input>", require_parties: bool = True) -> Documents:
    """Parse a multi-document YAML string; raises SpecError naming the document and field.

    `require_parties`: every Party the job names must be in the file (local mode); on Kubernetes
    they live in their organisations' namespaces instead.
    """
    try:
        raw = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        raise SpecError(f"{source}: not valid YAML: {_yaml_problem(exc)}") from None
    jobs, parties, datasets, problems = [], {}, [], []
    for i, doc in enumerate(raw, 1):
        where = f"{source}, document {i}"
        if isinstance(doc, dict) and "fedtune.io/" not in str(doc.get("apiVersion", "fedtune.io/")):
            continue  # built-in objects beside the job (a credentials Secret…): not ours to check
        if not isinstance(doc, dict) or doc.get("kind") not in KINDS:
            kind = doc.get("kind") if isinstance(doc, dict) else type(doc).__name__
            problems.append(f"{where}: kind {kind!r} is not one of {', '.join(KINDS)}")
            continue
        name = (doc.get("metadata") or {}).get("name", "?")
        try:
            obj = _model_for(doc["kind"]).model_validate(doc)
        except ValidationError as exc:
            # One problem: one line; several: a line naming the document, then one line each.
            found = describe(exc)
            sep = "\n  " if "\n" in found else " "
            problems.append(f"{where} ({doc['kind']} {name}):{sep}" + found.replace("\n", "\n  "))
            continue
        if doc["kind"] == "FederatedJob":
            jobs.append(obj)
        elif doc["kind"] == "Party":
            if obj.key in parties:
                problems.append(f"{where}: Party {obj.key} is defined twice")
            parties[obj.key] = obj
        else:
            datasets.append(obj)
    if not problems and len(jobs) != 1:
        problems.append(f"{source}: expected exactly one FederatedJob, found {len(jobs)}")
    if not problems and len(datasets) > 1:
        problems.append(f"{source}: at most one Dataset document, found {len(datasets)}")
    if not problems:
        job = jobs[0]
        missing = [k for k in job.party_keys if k not in parties]
        if missing and require_parties:
            problems.append(
                f"{source}: spec.parties names {', '.join(missing)} but no such Party document is in the file"
            )
        evaluator_missing = job.evaluator_key is not None and job.evaluator_key not in parties
        if evaluator_missing and require_parties:
            problems.append(
                f"{source}: spec.evaluator names {job.evaluator_key} but no such Party document is in the file"
            )
        # Where the test set comes from needs the evaluator's Party only when the job names one.
        if not evaluator_missing:
            if (problem := _test_set_problem(job, parties, datasets[0] if datasets else None)) is not None:
                problems.append(f"{source}: {problem}")
        for key in job.member_keys:  # each party's batch and world, as the operator checks its pod's
            if key in parties:
                try:
                    job.spec.global_batch(parties[key].spec.compute.gpus_per_pod)
                except ValueError as exc:
                    problems.append(f"{source}: Party {key}: {exc}")
    if problems:
        raise SpecError("\n".join(problems))
    return Documents(job=jobs[0], parties=parties, dataset=datasets[0] if datasets else None, source=source)


def load_documents(path: str | Path, require_parties: bool = True) -> Documents:
    """Read and validate a job file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise SpecError(f"cannot read {p}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise SpecError(f"{p}: not UTF-8 text (byte {exc.start}): save the job file as UTF-8") from None
    docs = parse_documents(text, str(p), require_parties)
    docs.base_dir = p.parent
    return docs
