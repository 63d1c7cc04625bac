"""Writing party shards into the parties' own buckets, and what was written.

Each party's train and eval records go, as JSON lines, to ``party.spec.data.train_key`` and
``eval_key`` in that party's bucket, through a ``Bucket`` holding that party's credentials: one
party's data is never written with, or readable by, another party's identity.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from fedtune.api.party import Party
from fedtune.data.partition import label_histogram, majority_baseline

if TYPE_CHECKING:  # only for type hints: keeps this module importable without boto3 loaded
    from fedtune.storage.s3 import Bucket

__all__ = ["majority_baseline", "shard_to_jsonl", "upload_shards"]


def shard_to_jsonl(records: Sequence[dict]) -> bytes:
    """Records as UTF-8 JSON lines, one object per line, newline-terminated; same records, same bytes."""
    # ensure_ascii=False keeps non-English text readable in the bucket and no larger than needed.
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")


def _lookup(mapping: Mapping[str, Any], party: Party, what: str) -> tuple[str, Any]:
    """The entry for a party, keyed by ``namespace/name`` or by bare name."""
    for key in (party.key, party.metadata.name):
        if key in mapping:
            return key, mapping[key]
    raise ValueError(f"no {what} for party {party.key}: key it by {party.key!r} or {party.metadata.name!r}")


def upload_shards(
    shards: Mapping[str, tuple[Sequence[dict], Sequence[dict]]],
    parties: Sequence[Party],
    buckets: Mapping[str, Bucket],
    label_key: str = "label",
    labels: Sequence[str] | None = None,
    create_buckets: bool = False,
    test_party: str | None = None,
) -> dict[str, dict]:
    """Upload every party's (train, eval) shard to its own bucket; return a summary per party.

    ``shards`` (e.g. from ``plan_shards``) and ``buckets`` are keyed by ``party.key``
    (``namespace/name``) or by the bare party name. Every party must have both, and every shard a
    party, before anything is written, so a naming mistake uploads nothing. With
    ``create_buckets`` missing buckets are created (local mode); otherwise they must exist.

    The summary, keyed like ``shards``::

        {"party": "ns/alice", "bucket": "alice-data",
         "train": {"key": "data/train.jsonl", "records": 400, "bytes": 51234, "sha256": "…",
                   "labels": {"negative": 210, "positive": 190}},
         "eval":  {…same fields…}}

    ``labels`` orders the label histograms (e.g. the job's ``data.labels``). ``test_party`` (the
    job's evaluator) gets its eval split only: its shard is a held-out test set.
    """
    plan = []
    used: set[str] = set()
    for party in parties:
        shard_key, (train, ev) = _lookup(shards, party, "shard")
        _, bucket = _lookup(buckets, party, "bucket")
        if shard_key in used:
            raise ValueError(f"shard {shard_key!r} matches more than one party")
        used.add(shard_key)
        plan.append((shard_key, party, bucket, train, ev))
    stray = sorted(set(shards) - used)
    if stray:
        known = ", ".join(p.key for p in parties)
        raise ValueError(f"shard(s) for unknown part(y/ies) {', '.join(stray)}; parties: {known}")

    def upload(item) -> dict[str, Any]:
        _, party, bucket, train, ev = item
        bucket.ensure(create=create_buckets)
        summary: dict[str, Any] = {"party": party.key, "bucket": party.spec.storage.bucket}
        data = party.spec.data
        for split, records, key in (("train", train, data.train_key), ("eval", ev, data.eval_key)):
            if split == "train" and party.key == test_party:  # a test set and nothing to train on
                summary[split] = {"key": None, "records": 0, "bytes": 0, "sha256": None, "labels": {}}
                continue
            body = shard_to_jsonl(records)
            summary[split] = {
                "key": key,
                "records": len(records),
                "bytes": len(body),
                "sha256": bucket.put_bytes(key, body),
                "labels": label_histogram(records, label_key, labels),
            }
        return summary

    # One thread per party: each bucket's first write waits for the server to allocate storage.
    with ThreadPoolExecutor(max_workers=min(8, len(plan) or 1)) as pool:
        done = list(pool.map(upload, plan))
    return {item[0]: summary for item, summary in zip(plan, done)}
