"""Key pairs, key agreement, HKDF derivations and the ChaCha20 pseudo-random generator."""

from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .context import Context, SecAggError, b64, label, unb64

KEY_BYTES = 32


@dataclass(frozen=True)
class PublicKeys:
    """What a party advertises for a round: c encrypts shares to it, s agrees its pairwise masks (base64)."""

    c: str
    s: str

    def __post_init__(self):
        for name in ("c", "s"):
            unb64(getattr(self, name), f"public key {name!r}", KEY_BYTES)

    def to_dict(self) -> dict:
        return {"c": self.c, "s": self.s}

    @classmethod
    def from_dict(cls, d) -> PublicKeys:
        if not isinstance(d, dict) or set(d) != {"c", "s"}:
            got = sorted(d) if isinstance(d, dict) else type(d).__name__
            raise SecAggError(f"public keys must be an object with exactly 'c' and 's' (base64 X25519 keys), got {got}")
        return cls(c=d["c"], s=d["s"])

    def key(self, name: str) -> X25519PublicKey:
        return X25519PublicKey.from_public_bytes(unb64(getattr(self, name), f"public key {name!r}", KEY_BYTES))


class PartyKeys:
    """A party's two X25519 private keys, fresh for each (round, attempt) and never reused."""

    __slots__ = ("_c", "_s")

    def __init__(self, c: X25519PrivateKey, s: X25519PrivateKey):
        self._c = c
        self._s = s

    @classmethod
    def generate(cls) -> PartyKeys:
        return cls(X25519PrivateKey.generate(), X25519PrivateKey.generate())

    def public(self) -> PublicKeys:
        return PublicKeys(c=b64(_raw_public(self._c.public_key())), s=b64(_raw_public(self._s.public_key())))

    def __repr__(self) -> str:
        return f"PartyKeys(public={self.public()})"


def _raw_public(key: X25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def public_of(private: X25519PrivateKey) -> str:
    return b64(_raw_public(private.public_key()))


def hkdf(secret: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(secret)


def exchange(private: X25519PrivateKey, public: X25519PublicKey, party: str) -> bytes:
    try:
        return private.exchange(public)
    except ValueError:
        # cryptography refuses low-order points (an all-zero shared secret).
        raise SecAggError(
            f"the public key of party {party} is degenerate (low-order point): it must re-advertise"
        ) from None


def share_key(
    ctx: Context, private_c: X25519PrivateKey, other_c: X25519PublicKey, other: str, dealer: str, holder: str
) -> bytes:
    """AEAD key of the shares `dealer` encrypts to `holder`: HKDF of their c-key agreement."""
    return hkdf(exchange(private_c, other_c, other), label(ctx, b"share", dealer, holder))


def pair_seed(ctx: Context, private_s: X25519PrivateKey, other_s: X25519PublicKey, u: str, v: str) -> bytes:
    """The pairwise mask seed s_uv (symmetric in u, v): HKDF of their s-key agreement."""
    lo, hi = min(u, v), max(u, v)
    return hkdf(exchange(private_s, other_s, v), label(ctx, b"mask", lo, hi))


_CHUNK = 1 << 20
_ZEROS = bytes(_CHUNK)


def prg(ctx: Context, seed: bytes, size: int, out: np.ndarray | None = None) -> np.ndarray:
    """`size` uint64 of ChaCha20 keystream under HKDF(seed, ctx | "prg"), nonce zero (a fresh key per seed).

    Written into `out` (a uint64 scratch array of `size`) when given: reusing it spares the page faults
    of a fresh buffer, which cost more than the cipher itself.
    """
    if out is None:
        out = np.empty(size, dtype=np.uint64)
    elif out.dtype != np.uint64 or out.size != size or not out.flags.c_contiguous:
        raise ValueError("prg: out must be a contiguous uint64 array of the requested size")
    key = hkdf(seed, label(ctx, b"prg"))
    encryptor = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor()
    view = memoryview(out.reshape(-1)).cast("B")
    for start in range(0, len(view), _CHUNK):
        part = view[start : start + _CHUNK]
        encryptor.update_into(_ZEROS[: len(part)], part)
    if sys.byteorder == "big":
        out.byteswap(inplace=True)  # the keystream is read as little-endian words on every host
    return out
