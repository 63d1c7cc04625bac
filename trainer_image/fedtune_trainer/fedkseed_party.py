"""FedKSeed's ticket path on a party: replay the global's accumulated seeds onto the kept base weights,
and a train round of zeroth-order steps whose update is (seed, gradient) pairs (fedtune_trainer.fedkseed)."""

from __future__ import annotations

import logging
import time

from fedtune.api import cpu_slots
from fedtune.api.protocol import TrainerConfig, TrainerReceipt, TrainerTicket

from fedtune_trainer import party_steps
from fedtune_trainer.party_runtime import PartyRuntime
from fedtune_trainer.ranks import Ranks

log = logging.getLogger(__name__)


def params(cfg: TrainerConfig) -> dict | None:
    """FedKSeed's parameters (peft.config with defaults), or None for any other method."""
    from fedtune.api.methods import FEDKSEED, fedkseed_params

    return fedkseed_params(cfg.peft.config) if cfg.peft.method == FEDKSEED else None


def replay(ticket: TrainerTicket, rt: PartyRuntime, receipt: TrainerReceipt, global_state: dict) -> None:
    """FedKSeed: set the model to the global by replaying its accumulated steps onto the kept base weights."""
    from fedtune_trainer import fedkseed

    ks = params(ticket.config)
    accum = global_state.get(fedkseed.ACCUM)
    if not fedkseed.is_global(global_state) or accum.shape != (ks["seeds"],):
        raise ValueError(f"global is not a FedKSeed accumulator of {ks['seeds']} seeds")
    start = time.perf_counter()
    fedkseed.replay(rt.model, rt.initial, accum, ticket.config.training.seed, ks["learningRate"])
    receipt.timings.replay_seconds = time.perf_counter() - start
    receipt.replayed_sha256 = fedkseed.weights_digest(rt.model)
    log.info(
        "[%s] round %d: replayed %d of %d seeds onto the base model in %.2fs (weights %s)",
        ticket.party,
        ticket.round,
        int((accum != 0).sum()),
        ks["seeds"],
        receipt.timings.replay_seconds,
        receipt.replayed_sha256[:12],
    )


def train_round(ticket: TrainerTicket, rt: PartyRuntime, receipt: TrainerReceipt, ranks: Ranks) -> None:
    """FedKSeed's round: replay the global, evaluate it, take the local zeroth-order steps, upload (i, g) pairs."""
    from fedtune_trainer import fedkseed
    from fedtune_trainer.adapters import to_bytes

    cfg, ks = ticket.config, params(ticket.config)
    train, global_state, evals, _ = ranks.share(lambda: party_steps.fetch_round(ticket, rt, receipt))
    replay(ticket, rt, receipt, global_state)
    with cpu_slots.hold():
        metrics = party_steps.evaluate_loaded(ticket, rt, receipt, evals, ranks)
        steps = fedkseed.train_steps(
            rt.model,
            train,
            rt.tokenizer.pad_token_id,
            job_seed=cfg.training.seed,
            rnd=ticket.round,
            party=ticket.party,
            k=ks["seeds"],
            steps=ks["steps"],
            lr=ks["learningRate"],
            eps=ks["epsilon"],
            batch_size=cfg.training.batch_size,
        )
    if not ranks.lead:
        return
    update = to_bytes(fedkseed.update_tensors(steps.seeds, steps.grads))
    metrics.train_loss = steps.train_loss
    receipt.metrics, receipt.num_samples = metrics, steps.num_samples
    receipt.timings.train_seconds = steps.seconds
    receipt.sha256, receipt.update_bytes = party_steps.upload(ticket.update_out, update, receipt), len(update)
    log.info(
        "[%s] round %d: global eval_loss=%s accuracy=%s | %d zeroth-order steps, train_loss=%.4f in %.1fs "
        "(replay %.2fs), update %d bytes",
        ticket.party,
        ticket.round,
        party_steps.fmt(metrics.eval_loss),
        party_steps.fmt(metrics.eval_accuracy),
        len(steps.seeds),
        steps.train_loss,
        steps.seconds,
        receipt.timings.replay_seconds,
        len(update),
    )
