"""Secure aggregation (`spec.privacy.secureAggregation`): the spec, the round's status and what tickets carry.

The aggregator learns the sum of the round's updates and nothing else (SecAgg, Bonawitz et al. 2017). A
round with it has four exchanges where a plain round has one, each a ticket and a receipt:

  keys    every party draws two fresh X25519 key pairs and answers with the public halves;
  shares  every party Shamir-shares (threshold t) its self-mask seed and its mask private key, encrypts
          each share for its holder, and uploads that object to its own bucket (receipt: its sha256);
  train   every party opens the shares addressed to it, trains, quantises its weighted delta, adds its
          self mask and the pairwise masks it agrees with every other party, and uploads that (survivors);
  unmask  every survivor reveals, per dealer, the self-mask share of a survivor or the private-key share
          of a party that dropped before uploading (never both), into an object in its own bucket.

The aggregator then needs t reveals: it rebuilds the self masks of the survivors and the pairwise masks
of the dropped, and removes them from the sum. The control plane relays public keys, sha256 digests and
presigned URLs; the shares are encrypted to their holders, so it reads no secret. The cryptography is
`fedtune_trainer.secagg`; this module holds only what the control plane and the wire need.
"""

from __future__ import annotations

import base64
import binascii
from typing import Literal

from pydantic import Field, field_validator

from fedtune.api.base import ApiModel

# The exchanges of a round with secure aggregation, in order (ticket kinds; "train" is the plain one).
PHASES = ("keys", "shares", "train", "unmask")
Phase = Literal["keys", "shares", "train", "unmask"]
# A share's index travels as one byte (fedtune_trainer.secagg.shares.MAX_PARTIES): at most 255 holders.
MAX_PARTIES = 255


class SecureAggregationSpec(ApiModel):
    """Masked updates: the aggregator learns only their sum, recovered while t parties remain."""

    threshold: int | None = Field(
        None,
        ge=2,
        le=MAX_PARTIES,
        description="t: the fewest parties whose shares recover the sum (and whom a colluding aggregator "
        "would need). A round fails when fewer than t upload or fewer than t reveal. Default: a majority "
        "of the job's parties.",
    )

    def resolved_threshold(self, parties: int) -> int:
        return self.threshold if self.threshold is not None else parties // 2 + 1


class PublicKeys(ApiModel):
    """The two X25519 public keys a party advertises for one round (base64, 32 bytes each)."""

    c: str = Field(description="Key agreement for encrypting the shares this party receives.")
    s: str = Field(description="Key agreement for the pairwise masks.")

    @field_validator("c", "s")
    @classmethod
    def _x25519(cls, v: str) -> str:
        try:
            raw = base64.b64decode(v, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("not base64") from None
        if len(raw) != 32:
            raise ValueError(f"an X25519 public key has 32 bytes, not {len(raw)}")
        return v


class SecureAggregationStatus(ApiModel):
    """Where the current round's secure aggregation stands (public values only)."""

    phase: Phase = Field("keys", description="keys, shares, train or unmask.")
    threshold: int = Field(description="t for this job.")
    keys: dict[str, PublicKeys] = Field(default_factory=dict, description="Parties that advertised keys.")
    shares: dict[str, str] = Field(
        default_factory=dict, description="Parties that dealt their shares -> sha256 of their shares object."
    )
    survivors: list[str] = Field(default_factory=list, description="Parties whose masked update was uploaded.")
    dropped: list[str] = Field(default_factory=list, description="Dealt shares, then uploaded no masked update.")
    reveals: dict[str, str] = Field(default_factory=dict, description="Survivors that revealed -> sha256.")

    def roster(self) -> dict[str, PublicKeys]:
        """The parties whose shares were dealt (the masks of the round are agreed among them)."""
        return {p: self.keys[p] for p in sorted(self.shares)}


class ObjectIn(ApiModel):
    """A presigned GET URL of a small object and the sha256 its owner's receipt gave."""

    url: str
    sha256: str


class SecureTicket(ApiModel):
    """The secure-aggregation part of a trainer ticket (kinds keys, shares, train, unmask)."""

    threshold: int
    weighted: bool = Field(True, description="Weigh the delta by the party's sample count (False with DP).")
    roster: dict[str, PublicKeys] = Field(
        default_factory=dict, description="shares: every party that advertised keys; train/unmask: the dealers."
    )
    shares_out: str | None = Field(None, description="shares: PUT URL of this party's shares object.")
    shares_in: dict[str, ObjectIn] = Field(default_factory=dict, description="train: each dealer's shares object.")
    survivors: list[str] = Field(default_factory=list, description="unmask: parties whose masked update counts.")
    dropped: list[str] = Field(default_factory=list, description="unmask: dealers without a masked update.")
    reveal_out: str | None = Field(None, description="unmask: PUT URL of this party's reveal.")


class SecureAggregation(ApiModel):
    """The secure-aggregation part of an aggregator ticket: what unmasking the sum needs."""

    threshold: int
    weighted: bool = True
    roster: dict[str, PublicKeys] = Field(description="The dealers' public keys.")
    dropped: list[str] = Field(default_factory=list, description="Dealers without a masked update.")
    shares_in: dict[str, ObjectIn] = Field(default_factory=dict, description="Each dealer's shares object.")
    reveals_in: dict[str, ObjectIn] = Field(default_factory=dict, description="Each revealing survivor's reveal.")
