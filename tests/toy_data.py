"""A learnable toy sentiment task for fast end-to-end tests (importable helper)."""

from __future__ import annotations

import json
import random

POS = ["great", "love", "happy", "excellent", "wonderful"]
NEG = ["awful", "hate", "sad", "terrible", "horrible"]
FILLER = ["the", "day", "movie", "food", "service", "was", "today", "really", "this", "my"]


def toy_records(n: int, seed: int = 0) -> list[dict]:
    """`n` examples whose label is set by one keyword among filler words."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        words = rng.sample(FILLER, 5) + [rng.choice(POS if i % 2 else NEG)]
        rng.shuffle(words)
        out.append({"text": " ".join(words), "label": "positive" if i % 2 else "negative"})
    return out


def toy_jsonl(n: int, seed: int = 0) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in toy_records(n, seed)).encode()
