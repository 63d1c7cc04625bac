"""The party trainer: a long-lived process answering tickets from its mailbox.

The base model is loaded once per job and kept; each train ticket resets the adapter to the
received global weights, evaluates it on the local eval split, trains, and uploads the update.
A pod with several ranks (one per GPU, fedtune_trainer.ranks) runs this on each of them: rank 0
reads the mailbox, downloads and uploads; every rank loads the model, evaluates its share of the
eval split and trains its share of each step.

This module holds the ticket handlers and the serve loop. What the party keeps between tickets is
fedtune_trainer.party_runtime, the steps the handlers share fedtune_trainer.party_steps, FedKSeed's
ticket path fedtune_trainer.fedkseed_party and personalisation's fedtune_trainer.personal_party.
"""

from __future__ import annotations

import logging
import os
import re
from datetime import UTC
from typing import Any, get_args

from fedtune.api import cpu_slots
from fedtune.api.mailbox import POLL_SECONDS, ticket_id
from fedtune.api.protocol import TicketKind, TrainerConfig, TrainerReceipt, TrainerTicket
from fedtune.api.status import utcnow
from pydantic import ValidationError

from fedtune_trainer import fedkseed_party, party_steps, personal_party, secure_party, transfer
from fedtune_trainer.mailbox import Mailbox, answers, as_int, deliver, open_mailbox, own_receipt
from fedtune_trainer.party_runtime import PartyRuntime
from fedtune_trainer.ranks import SOLO, Ranks, from_env

log = logging.getLogger(__name__)
PRELOADED: PartyRuntime | None = None  # set by the zygote (local mode) before it forks this process
_URL = re.compile(r"https?://[^\s'\"]+")


def _init(ticket: TrainerTicket, rt: PartyRuntime, receipt: TrainerReceipt, ranks: Ranks = SOLO) -> None:
    from fedtune_trainer.adapters import adapter_config_json, model_files_bundle, to_bytes

    if not ranks.lead:
        return  # the model is loaded; the data reaches the other ranks with each train ticket
    # Reading the data now turns a schema mistake into an init failure, not a round-1 failure.
    if ticket.train_data is not None:
        receipt.num_samples = len(rt.examples(ticket.job, ticket.train_data, ticket.config, receipt))
    if ticket.eval_data is not None:
        receipt.num_eval_samples = len(rt.examples(ticket.job, ticket.eval_data, ticket.config, receipt))
    personal = rt.personal_names(ticket.config)  # a pattern matching nothing fails the init, naming the field
    if ticket.update_out:
        # Global 0 holds the shared part only; every party starts from its own initial personal part.
        initial = to_bytes({k: v for k, v in rt.initial.items() if k not in personal})
        # FedKSeed: the global is the per-seed accumulator, all zeros.
        if (ks := fedkseed_party.params(ticket.config)) is not None:
            from fedtune_trainer.fedkseed import global0

            initial = to_bytes(global0(ks["seeds"]))
        receipt.sha256, receipt.update_bytes = party_steps.upload(ticket.update_out, initial, receipt), len(initial)
    if ticket.adapter_config_out:
        party_steps.upload(
            ticket.adapter_config_out, adapter_config_json(rt.model, ticket.config.model.portable_name), receipt
        )
    if ticket.model_files_out:  # full fine-tuning: the final model's config and tokenizer files
        party_steps.upload(ticket.model_files_out, model_files_bundle(rt.model, rt.tokenizer), receipt)
    log.info("[%s] initialised: base model %s", ticket.party, rt.fingerprint[:12])


def _train(ticket: TrainerTicket, rt: PartyRuntime, receipt: TrainerReceipt, ranks: Ranks = SOLO) -> None:
    from fedtune_trainer.adapters import adapter_state
    from fedtune_trainer.compression import encode
    from fedtune_trainer.privacy import noise_generator, privatise_update
    from fedtune_trainer.train import train_local

    cfg = ticket.config
    if ticket.train_data is None or not ticket.update_out:
        raise ValueError("train ticket needs trainData and updateOut")
    if fedkseed_party.params(cfg) is not None:
        fedkseed_party.train_round(ticket, rt, receipt, ranks)
        return
    if ticket.secure is not None and ranks.lead:  # the shares dealt to this party, before the work of training
        secure_party.receive(ticket, rt.secure, receipt)
    train, global_state, evals, own = ranks.share(lambda: party_steps.fetch_round(ticket, rt, receipt))
    personal = rt.personal_names(cfg)
    loaded = global_state
    if not personal:
        party_steps.load_global(rt, global_state, ranks)
    # Local mode: no more parties compute at once than there are cores (one-rank parties only: the
    # runner sets no slots when a party has several ranks, which must not wait for one another).
    with cpu_slots.hold():
        if personal:  # the global part and this party's own, merged: the personalised adapter trains
            metrics, loaded = personal_party.evaluate_personal(ticket, rt, receipt, global_state, own, evals, ranks)
        else:
            metrics = party_steps.evaluate_loaded(ticket, rt, receipt, evals, ranks)
        with ranks.lockstep(f"training round {ticket.round}"):
            accountant = rt.sample_accountant(ticket.job) if cfg.dp_sgd is not None else None
            result = train_local(
                rt.model,
                train,
                cfg,
                None,
                cfg.training.seed,
                ticket.round,
                rt.tokenizer.pad_token_id,
                ranks,
                accountant,
                teacher=rt.teacher,
            )
            state = adapter_state(rt.model, like=loaded)  # on every rank: under ZeRO-3 it is gathered
        if not ranks.lead:
            return  # every rank holds the same adapter now; rank 0 uploads it
        if personal:  # the personal part stays here; the update is the shared part alone
            from fedtune_trainer.personal import split

            state, own = split(state, personal)
            personal_party.keep_personal(ticket, rt, receipt, own)
        if cfg.dp is not None:  # local differential privacy: no update leaves the party without its noise
            state, norm = privatise_update(
                global_state, state, cfg.dp.clip_norm, cfg.dp.noise_multiplier, noise_generator()
            )
            log.info(
                "[%s] round %d: update norm %.4g clipped to %g, noise added",
                ticket.party,
                ticket.round,
                norm,
                cfg.dp.clip_norm,
            )
        if ticket.secure is not None:  # the aggregator sees only the sum of the masked updates
            update = secure_party.masked_update(ticket, rt.secure, global_state, state, result.num_samples)
        else:
            update = encode(state, cfg.training.update_compression)  # the aggregator decodes it
    metrics.train_loss = result.train_loss
    metrics.train_distill_loss = result.distill_loss
    if result.distill_loss is not None:
        kd = cfg.training.distillation
        log.info(
            "[%s] round %d: distillation: cross-entropy %.4f, T²·KL to the teacher %.4f (alpha %g, T %g)",
            ticket.party,
            ticket.round,
            result.train_loss,
            result.distill_loss,
            kd.alpha,
            kd.temperature,
        )
    receipt.metrics, receipt.num_samples = metrics, result.num_samples
    if cfg.dp_sgd is not None:
        from fedtune_trainer.dpsgd import epsilon

        receipt.sample_epsilon = epsilon(accountant, cfg.dp_sgd)
        log.info(
            "[%s] round %d: DP-SGD, sample-level ε=%.3f at δ=%g over all rounds trained",
            ticket.party,
            ticket.round,
            receipt.sample_epsilon,
            cfg.dp_sgd.delta,
        )
    receipt.timings.train_seconds = result.seconds
    receipt.sha256, receipt.update_bytes = party_steps.upload(ticket.update_out, update, receipt), len(update)
    if personal:
        log.info(
            "[%s] round %d: personalised accuracy=%s, global part with the initial personal part accuracy=%s",
            ticket.party,
            ticket.round,
            party_steps.fmt(metrics.eval_accuracy),
            party_steps.fmt(metrics.global_eval_accuracy),
        )
    log.info(
        "[%s] round %d: global eval_loss=%s accuracy=%s | local train_loss=%.4f on %d examples in %.1fs",
        ticket.party,
        ticket.round,
        party_steps.fmt(metrics.eval_loss),
        party_steps.fmt(metrics.eval_accuracy),
        result.train_loss,
        result.num_samples,
        result.seconds,
    )


def _secure(ticket: TrainerTicket, rt: PartyRuntime, receipt: TrainerReceipt, ranks: Ranks = SOLO) -> None:
    """Secure aggregation's keys, shares and unmask exchanges: rank 0's alone (fedtune_trainer.secure_party)."""
    if not ranks.lead:
        return
    if ticket.secure is None:
        raise ValueError(f"{ticket.kind} ticket carries no secure block")
    if ticket.kind == "keys":
        secure_party.advertise(ticket, rt.secure, receipt)
    elif ticket.kind == "shares":
        secure_party.deal(ticket, rt.secure, receipt, party_steps.upload)
    else:
        secure_party.reveal(ticket, rt.secure, receipt, party_steps.upload)
    log.info("[%s] round %d: secure aggregation: %s done", ticket.party, ticket.round, ticket.kind)


def _fetch_eval(ticket: TrainerTicket, rt: PartyRuntime, receipt: TrainerReceipt) -> tuple:
    """Rank 0: what every rank needs for an eval ticket: eval examples (downloaded first), global adapter,
    and (personalization) this party's personal part."""
    if ticket.eval_data is None:
        raise ValueError("eval ticket needs evalData")
    evals = party_steps.eval_examples(ticket, rt, receipt)
    own = rt.own_part(ticket, receipt) if ticket.config.personalization is not None else None
    return evals, party_steps.download_global(ticket, receipt), own


def _eval(ticket: TrainerTicket, rt: PartyRuntime, receipt: TrainerReceipt, ranks: Ranks = SOLO) -> None:
    evals, global_state, own = ranks.share(lambda: _fetch_eval(ticket, rt, receipt))
    personal = rt.personal_names(ticket.config)
    if personal:
        with cpu_slots.hold():
            receipt.metrics, _ = personal_party.evaluate_personal(ticket, rt, receipt, global_state, own, evals, ranks)
        if ranks.lead:  # the final personal part, at a fixed key of the party's own bucket
            personal_party.keep_personal(ticket, rt, receipt, own)
    else:
        if fedkseed_party.params(ticket.config) is not None:
            fedkseed_party.replay(ticket, rt, receipt, global_state)
        else:
            party_steps.load_global(rt, global_state, ranks)
        with cpu_slots.hold():
            receipt.metrics = party_steps.evaluate_loaded(ticket, rt, receipt, evals, ranks)
    if ranks.lead:
        log.info(
            "[%s] eval of global %d: loss=%s accuracy=%s perplexity=%s",
            ticket.party,
            ticket.round,
            party_steps.fmt(receipt.metrics.eval_loss),
            party_steps.fmt(receipt.metrics.eval_accuracy),
            party_steps.fmt(receipt.metrics.eval_perplexity),
        )


def _fetch_model(cfg: TrainerConfig) -> None:
    """Rank 0: download s3:// model files into the pod's cache, where the other ranks then find them."""
    from fedtune_trainer.models import resolve_source

    resolve_source(cfg.model, cfg.model_files)


def describe(exc: BaseException) -> str:
    """A one-line reason for a receipt, with every URL's signature removed."""
    text = f"{type(exc).__name__}: {exc}" if not isinstance(exc, (ValueError, transfer.TransferError)) else str(exc)
    return _URL.sub(lambda m: transfer.redact(m.group(0)), text)


def handle(ticket: TrainerTicket, rt: PartyRuntime, ranks: Ranks = SOLO) -> TrainerReceipt:
    """Do one ticket's work and say how it went; failures become ok=False receipts, never exceptions.

    With several ranks every rank calls this for the ticket rank 0 handed out, and each rank's
    receipt but rank 0's is dropped. A failure during training ends the process (Ranks.lockstep).
    """
    receipt = TrainerReceipt(
        kind=ticket.kind, job=ticket.job, party=ticket.party, round=ticket.round, attempt=ticket.attempt, ok=True
    )
    try:
        if ticket.kind != "exit":
            with ranks.together():  # every rank fails the ticket, or none: one alone would wait for the others
                deadline = ticket.deadline if ticket.deadline.tzinfo else ticket.deadline.replace(tzinfo=UTC)
                if utcnow() > deadline:
                    raise TimeoutError(f"ticket {ticket.ticket_id} reached the trainer after its deadline {deadline}")
                if ranks.world > 1 and ranks.lead:
                    _fetch_model(ticket.config)
            with ranks.together():
                receipt.timings.load_seconds = rt.ensure(ticket.config)
            receipt.base_model_fingerprint = rt.fingerprint
            work = {"init": _init, "train": _train, "eval": _eval}.get(ticket.kind, _secure)
            work(ticket, rt, receipt, ranks)
    except Exception as exc:  # the control plane decides what a failure means; the pod stays up
        log.error("[%s] %s failed: %s", ticket.party, ticket.ticket_id, describe(exc))
        receipt.ok, receipt.error = False, describe(exc)
        # An object store out of reach is not this party's failure: the control plane waits for it.
        receipt.fault = "storage" if isinstance(exc, transfer.StorageFailure) else "pod"
    receipt.finished_at = utcnow()
    return receipt


def _raw_receipt(raw: dict[str, Any], ok: bool, error: str | None = None) -> TrainerReceipt:
    """A receipt for a ticket that could not be parsed (or a terse exit ticket)."""
    kind = raw.get("kind") if raw.get("kind") in get_args(TicketKind) else "exit"
    return TrainerReceipt(
        kind=kind,
        job=str(raw.get("job", "")),
        party=str(raw.get("party", "")),
        round=as_int(raw.get("round"), -1),
        attempt=as_int(raw.get("attempt"), 0),
        ok=ok,
        error=error,
        finished_at=utcnow(),
    )


def _configure_threads() -> None:
    import torch

    threads = os.environ.get("OMP_NUM_THREADS")
    if threads and threads.isdigit() and int(threads) > 0:
        torch.set_num_threads(int(threads))  # the runner sizes parties to share the machine


def serve(mailbox_uri: str, poll: float = POLL_SECONDS) -> int:
    """Answer tickets from the mailbox at `mailbox_uri` until an exit ticket; returns 0.

    Under torchrun (several ranks) rank 0 does so and the other ranks follow it.
    """
    _configure_threads()
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # per-tensor loading bars would drown the round log
    except ImportError:
        pass
    ranks, rt = from_env(), PRELOADED or PartyRuntime()
    code = _lead(open_mailbox(mailbox_uri), rt, ranks, poll) if ranks.lead else _follow(rt, ranks)
    ranks.close()
    return code


def _follow(rt: PartyRuntime, ranks: Ranks) -> int:
    """A rank other than 0: take each ticket rank 0 hands out and do this rank's part, until an exit ticket."""
    while True:
        raw = ranks.next_ticket()
        if raw.get("kind") == "exit":
            log.info("[%s] rank %d: exit ticket: stopping", raw.get("party", "?"), ranks.rank)
            return 0
        ticket = TrainerTicket.model_validate(raw)  # rank 0 validated it already
        log.info("[%s] rank %d: ticket %s from rank 0", ticket.party, ranks.rank, ticket.ticket_id)
        handle(ticket, rt, ranks)


def _lead(mailbox: Mailbox, rt: PartyRuntime, ranks: Ranks, poll: float) -> int:
    """Rank 0 (the only rank of a one-process pod): answer tickets from the mailbox until an exit ticket."""
    last: str | None = None
    while True:
        raw = mailbox.wait_ticket(newer_than=last, poll=poll)
        last = ticket_id(raw)
        answered = answers(own_receipt(mailbox), raw)
        if raw.get("kind") == "exit":
            ranks.hand_out(raw)
            if not answered:
                deliver(mailbox, _raw_receipt(raw, ok=True), raw.get("receiptOut"))
            log.info("[%s] exit ticket: stopping", raw.get("party", "?"))
            return 0
        if answered:
            log.info("[%s] ticket %s was answered before a restart; waiting for the next", raw.get("party"), last)
            continue
        try:
            ticket = TrainerTicket.model_validate(raw)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()[:3])
            receipt, receipt_out = _raw_receipt(raw, ok=False, error=f"invalid trainer ticket: {problems}"), None
        else:
            log.info("[%s] ticket %s", ticket.party, last)
            ranks.hand_out(raw)
            receipt, receipt_out = handle(ticket, rt, ranks), ticket.receipt_out
        deliver(mailbox, receipt, receipt_out)
