"""Masking an update (self mask + pairwise masks) and unmasking the sum of the survivors' updates."""

from __future__ import annotations

import hmac

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from .context import Context, SecAggError, ShareRejected, check_name, unb64
from .keys import KEY_BYTES, PartyKeys, PublicKeys, pair_seed, prg, public_of
from .shares import KINDS, check_roster, combine, commitment, load_reveal, load_shares_object


def _as_update(vector, what: str) -> np.ndarray:
    vector = np.asarray(vector)
    if vector.dtype != np.uint64:
        raise SecAggError(f"{what} must be quantised (uint64, from quantise()), not {vector.dtype}")
    return vector


def _sign(u: str, v: str) -> bool:
    """True when u adds the pairwise mask of (u, v) and v subtracts it."""
    return u < v


def _accumulate(total: np.ndarray, stream: np.ndarray, add: bool) -> None:
    (np.add if add else np.subtract)(total, stream.reshape(total.shape), out=total)


def mask(
    ctx: Context, me: str, keys: PartyKeys, b_seed: bytes, roster: dict[str, PublicKeys], vector: np.ndarray
) -> np.ndarray:
    """vector + PRG(b) + sum over v of ±PRG(s_me,v), mod 2**64; roster: the parties whose shares were delivered."""
    check_name(me)
    check_roster(roster, me)
    vector = _as_update(vector, f"the update of {me}")
    if not isinstance(b_seed, bytes) or len(b_seed) != KEY_BYTES:
        raise SecAggError(f"party {me}: the self-mask seed must be the {KEY_BYTES} bytes deal() returned")
    if keys.public() != roster[me]:
        raise SecAggError(f"party {me}: the roster holds other public keys for me than my own for {ctx.describe()}")
    out = vector.copy()
    scratch = np.empty(out.size, dtype=np.uint64)
    _accumulate(out, prg(ctx, b_seed, out.size, scratch), True)
    for v in sorted(roster):
        if v != me:
            seed = pair_seed(ctx, keys._s, roster[v].key("s"), me, v)
            _accumulate(out, prg(ctx, seed, out.size, scratch), _sign(me, v))
    return out


def unmask(
    ctx: Context,
    masked: dict[str, np.ndarray],
    roster: dict[str, PublicKeys],
    dropped: list[str],
    shares_objects: dict[str, bytes],
    reveals: dict[str, bytes],
    threshold: int,
) -> tuple[np.ndarray, dict[str, str]]:
    """The sum of the survivors' quantised updates (mod 2**64), and why any revealed share was rejected."""
    check_roster(roster)
    survivors = sorted(masked)
    dropped = sorted(dropped)
    if set(survivors) & set(dropped):
        raise SecAggError(f"{ctx.describe()}: {sorted(set(survivors) & set(dropped))} are both survivors and dropped")
    if set(survivors) | set(dropped) != set(roster):
        missing = sorted(set(roster) - set(survivors) - set(dropped))
        unknown = sorted(set(survivors + dropped) - set(roster))
        raise SecAggError(
            f"{ctx.describe()}: survivors and dropped must together be the roster; missing {missing}, unknown {unknown}"
        )
    if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 2:
        raise SecAggError(f"{ctx.describe()}: threshold must be an integer of at least 2, not {threshold!r}")
    if len(survivors) < threshold:
        raise SecAggError(
            f"{ctx.describe()}: fewer than t survivors ({len(survivors)} < {threshold}); the sum cannot be recovered"
        )
    vectors = {u: _as_update(masked[u], f"the masked update of {u}") for u in survivors}
    shape = vectors[survivors[0]].shape
    for u, vec in vectors.items():
        if vec.shape != shape:
            raise SecAggError(f"{ctx.describe()}: the masked update of {u} has shape {vec.shape}, others {shape}")

    objects = {}
    for dealer in sorted(roster):
        if dealer not in shares_objects:
            raise SecAggError(
                f"{ctx.describe()}: the shares object of {dealer} is missing; it is needed to check reveals"
            )
        obj = load_shares_object(ctx, dealer, shares_objects[dealer])
        if obj["threshold"] != threshold:
            raise SecAggError(
                f"{ctx.describe()}: {dealer} dealt its shares with threshold {obj['threshold']}, not {threshold}"
            )
        objects[dealer] = obj

    rejected: dict[str, list[str]] = {}
    valid = {(kind, d): [] for kind, names in (("b", survivors), ("s", dropped)) for d in names}
    for holder in sorted(reveals):
        try:
            rev = load_reveal(ctx, holder, reveals[holder])
        except ShareRejected as e:
            rejected.setdefault(holder, []).append(str(e))
            continue
        both = set(rev["b"]) & set(rev["s"])
        for kind in KINDS:
            for dealer, text in sorted(rev[kind].items()):
                reason = None
                if dealer in both:
                    reason = f"reveals both shares of {dealer}, which would unmask it: both ignored"
                elif (kind, dealer) not in valid:
                    wanted = "survivor" if kind == "b" else "dropped party"
                    reason = f"offers a {kind}-share of {dealer}, who is not a {wanted} of round {ctx.round}: ignored"
                elif holder not in objects[dealer]["holders"]:
                    reason = f"holds no share of {dealer} in round {ctx.round}"
                else:
                    try:
                        share = unb64(text, f"the {kind}-share of {dealer}", KEY_BYTES)
                    except SecAggError as e:
                        share, reason = None, str(e)
                    if share is not None:
                        expected = objects[dealer]["commitments"].get(holder, {})
                        if not isinstance(expected, dict) or not hmac.compare_digest(
                            str(expected.get(kind, "")), commitment(ctx, dealer, holder, kind, share)
                        ):
                            reason = (
                                f"share of {dealer} for round {ctx.round} fails its commitment: tampered or replayed"
                            )
                        else:
                            valid[(kind, dealer)].append((objects[dealer]["holders"].index(holder) + 1, share))
                if reason:
                    rejected.setdefault(holder, []).append(reason)

    def recover(kind: str, dealer: str) -> bytes:
        shares = valid[(kind, dealer)]
        if len(shares) < threshold:
            what = "self-mask seed" if kind == "b" else "pairwise-mask key"
            role = "survivor" if kind == "b" else "dropped party"
            raise SecAggError(
                f"{ctx.describe()}: cannot recover the {what} of {role} {dealer}: {len(shares)} valid shares, "
                f"{threshold} needed; wait for more reveals or abandon this attempt"
            )
        return combine(sorted(shares)[:threshold])

    total = np.zeros(shape, dtype=np.uint64)
    scratch = np.empty(total.size, dtype=np.uint64)
    for u in survivors:
        np.add(total, vectors[u], out=total)
        _accumulate(total, prg(ctx, recover("b", u), total.size, scratch), False)
    for v in dropped:
        private = X25519PrivateKey.from_private_bytes(recover("s", v))
        if public_of(private) != roster[v].s:
            raise SecAggError(
                f"{ctx.describe()}: the key reconstructed for dropped party {v} does not match its public key: "
                "its dealt shares are inconsistent"
            )
        for u in survivors:
            seed = pair_seed(ctx, private, roster[u].key("s"), v, u)
            # u added +PRG(s_uv) if u < v, else subtracted it; take that back out.
            _accumulate(total, prg(ctx, seed, total.size, scratch), not _sign(u, v))
    return total, {h: "; ".join(r) for h, r in rejected.items()}
