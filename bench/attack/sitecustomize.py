"""bench/privacy.py's attacking party: bench only, never on a product path.

bench/privacy.py puts this directory first on PYTHONPATH of the pods of a local run (the zygote the
party processes fork from, and the aggregator) together with FEDTUNE_BENCH_ATTACK=PARTY:ATTACK.
Python imports this module at start-up; it then wraps two trainer functions so that the party
named PARTY (its FEDTUNE_NAME) uploads a corrupted update:

- `scaled`:   global + 100·(update − global)  (a model-replacement style boost);
- `signflip`: global − (update − global);
- `huge`:     every floating element 1e30 (finite in float32).

The party records the global adapter it received (`fedtune_trainer.party_steps.load_global`) and rewrites
the tensors just before they are encoded for upload (`fedtune_trainer.compression.encode`), so the
receipt's sha256 is that of what it sent, as a real malicious party would do. Without the variable
(every other process) nothing is wrapped.
"""

from __future__ import annotations

import os


def corrupt(global_state, update, attack: str):
    out = {}
    for k, u in update.items():
        g = global_state.get(k)
        if not u.is_floating_point() or g is None:
            out[k] = u
            continue
        d = u.double() - g.double()
        if attack == "scaled":
            v = g.double() + 100.0 * d
        elif attack == "signflip":
            v = g.double() - d
        elif attack == "huge":
            v = d.new_full(d.shape, 1e30)
        else:
            raise ValueError(f"unknown attack {attack!r}")
        out[k] = v.to(u.dtype)
    return out


def _install(spec: str) -> None:
    party, _, attack = spec.partition(":")
    import fedtune_trainer.compression as compression
    import fedtune_trainer.party_steps as party_steps

    seen: dict = {}
    load_global, encode = party_steps.load_global, compression.encode

    def _load_global(rt, tensors, ranks):
        seen["global"] = tensors
        return load_global(rt, tensors, ranks)

    def attacked_encode(tensors, mode="none"):
        if os.environ.get("FEDTUNE_NAME") == party and "global" in seen:
            tensors = corrupt(seen["global"], tensors, attack)
        return encode(tensors, mode)

    party_steps.load_global = _load_global
    compression.encode = attacked_encode


if os.environ.get("FEDTUNE_BENCH_ATTACK"):
    _install(os.environ["FEDTUNE_BENCH_ATTACK"])
