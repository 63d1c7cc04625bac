"""Shamir shares of a party's self-mask seed b and s-private key: dealt, encrypted, opened, committed, revealed."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from dataclasses import dataclass, field

from Crypto.Protocol.SecretSharing import Shamir
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from .context import Context, SecAggError, ShareRejected, b64, canonical_json, check_name, label, unb64
from .keys import KEY_BYTES, PartyKeys, PublicKeys, share_key

VERSION = 1
MAX_PARTIES = 255
NONCE_BYTES = 12
KINDS = ("b", "s")  # b: the self-mask seed; s: the s-private key (pairwise masks)
HALF = 16  # pycryptodome's Shamir shares 16-byte secrets over GF(2^128): a 32-byte secret is two halves


@dataclass(repr=False)
class HeldShares:
    """The shares one dealer gave me for one context: index and the b and s shares (two 16-byte halves each)."""

    ctx: Context
    dealer: str
    holder: str
    index: int
    threshold: int
    b: bytes
    s: bytes
    # Which kind reveal() has handed out; it then refuses the other (b and s together unmask the dealer).
    revealed: str = field(default="", compare=False)

    def __repr__(self) -> str:
        return f"HeldShares(dealer={self.dealer!r}, holder={self.holder!r}, index={self.index}, {self.ctx.describe()})"


def commitment(ctx: Context, dealer: str, holder: str, kind: str, share: bytes) -> str:
    return hashlib.sha256(label(ctx, b"commit", dealer, holder, kind) + share).hexdigest()


def _split(secret: bytes, threshold: int, n: int) -> list[bytes]:
    """Shares 1..n of a 32-byte secret: each 16-byte half shared on its own, the two share halves joined."""
    lo = Shamir.split(threshold, n, secret[:HALF])
    hi = Shamir.split(threshold, n, secret[HALF:])
    out = []
    for i, ((ia, a), (ib, b)) in enumerate(zip(lo, hi), start=1):
        assert ia == ib == i
        out.append(a + b)
    return out


def combine(shares: list[tuple[int, bytes]]) -> bytes:
    return Shamir.combine([(i, s[:HALF]) for i, s in shares]) + Shamir.combine([(i, s[HALF:]) for i, s in shares])


def check_roster(roster: dict[str, PublicKeys], me: str | None = None) -> list[str]:
    if not isinstance(roster, dict) or not roster:
        raise SecAggError("the roster must be a non-empty mapping of party name -> PublicKeys")
    for name, pk in roster.items():
        check_name(name)
        if not isinstance(pk, PublicKeys):
            raise SecAggError(f"roster entry of party {name} must be PublicKeys (use PublicKeys.from_dict)")
    if len(roster) > MAX_PARTIES:
        raise SecAggError(
            f"secure aggregation takes at most {MAX_PARTIES} parties per round, the roster has {len(roster)}"
        )
    if me is not None and me not in roster:
        raise SecAggError(
            f"party {me} is not in the roster of this round: it missed the key phase and cannot take part"
        )
    return sorted(roster)


def deal(ctx: Context, me: str, keys: PartyKeys, roster: dict[str, PublicKeys], threshold: int) -> tuple[bytes, bytes]:
    """Share a fresh self-mask seed b and my s-private key among the roster; returns (shares object, b)."""
    check_name(me)
    holders = check_roster(roster, me)
    n = len(holders)
    if isinstance(threshold, bool) or not isinstance(threshold, int) or not 2 <= threshold <= n:
        raise SecAggError(
            f"party {me}, {ctx.describe()}: threshold {threshold!r} must be an integer between 2 and the "
            f"{n} parties of the roster"
        )
    if keys.public() != roster[me]:
        raise SecAggError(f"party {me}: the roster holds other public keys for me than my own for {ctx.describe()}")
    b_seed = os.urandom(KEY_BYTES)
    b_shares = _split(b_seed, threshold, n)
    s_shares = _split(keys._s.private_bytes_raw(), threshold, n)
    commitments, ciphertexts = {}, {}
    for i, holder in enumerate(holders):
        commitments[holder] = {
            "b": commitment(ctx, me, holder, "b", b_shares[i]),
            "s": commitment(ctx, me, holder, "s", s_shares[i]),
        }
        key = share_key(ctx, keys._c, roster[holder].key("c"), holder, me, holder)
        nonce = os.urandom(NONCE_BYTES)
        plaintext = bytes([i + 1]) + b_shares[i] + s_shares[i]
        ciphertexts[holder] = b64(
            nonce + ChaCha20Poly1305(key).encrypt(nonce, plaintext, label(ctx, b"ad", me, holder))
        )
    obj = {
        "version": VERSION,
        "job": ctx.job,
        "round": ctx.round,
        "attempt": ctx.attempt,
        "dealer": me,
        "threshold": threshold,
        "holders": holders,
        "commitments": commitments,
        "ciphertexts": ciphertexts,
    }
    return canonical_json(obj), b_seed


def _load(data: bytes, what: str, party: str) -> dict:
    try:
        obj = json.loads(data)
    except (TypeError, ValueError) as e:
        raise ShareRejected(f"{what} of {party} is not valid JSON ({e})", party) from None
    if not isinstance(obj, dict) or obj.get("version") != VERSION:
        raise ShareRejected(f"{what} of {party} is not a version-{VERSION} secure aggregation object", party)
    return obj


def _check_context(obj: dict, ctx: Context, what: str, party: str) -> None:
    if obj.get("job") != ctx.job:
        raise ShareRejected(f"{what} of {party} belongs to job {obj.get('job')!r}, not {ctx.job!r}: replayed", party)
    if (obj.get("round"), obj.get("attempt")) != (ctx.round, ctx.attempt):
        raise ShareRejected(
            f"{what} of {party} is replayed from round {obj.get('round')} attempt {obj.get('attempt')} "
            f"(this is round {ctx.round} attempt {ctx.attempt})",
            party,
        )


def load_shares_object(ctx: Context, dealer: str, data: bytes) -> dict:
    """Parse a dealer's shares object and check that it is this context's and this dealer's, and well formed."""
    what = "the shares object"
    obj = _load(data, what, dealer)
    _check_context(obj, ctx, what, dealer)
    if obj.get("dealer") != dealer:
        raise ShareRejected(f"{what} sent as {dealer}'s was dealt by {obj.get('dealer')!r}", dealer)
    holders, threshold = obj.get("holders"), obj.get("threshold")
    if (
        not isinstance(holders, list)
        or not all(isinstance(h, str) for h in holders)
        or holders != sorted(set(holders))
        or not 0 < len(holders) <= MAX_PARTIES
        or isinstance(threshold, bool)
        or not isinstance(threshold, int)
        or not 2 <= threshold <= len(holders)
        or not isinstance(obj.get("commitments"), dict)
        or not isinstance(obj.get("ciphertexts"), dict)
    ):
        raise ShareRejected(f"{what} of {dealer} is malformed (holders, threshold, commitments or ciphertexts)", dealer)
    return obj


def open_shares(
    ctx: Context, me: str, keys: PartyKeys, roster: dict[str, PublicKeys], objects: dict[str, bytes]
) -> dict[str, HeldShares]:
    """Decrypt and check the shares each dealer addressed to me; ShareRejected names the first bad dealer."""
    check_name(me)
    check_roster(roster, me)
    held = {}
    for dealer in sorted(objects):
        if dealer not in roster:
            raise ShareRejected(f"shares came from {dealer!r}, who is not in the roster of {ctx.describe()}", dealer)
        obj = load_shares_object(ctx, dealer, objects[dealer])
        holders = obj["holders"]
        if me not in holders:
            raise ShareRejected(f"the shares object of {dealer} holds no share for me ({me})", dealer)
        try:
            blob = unb64(obj["ciphertexts"].get(me), f"the ciphertext of {dealer} for {me}")
        except SecAggError as e:
            raise ShareRejected(str(e), dealer) from None
        key = share_key(ctx, keys._c, roster[dealer].key("c"), dealer, dealer, me)
        try:
            plaintext = ChaCha20Poly1305(key).decrypt(
                blob[:NONCE_BYTES], blob[NONCE_BYTES:], label(ctx, b"ad", dealer, me)
            )
        except (InvalidTag, ValueError):
            raise ShareRejected(
                f"the shares of {dealer} for {ctx.describe()} fail authentication: tampered or not addressed to me "
                f"({me})",
                dealer,
            ) from None
        index = holders.index(me) + 1
        if len(plaintext) != 1 + 2 * KEY_BYTES or plaintext[0] != index:
            raise ShareRejected(f"the shares of {dealer} for me ({me}) are malformed", dealer)
        b, s = plaintext[1 : 1 + KEY_BYTES], plaintext[1 + KEY_BYTES :]
        mine = obj["commitments"].get(me)
        if not isinstance(mine, dict) or not all(
            isinstance(mine.get(kind), str)
            and hmac.compare_digest(mine[kind], commitment(ctx, dealer, me, kind, share))
            for kind, share in (("b", b), ("s", s))
        ):
            raise ShareRejected(f"the shares of {dealer} for me ({me}) do not match its own commitments", dealer)
        held[dealer] = HeldShares(ctx, dealer, me, index, obj["threshold"], b, s)
    return held


def reveal(
    ctx: Context, me: str, held: dict[str, HeldShares], survivors: list[str], dropped: list[str], threshold: int
) -> bytes:
    """My b-shares of the survivors and s-shares of the dropped: never both kinds of one dealer."""
    survivors, dropped = list(survivors), list(dropped)
    both = sorted(set(survivors) & set(dropped))
    if both:
        raise SecAggError(
            f"party {me}, {ctx.describe()}: {both} are listed both as survivors and as dropped; revealing both "
            "shares of a party would unmask its update, so nothing is revealed"
        )
    if len(set(survivors)) != len(survivors) or len(set(dropped)) != len(dropped):
        raise SecAggError(f"party {me}, {ctx.describe()}: the survivor and dropped lists repeat names")
    if len(survivors) < threshold:
        raise SecAggError(
            f"party {me}, {ctx.describe()}: fewer than t survivors ({len(survivors)} < {threshold}): revealing would "
            "not let the sum be recovered and would only expose the parties' masks; abandon this attempt"
        )
    for name in survivors + dropped:
        h = held.get(name)
        if h is None:
            raise SecAggError(f"party {me}, {ctx.describe()}: I hold no share of {name}, so I cannot reveal one")
        if h.ctx != ctx or h.holder != me or h.dealer != name:
            raise SecAggError(f"party {me}: the share I hold of {name} is for {h.ctx.describe()}, not {ctx.describe()}")
    for kind, names in (("b", survivors), ("s", dropped)):
        for name in names:
            if held[name].revealed not in ("", kind):
                raise SecAggError(
                    f"party {me}, {ctx.describe()}: I already revealed the {held[name].revealed}-share of {name}; "
                    f"revealing its {kind}-share too would unmask its update"
                )
    for kind, names in (("b", survivors), ("s", dropped)):
        for name in names:
            held[name].revealed = kind
    obj = {
        "version": VERSION,
        "job": ctx.job,
        "round": ctx.round,
        "attempt": ctx.attempt,
        "holder": me,
        "b": {name: b64(held[name].b) for name in survivors},
        "s": {name: b64(held[name].s) for name in dropped},
    }
    return canonical_json(obj)


def load_reveal(ctx: Context, holder: str, data: bytes) -> dict:
    obj = _load(data, "the reveal", holder)
    _check_context(obj, ctx, "the reveal", holder)
    if obj.get("holder") != holder:
        raise ShareRejected(f"the reveal sent as {holder}'s was made by {obj.get('holder')!r}", holder)
    if not isinstance(obj.get("b"), dict) or not isinstance(obj.get("s"), dict):
        raise ShareRejected(f"the reveal of {holder} is malformed (b and s must be objects)", holder)
    return obj
