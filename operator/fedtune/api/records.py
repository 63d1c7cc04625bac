"""JSON-lines example records: parsing and the checks against a job's data schema.

Pure (no torch): the trainer parses its downloaded splits with it, and local mode checks each
organisation's own files with it before uploading them, so a bad line is found before any pod
starts, with the same message naming the file and the line.
"""

from __future__ import annotations

import json
from typing import Any

from fedtune.api.job import DataSchema


class DataError(ValueError):
    """The data does not fit the job's data schema; the message names the line."""


def parse_line(line: bytes | str, number: int, source: str = "data") -> dict[str, Any] | None:
    """The JSON object of one line (None for a blank line); a malformed line is an error naming it."""
    if isinstance(line, bytes):
        try:
            line = line.rstrip(b"\r\n").decode("utf-8")  # JSON's columns then count on this line alone
        except UnicodeDecodeError as exc:
            raise DataError(f"{source} line {number}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if not line.strip():
        return None
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"{source} line {number}: invalid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{source} line {number}: expected a JSON object, got {type(obj).__name__}")
    return obj


def parse_jsonl(data: bytes, source: str = "data") -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) for every non-blank line; a malformed line is an error naming it."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{source}: not UTF-8 text ({exc})") from None
    records = []
    # Lines end at "\n" only: str.splitlines would also cut at U+2028 and friends, legal inside JSON strings.
    for number, line in enumerate(text.split("\n"), start=1):
        if (obj := parse_line(line, number, source)) is not None:
            records.append((number, obj))
    if not records:
        raise DataError(f"{source}: no examples (empty file)")
    return records


def field(record: dict[str, Any], name: str, number: int, source: str, setting: str = "") -> Any:
    """A record's field, or an error naming the line, the fields it has and the `setting` that names it."""
    if name not in record:
        named = f", named by {setting}" if setting else ""
        raise DataError(
            f"{source} line {number}: missing field {name!r} (has: {', '.join(sorted(record)) or 'none'}){named}"
        )
    return record[name]


def label_name(label: Any) -> str | None:
    """A label as a class name: a string as it is, a JSON integer as its digits; None for anything else."""
    # JSON numbers are accepted for numeric class names ("0", "1", ...); booleans never are.
    if isinstance(label, int) and not isinstance(label, bool):
        return str(label)
    return label if isinstance(label, str) else None


def label_id(record: dict[str, Any], schema: DataSchema, number: int, source: str) -> int:
    """The class id of a classification record's label, or an error naming the allowed labels."""
    label = field(record, schema.label_field, number, source, "the job's spec.data.labelField")
    key = label_name(label)
    if key not in schema.labels:
        raise DataError(
            f"{source} line {number}: unknown label {label!r} in field {schema.label_field!r}; "
            f"allowed labels: {', '.join(schema.labels)}"
        )
    return schema.labels.index(key)


def check_record(record: dict[str, Any], schema: DataSchema, task: str, number: int, source: str = "data") -> None:
    """One record against the job's data schema for `task`: its fields, and a known label."""
    if task == "sequence-classification":
        field(record, schema.text_field, number, source, "the job's spec.data.textField")
        label_id(record, schema, number, source)
    else:
        field(record, schema.prompt_field, number, source, "the job's spec.data.promptField")
        if not str(field(record, schema.response_field, number, source, "the job's spec.data.responseField")):
            raise DataError(f"{source} line {number}: empty {schema.response_field!r}: nothing to learn from")


def check_records(data: bytes, schema: DataSchema, task: str, source: str = "data") -> list[dict[str, Any]]:
    """The records of a JSON-lines split, each checked against the schema for `task`."""
    records = parse_jsonl(data, source)
    for number, record in records:
        check_record(record, schema, task, number, source)
    return [record for _, record in records]
