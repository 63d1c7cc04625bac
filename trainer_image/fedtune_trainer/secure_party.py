"""A party's side of secure aggregation (fedtune.api.secagg has the exchanges, fedtune_trainer.secagg the crypto).

The secrets of a round (two X25519 private keys, the self-mask seed, the shares other parties dealt
to this one) live in this process's memory only, for one attempt of one round, and are forgotten
after the reveal or when the next round's keys are drawn. A trainer that restarts mid-round has lost
them: it answers the rest of that round with a clear failure and sits it out (the others recover the
sum without it, as for any party that drops).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from fedtune.api.protocol import TrainerReceipt, TrainerTicket
from fedtune.api.secagg import PublicKeys as WireKeys

from fedtune_trainer import secagg, secure_vectors, transfer

log = logging.getLogger(__name__)
Upload = Callable[[str, bytes, TrainerReceipt], str]


@dataclass
class Session:
    keys: secagg.PartyKeys
    seed: bytes | None = None
    held: dict = field(default_factory=dict)  # dealer -> the shares it dealt this party


class Sessions:
    """The one round (attempt) a party holds secrets for."""

    def __init__(self) -> None:
        self._at: tuple[str, int, int] | None = None
        self._session: Session | None = None

    def start(self, ticket: TrainerTicket) -> Session:
        self._at, self._session = _at(ticket), Session(secagg.PartyKeys.generate())
        return self._session

    def get(self, ticket: TrainerTicket) -> Session:
        if self._session is None or self._at != _at(ticket):
            raise ValueError(
                f"this trainer holds no secure-aggregation keys for round {ticket.round} attempt {ticket.attempt} "
                "(it restarted after advertising them): it sits this round out, the others recover the sum"
            )
        return self._session

    def forget(self) -> None:
        self._at = self._session = None


def _at(ticket: TrainerTicket) -> tuple[str, int, int]:
    return ticket.job, ticket.round, ticket.attempt


def _context(ticket: TrainerTicket) -> secagg.Context:
    return secagg.Context(job=ticket.job, round=ticket.round, attempt=ticket.attempt)


def _roster(ticket: TrainerTicket) -> dict[str, secagg.PublicKeys]:
    roster = {p: secagg.PublicKeys(c=k.c, s=k.s) for p, k in ticket.secure.roster.items()}
    if ticket.party not in roster:
        raise ValueError(
            f"{ticket.party} is not among round {ticket.round}'s secure-aggregation parties (it missed an earlier "
            "exchange): it sits this round out"
        )
    return roster


def advertise(ticket: TrainerTicket, sessions: Sessions, receipt: TrainerReceipt) -> None:
    """keys: fresh key pairs for this round; the receipt carries the public halves."""
    public = sessions.start(ticket).keys.public()
    receipt.public_keys = WireKeys(c=public.c, s=public.s)


def deal(ticket: TrainerTicket, sessions: Sessions, receipt: TrainerReceipt, upload: Upload) -> None:
    """shares: share the self-mask seed and the mask key among the round's parties, encrypted to each."""
    session, sec = sessions.get(ticket), ticket.secure
    if not sec.shares_out:
        raise ValueError("shares ticket carries no secure.sharesOut URL")
    shares, session.seed = secagg.deal(_context(ticket), ticket.party, session.keys, _roster(ticket), sec.threshold)
    receipt.sha256 = upload(sec.shares_out, shares, receipt)


def receive(ticket: TrainerTicket, sessions: Sessions, receipt: TrainerReceipt) -> None:
    """train, before training: open the shares every dealer addressed to this party.

    A dealer whose object fails its sha256 or whose share fails authentication is skipped with a
    warning: this party then cannot reveal for it, and the others' reveals still may.
    """
    session, roster = sessions.get(ticket), _roster(ticket)
    if session.seed is None:
        raise ValueError(f"round {ticket.round}: this trainer dealt no shares for this attempt")
    for dealer, obj in ticket.secure.shares_in.items():
        try:
            raw = transfer.get(obj.url, obj.sha256)
            receipt.bytes_down += len(raw)
            session.held.update(secagg.open_shares(_context(ticket), ticket.party, session.keys, roster, {dealer: raw}))
        except (secagg.ShareRejected, transfer.TransferError) as exc:
            if isinstance(exc, transfer.StorageFailure):
                raise
            log.warning("[%s] round %d: no share from %s: %s", ticket.party, ticket.round, dealer, exc)


def masked_update(
    ticket: TrainerTicket,
    sessions: Sessions,
    global_prev: Mapping[str, torch.Tensor],
    update: Mapping[str, torch.Tensor],
    num_samples: int,
) -> bytes:
    """train: the weighted delta, quantised into the field and masked, as the bytes to upload."""
    session, sec = sessions.get(ticket), ticket.secure
    roster = _roster(ticket)
    weight = float(num_samples) if sec.weighted else 1.0
    vector = secagg.quantise(secure_vectors.delta_vector(global_prev, update), weight, len(roster))
    masked = secagg.mask(_context(ticket), ticket.party, session.keys, session.seed, roster, vector)
    return secure_vectors.to_bytes(masked)


def reveal(ticket: TrainerTicket, sessions: Sessions, receipt: TrainerReceipt, upload: Upload) -> None:
    """unmask: reveal the survivors' self-mask shares and the dropped parties' key shares, then forget it all."""
    session, sec = sessions.get(ticket), ticket.secure
    if not sec.reveal_out:
        raise ValueError("unmask ticket carries no secure.revealOut URL")
    revealed = secagg.reveal(_context(ticket), ticket.party, session.held, sec.survivors, sec.dropped, sec.threshold)
    sessions.forget()
    receipt.sha256 = upload(sec.reveal_out, revealed, receipt)
