"""Cutting one corpus into per-party shards. Pure: no I/O, no global random state.

Every random choice comes from a ``numpy.random.Generator`` seeded by the caller, so the same
records and seed always give the same shards. A seed is an int or a sequence of ints (numpy's
``SeedSequence`` entropy): ``plan_shards`` gives each stage and each party its own stream,
``[seed, stage]`` or ``[seed, stage, party]``, so changing one stage never reshuffles another.

Records are passed through, not copied: shards hold the caller's dict objects.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence

import numpy as np

from fedtune.api.dataset import Dataset, DatasetSpec

Seed = int | Sequence[int]
Shards = dict[str, tuple[list[dict], list[dict]]]

# Independent random streams of plan_shards (see module docstring).
_BALANCE, _PARTITION, _CAP, _EVAL, _TEST = 1, 2, 3, 4, 5


def _labels_of(records: Sequence[dict], label_key: str) -> list[str]:
    out = []
    for i, rec in enumerate(records):
        if label_key not in rec:
            raise ValueError(f"record {i} has no {label_key!r} field; label-based steps need it on every record")
        out.append(str(rec[label_key]))
    return out


def label_histogram(
    records: Sequence[dict], label_key: str = "label", labels: Sequence[str] | None = None
) -> dict[str, int]:
    """Records per label. With ``labels``: those first, in that order (zeros included), then others sorted.

    Records without ``label_key`` are not counted.
    """
    counts = Counter(str(r[label_key]) for r in records if label_key in r)
    order = list(labels or []) + sorted(set(counts) - set(labels or []))
    return {lab: counts.get(lab, 0) for lab in order}


def label_skew(parts: Sequence[Sequence[dict]], label_key: str = "label") -> float:
    """Mean total-variation distance between each part's label distribution and the pooled one.

    0 means every part looks like the whole; 1 means parts share no labels. Empty parts are skipped.
    """
    pooled = label_histogram([r for p in parts for r in p], label_key)
    classes = list(pooled)
    total = sum(pooled.values())
    if not total:
        return 0.0
    glob = np.array([pooled[c] for c in classes], dtype=float) / total
    dists = []
    for part in parts:
        hist = label_histogram(part, label_key)
        n = sum(hist.values())
        if n:
            local = np.array([hist.get(c, 0) for c in classes], dtype=float) / n
            dists.append(0.5 * float(np.abs(local - glob).sum()))
    return float(np.mean(dists)) if dists else 0.0


def filter_labels(records: Sequence[dict], labels: Sequence[str], label_key: str = "label") -> list[dict]:
    """Only the records whose label is in ``labels`` (all of them when ``labels`` is empty).

    Raises ValueError when a listed label has no record, naming the labels that exist.
    """
    if not labels:
        return list(records)
    have = label_histogram(records, label_key)
    missing = [lab for lab in labels if not have.get(lab)]
    if missing:
        raise ValueError(
            f"label(s) {', '.join(missing)} not found in the data; it has: {', '.join(have) or 'no labels'}"
        )
    keep = set(labels)
    return [r for r in records if label_key in r and str(r[label_key]) in keep]


def balance(records: Sequence[dict], label_key: str = "label", seed: Seed = 0) -> list[dict]:
    """Downsample every class to the size of the smallest one; kept records stay in input order.

    After this, always guessing one class is right 1/num_classes of the time.
    """
    labs = np.array(_labels_of(records, label_key))
    if not len(labs):
        return []
    rng = np.random.default_rng(seed)
    classes = sorted(set(labs.tolist()))
    size = min(int((labs == c).sum()) for c in classes)
    keep = np.concatenate([rng.choice(np.flatnonzero(labs == c), size=size, replace=False) for c in classes])
    return [records[i] for i in np.sort(keep)]


def partition_iid(records: Sequence[dict], n_parties: int, seed: Seed = 0) -> list[list[dict]]:
    """Shuffle and deal into ``n_parties`` shards whose sizes differ by at most one."""
    _check_parties(records, n_parties)
    order = np.random.default_rng(seed).permutation(len(records))
    return [[records[i] for i in chunk] for chunk in np.array_split(order, n_parties)]


def partition_dirichlet(
    records: Sequence[dict],
    n_parties: int,
    alpha: float,
    seed: Seed = 0,
    label_key: str = "label",
    min_per_party: int = 10,
) -> list[list[dict]]:
    """Label-skewed shards: for each class, party shares are drawn from Dir(alpha, ..., alpha).

    Small alpha (0.1) gives each party a few dominant classes; large alpha (100) approaches iid.

    Minimum-size rule: every party ends with at least ``m = min(min_per_party, len(records) //
    n_parties)`` records. A party below ``m`` after the draw is topped up with records chosen at
    random from the currently largest party, which never drops below ``m`` itself. This always
    terminates (a deficit implies the largest party holds more than ``m``), is deterministic, and
    moves at most ``m * n_parties`` records, so the skew is barely softened. Redrawing until every
    party is big enough, the usual alternative, can loop for a long time with small alpha.
    """
    _check_parties(records, n_parties)
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0 (got {alpha})")
    if min_per_party < 0:
        raise ValueError(f"min_per_party must be >= 0 (got {min_per_party})")
    labs = np.array(_labels_of(records, label_key))
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[] for _ in range(n_parties)]
    for cls in sorted(set(labs.tolist())):
        idx = rng.permutation(np.flatnonzero(labs == cls))
        shares = rng.dirichlet(np.full(n_parties, float(alpha)))
        cuts = np.round(np.cumsum(shares)[:-1] * len(idx)).astype(int)
        for k, chunk in enumerate(np.split(idx, cuts)):
            parts[k].extend(chunk.tolist())

    floor = min(min_per_party, len(records) // n_parties)
    for k in range(n_parties):
        while len(parts[k]) < floor:
            donor = max(range(n_parties), key=lambda j: (len(parts[j]), -j))
            give = min(floor - len(parts[k]), len(parts[donor]) - floor)
            moved = set(rng.choice(len(parts[donor]), size=give, replace=False).tolist())
            parts[k].extend(parts[donor][i] for i in sorted(moved))
            parts[donor] = [x for i, x in enumerate(parts[donor]) if i not in moved]
    # Shuffle within each shard so a party's file is not sorted by class.
    return [[records[i] for i in rng.permutation(np.array(p, dtype=int))] for p in parts]


def split_eval(shard: Sequence[dict], eval_fraction: float, seed: Seed = 0) -> tuple[list[dict], list[dict]]:
    """Split one party's shard into (train, eval), eval holding ``round(len * eval_fraction)`` records.

    A shard of two or more records always keeps at least one record on each side.
    """
    if not 0 < eval_fraction < 1:
        raise ValueError(f"eval_fraction must be between 0 and 1, exclusive (got {eval_fraction})")
    n = len(shard)
    n_eval = int(round(n * eval_fraction))
    if n >= 2:
        n_eval = min(max(n_eval, 1), n - 1)
    order = np.random.default_rng(seed).permutation(n)
    return [shard[i] for i in order[n_eval:]], [shard[i] for i in order[:n_eval]]


def plan_shards(
    records: Sequence[dict],
    dataset: Dataset | DatasetSpec,
    party_names: Sequence[str],
    test_party: str | None = None,
) -> Shards:
    """Apply a Dataset spec: labels filter, balance, held-out test set, partition, per-party cap, eval split.

    Returns ``{party_name: (train_records, eval_records)}`` in ``party_names`` order. With
    ``samplesPerParty: S`` each shard is first cut (at random) to ``ceil(S / (1 - evalFraction))``
    records, so the train split holds exactly S records when the party has enough data and the
    eval split keeps the requested fraction. With ``testSamples: T`` and a ``test_party``, T records
    drawn at random before partitioning become ``test_party``'s ``([], test_records)``: no party's
    shard holds any of them.
    """
    spec = dataset.spec if isinstance(dataset, Dataset) else dataset
    names = list(party_names)
    if len(set(names)) != len(names) or test_party in names:
        raise ValueError(f"party names must be unique (got {', '.join(names)}, test party {test_party})")
    key, seed = spec.label_field, spec.seed

    recs = filter_labels(records, spec.labels, key)
    if spec.balance:
        recs = balance(recs, key, seed=[seed, _BALANCE])
    test: list[dict] | None = None
    if spec.test_samples and test_party is not None:
        if spec.test_samples >= len(recs):
            raise ValueError(
                f"testSamples ({spec.test_samples}) takes every record ({len(recs)} after the labels filter and "
                "balancing): lower it so the parties keep data to train on"
            )
        held = np.random.default_rng([seed, _TEST]).permutation(len(recs))
        test = [recs[i] for i in np.sort(held[: spec.test_samples])]
        recs = [recs[i] for i in np.sort(held[spec.test_samples :])]
    if spec.partition.method == "dirichlet":
        parts = partition_dirichlet(
            recs, len(names), spec.partition.alpha, [seed, _PARTITION], key, spec.partition.min_per_party
        )
    else:
        parts = partition_iid(recs, len(names), [seed, _PARTITION])

    shards: Shards = {}
    for i, (name, part) in enumerate(zip(names, parts)):
        if spec.samples_per_party is not None:
            cap = math.ceil(spec.samples_per_party / (1 - spec.eval_fraction))
            if len(part) > cap:
                pick = np.random.default_rng([seed, _CAP, i]).choice(len(part), size=cap, replace=False)
                part = [part[j] for j in np.sort(pick)]
        train, ev = split_eval(part, spec.eval_fraction, [seed, _EVAL, i])
        if spec.samples_per_party is not None:
            train = train[: spec.samples_per_party]  # rounding of the eval split can leave one extra
        shards[name] = (train, ev)
    if test is not None:
        shards[test_party] = ([], test)
    return shards


def majority_baseline(shards: Mapping[str, tuple[Sequence[dict], Sequence[dict]]], label_key: str = "label") -> float:
    """Accuracy of always answering the most frequent label, over every party's eval records.

    The bar a classifier must clear; 1/num_classes for balanced iid data.
    """
    hist = label_histogram([r for _, ev in shards.values() for r in ev], label_key)
    total = sum(hist.values())
    if not total:
        raise ValueError(f"no labelled eval records (field {label_key!r}): no majority baseline")
    return max(hist.values()) / total


def _check_parties(records: Sequence[dict], n_parties: int) -> None:
    if n_parties < 1:
        raise ValueError(f"need at least one party (got {n_parties})")
    if len(records) < n_parties:
        raise ValueError(f"{len(records)} records cannot give each of {n_parties} parties at least one")
