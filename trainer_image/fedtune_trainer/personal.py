"""Personalised adapters (FedPer, Arivazhagan et al. 2019; FedRep, Collins et al. 2021): shared and personal parts.

The adapter's tensors (peft's saved names, fedtune_trainer.adapters) split in two by name: the
personal part (the classification head, or tensors matching spec.personalization.keep) trains
with the rest but never leaves the party; the shared part is all that is uploaded, aggregated and
sent back as the global adapter. A party's model for a round is the global (shared) part merged
with its own personal part. Both parts train together each round, as in FedPer; FedRep's
alternating schedule (head epochs first, then the body) is not implemented.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping

import torch
from fedtune.api.job import PersonalizationSpec

HEAD_MODULES = ("classifier", "score")  # transformers' classification heads; peft's default modules_to_save
_GLOB = set("*?[")


def _matches(name: str, pattern: str) -> bool:
    """A glob (with * ? [...]) matches the whole name; any other pattern is a substring of it."""
    return fnmatch.fnmatchcase(name, pattern) if _GLOB & set(pattern) else pattern in name


def head_modules(model: torch.nn.Module | None) -> tuple[str, ...]:
    """The modules a head-mode party keeps: peft's modules_to_save where it has them, else the usual heads."""
    config = getattr(model, "peft_config", {}).get("default") if model is not None else None
    saved = tuple(getattr(config, "modules_to_save", None) or ())
    return saved or HEAD_MODULES


def personal_names(names: Iterable[str], spec: PersonalizationSpec, heads: tuple[str, ...] = HEAD_MODULES) -> set[str]:
    """The names of the personal part among `names` (the adapter's); ValueError naming the field when the
    split cannot work: a pattern (or the head) matches nothing, nothing stays shared, or a LoRA pair is split."""
    names = sorted(names)
    if spec.mode == "head":
        personal = {n for n in names if set(n.split(".")) & set(heads)}
        if not personal:
            raise ValueError(
                f"personalization.mode head: the adapter holds no classification head ({', '.join(heads)}) "
                f"among its {len(names)} tensor(s), e.g. {names[:2]}; use personalization.mode: keep with patterns"
            )
    else:
        personal = set()
        for pattern in spec.keep:
            hit = {n for n in names if _matches(n, pattern)}
            if not hit:
                raise ValueError(
                    f"personalization.keep: pattern {pattern!r} matches no adapter tensor; the adapter's tensors "
                    f"are e.g. {names[:3]}"
                )
            personal |= hit
    if personal >= set(names):
        raise ValueError(
            "personalization: every adapter tensor would be personal and nothing shared; narrow "
            "personalization.keep (or leave personalization out: each party could then train alone)"
        )
    split = sorted(n for n in personal if _lora_partner(n) in names and _lora_partner(n) not in personal)
    if split:
        raise ValueError(
            f"personalization.keep: LoRA pair split between personal and shared: {split[0]} is personal and "
            f"{_lora_partner(split[0])} is not; keep both factors of a pair on the same side"
        )
    return personal


def _lora_partner(name: str) -> str | None:
    for a, b in ((".lora_A.", ".lora_B."), (".lora_B.", ".lora_A.")):
        if a in name:
            return name.replace(a, b)
    return None


def split(
    tensors: Mapping[str, torch.Tensor], personal: set[str]
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(shared, personal) parts of an adapter state."""
    shared = {k: v for k, v in tensors.items() if k not in personal}
    own = {k: v for k, v in tensors.items() if k in personal}
    return shared, own


def merge(shared: Mapping[str, torch.Tensor], own: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The whole adapter from the global (shared) part and a party's personal part.

    ValueError when the global adapter holds a personal tensor: it would mean a personal part left
    some party, or the parties disagree on the split."""
    both = sorted(set(shared) & set(own))
    if both:
        raise ValueError(
            f"the global adapter holds {len(both)} tensor(s) of the personal part (e.g. {both[0]}): personal "
            "parts never leave a party, so the parties disagree on spec.personalization"
        )
    return {**shared, **own}
