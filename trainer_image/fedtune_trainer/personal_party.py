"""Personalisation on a party (spec.personalization): evaluate the global part with the initial and with
this party's own personal part, and keep that part in the party's own bucket (fedtune_trainer.personal)."""

from __future__ import annotations

from fedtune.api.protocol import TrainerReceipt, TrainerTicket
from fedtune.api.status import Metrics

from fedtune_trainer import party_steps
from fedtune_trainer.party_runtime import PartyRuntime
from fedtune_trainer.ranks import Ranks


def evaluate_personal(
    ticket: TrainerTicket,
    rt: PartyRuntime,
    receipt: TrainerReceipt,
    global_state: dict,
    own: dict,
    evals: list[dict] | None,
    ranks: Ranks,
) -> tuple[Metrics, dict]:
    """Every rank: the global part evaluated with the initial personal part (global*), then with this party's
    own (eval*, the personalised adapter); leaves the personalised adapter loaded and returns it."""
    from fedtune_trainer.personal import merge, split

    initial_own = split(rt.initial, rt.personal_names(ticket.config))[1]
    party_steps.load_global(rt, merge(global_state, initial_own), ranks)
    base = party_steps.evaluate_loaded(ticket, rt, receipt, evals, ranks)
    mine = merge(global_state, own)
    party_steps.load_global(rt, mine, ranks)
    metrics = party_steps.evaluate_loaded(ticket, rt, receipt, evals, ranks)
    metrics.global_eval_loss, metrics.global_eval_accuracy = base.eval_loss, base.eval_accuracy
    return metrics, mine


def keep_personal(ticket: TrainerTicket, rt: PartyRuntime, receipt: TrainerReceipt, own: dict) -> None:
    """Rank 0: write the personal part to the party's own bucket (the only place it goes) and keep it in memory."""
    from fedtune_trainer.adapters import to_bytes

    if not ticket.personal_out:
        raise ValueError(f"{ticket.kind} ticket carries no personalOut (spec.personalization is set)")
    digest = party_steps.upload(ticket.personal_out, to_bytes(own), receipt)
    rt.personal[ticket.job] = (digest, own)
    receipt.personal_sha256 = digest
