"""Secure aggregation: the aggregator learns the sum of the parties' updates and nothing else.

After Bonawitz et al., "Practical Secure Aggregation for Privacy-Preserving Machine Learning" (CCS 2017).
Every key, seed, ciphertext and commitment is bound to one Context (job, round, attempt); a retry is a
new attempt with fresh keys, so nothing of one attempt can be replayed into another.

Phases, all relayed by the aggregator (which never sees a secret):
 0. Keys: each party generates PartyKeys (two X25519 pairs: c for encrypting shares, s for pairwise masks)
    and advertises PublicKeys. The parties that did form the roster U1.
 1. Shares: deal() draws a fresh self-mask seed b, splits b and the s-private key into t-of-n Shamir
    shares (GF(2^128), two halves each), encrypts each holder's shares with ChaCha20-Poly1305 under a key
    from X25519(c) + HKDF and publishes SHA-256 commitments. open_shares() decrypts what is addressed to me.
 2. Upload: mask() adds PRG(b) and, for each other party v of U2 (shares delivered), +PRG(s_uv) if u < v
    else -PRG(s_uv), s_uv from X25519(s) + HKDF, to the quantised update (fixed point mod 2**64).
 3. Reveal: for the survivors U3 (uploaded) a holder reveals its b-shares, for U2 \\ U3 its s-shares; never
    both of one party, and nothing at all if fewer than t survived.
 4. Unmask: the aggregator checks each revealed share against its dealer's commitment, reconstructs b of
    each survivor and the s-key of each dropped party from t valid shares, and removes all the masks.

Why the aggregator learns only the sum: a single masked update is one-time-padded by PRG(b), and the
pairwise masks cancel only in the sum. To strip a survivor's self mask one needs t shares of its b; to
strip its pairwise masks, t shares of its s-key; honest holders reveal one kind per party, so an
aggregator colluding with fewer than t parties never holds both. A party that dropped after uploading
is treated as a survivor (its b is revealed, its s-key never). Commitments and AEAD associated data
bind each share to (context, dealer, holder, kind), so tampered or replayed shares are rejected.
Out of scope here: authenticating the roster (a relay that swaps public keys can read shares; bind
PublicKeys to party identities upstream) and dealers who deal inconsistent b-shares (they can spoil
the sum, as a bad update would; s-keys are checked against their public keys).
"""

from .context import Context, SecAggError, ShareRejected
from .field import FRACTION_BITS, dequantise, quantise
from .keys import PartyKeys, PublicKeys
from .masking import mask, unmask
from .shares import HeldShares, deal, open_shares, reveal

__all__ = [
    "FRACTION_BITS",
    "Context",
    "HeldShares",
    "PartyKeys",
    "PublicKeys",
    "SecAggError",
    "ShareRejected",
    "deal",
    "dequantise",
    "mask",
    "open_shares",
    "quantise",
    "reveal",
    "unmask",
]
