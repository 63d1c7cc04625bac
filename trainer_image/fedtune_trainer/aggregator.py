"""The aggregator: turns one round's party updates into the next global adapter.

It holds no credentials: every object comes and goes through presigned URLs in its ticket.
`handle` does one ticket and always returns a receipt (errors become ok=False with the
reason, so a bad round never becomes a crash loop); `serve` answers tickets from a mailbox
until told to exit, and skips a ticket its mailbox already answered (a restart).
"""

from __future__ import annotations

import logging
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from fedtune.api.mailbox import POLL_SECONDS, ticket_id
from fedtune.api.protocol import AggregatorReceipt, AggregatorTicket, Download
from fedtune.api.status import utcnow
from pydantic import ValidationError
from safetensors.torch import save as save_safetensors

from fedtune_trainer import fedkseed, privacy, transfer
from fedtune_trainer.mailbox import answers, as_int, deliver, open_mailbox, own_receipt
from fedtune_trainer.secure_mean import secure_mean
from fedtune_trainer.strategies import Strategy, aggregate_round, make_strategy
from fedtune_trainer.tensorfile import TensorFile
from fedtune_trainer.verify import UpdateRejected, open_verified

log = logging.getLogger(__name__)


def serialise(tensors: dict[str, torch.Tensor]) -> bytes:
    """safetensors bytes with peft's metadata, so the global loads as an adapter_model file."""
    return save_safetensors({k: v.contiguous() for k, v in tensors.items()}, metadata={"format": "pt"})


def _fetch_verified(
    download: Download, path: Path, reference: TensorFile | None, receipt: AggregatorReceipt, source: str
) -> TensorFile:
    """Stream `download` to `path` and open it verified (open_verified words a hash mismatch for the receipt)."""
    digest, size = transfer.get_to_file(download.url, path)
    receipt.bytes_down += size
    return open_verified(path, digest, download.sha256, reference, source=source)


def update_limit(global_bytes: int) -> int:
    """The most bytes an update may have: a party chooses its update's size, the aggregator's disk is shared.

    An update holds the global adapter's tensors (same names, shapes and dtypes, checked later),
    and compression only shrinks them; twice the global's size plus 1 MiB leaves room for a
    larger header and per-row int8 scales, yet stops a huge upload from filling the disk.
    """
    return 2 * global_bytes + 1024 * 1024


def _describe(exc: Exception) -> str:
    """Expected failures carry their own wording; anything else also names its type."""
    if isinstance(exc, (ValueError, transfer.TransferError)):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def _collect_updates(
    ticket: AggregatorTicket, global_prev: TensorFile, workdir: Path, receipt: AggregatorReceipt
) -> tuple[list[TensorFile], list[float]]:
    """Download each update to `workdir` and verify it; refusals go to receipt.rejected, the round goes on.

    Accepted updates stay on disk and are read one tensor at a time by the strategies, so memory
    does not grow with the number of parties.
    """
    tensors: list[TensorFile] = []
    weights: list[float] = []
    seen: set[str] = set()
    updates = []
    for upd in ticket.updates:
        if upd.party in seen:
            log.warning("ticket lists party %s twice; using its first update only", upd.party)
            continue
        seen.add(upd.party)
        updates.append(upd)

    paths = [workdir / f"update-{i}.safetensors" for i in range(len(updates))]  # party names hold "/"
    limit = update_limit(global_prev.path.stat().st_size)
    # FedKSeed: an update is (seed, scalar) pairs, not the global's tensors; checked against K below.
    kseed = fedkseed.is_global(global_prev)
    reference = None if kseed else global_prev
    with ThreadPoolExecutor(max_workers=min(8, len(updates) or 1)) as pool:  # downloads overlap; checks do not
        downloads = [
            pool.submit(transfer.get_to_file, upd.url, path, max_bytes=limit) for upd, path in zip(updates, paths)
        ]
    for upd, path, download in zip(updates, paths, downloads):
        try:
            digest, size = download.result()
            receipt.bytes_down += size  # counted here, in one thread
            source = f"update from {upd.party}"
            tensors.append(opened := open_verified(path, digest, upd.sha256, reference, source=source))
            if kseed:
                try:
                    fedkseed.check_update(opened, global_prev[fedkseed.ACCUM].numel(), source)
                except ValueError as exc:
                    tensors.pop()
                    raise UpdateRejected(str(exc)) from None
        except UpdateRejected as exc:
            reason = str(exc)
        except transfer.StorageFailure:
            raise  # the storage's failure, not the party's: the round waits for the storage
        except transfer.TransferError as exc:
            reason = f"update from {upd.party}: {exc}"
        else:
            receipt.accepted.append(upd.party)
            weights.append(float(upd.num_samples))
            continue
        receipt.rejected[upd.party] = reason
        log.warning("round %d: rejected %s", ticket.round, reason)
    return tensors, weights


def _aggregate(ticket: AggregatorTicket, receipt: AggregatorReceipt) -> None:
    # Validate the strategy before moving any bytes: a bad spec should fail fast.
    strategy = make_strategy(ticket.strategy, ticket.strategy_params)
    if ticket.global_in is None:
        raise ValueError("aggregate ticket has no globalIn: there is no previous global adapter to start from")
    if ticket.global_out is None:
        raise ValueError("aggregate ticket has no globalOut: nowhere to upload the new global adapter")
    # Every object goes to disk and is read a tensor at a time; the directory goes with the round.
    with tempfile.TemporaryDirectory(prefix="fedtune-aggregate-") as tmp:
        _aggregate_in(ticket, strategy, Path(tmp), receipt)


def _aggregate_in(ticket: AggregatorTicket, strategy: Strategy, workdir: Path, receipt: AggregatorReceipt) -> None:
    global_prev = _fetch_verified(
        ticket.global_in, workdir / "global.safetensors", None, receipt, "global adapter (globalIn)"
    )
    if ticket.state_in is not None:
        state = _fetch_verified(ticket.state_in, workdir / "state.safetensors", None, receipt, "server state (stateIn)")
        strategy.load_state_dict(state)

    if ticket.secure is not None:  # masked updates: only their sum is ever in clear
        updates, weights = [secure_mean(ticket, global_prev, workdir, receipt)], [1.0]
    else:
        updates, weights = _collect_updates(ticket, global_prev, workdir, receipt)
    needed = 1 if ticket.secure is not None else max(1, ticket.min_updates)
    if len(updates) < needed:
        why = f"; rejected: {'; '.join(receipt.rejected.values())}" if receipt.rejected else ""
        receipt.error = (
            f"quorum not reached: {len(updates)} of {len(ticket.updates)} update(s) usable, "
            f"at least {needed} needed{why}"
        )
        log.error("round %d: %s", ticket.round, receipt.error)
        return

    new_global, residual = _combine(ticket, global_prev, updates, weights, strategy)
    blob = serialise(new_global)
    state = strategy.state_dict()
    if state and not ticket.state_out:
        log.warning("%s keeps server state but the ticket has no stateOut: a restart loses it", strategy.name)
    state_blob = serialise(state) if state and ticket.state_out else None
    with ThreadPoolExecutor(max_workers=2) as pool:  # the two uploads overlap
        sent_state = pool.submit(transfer.put, ticket.state_out, state_blob) if state_blob is not None else None
        receipt.sha256 = transfer.put(ticket.global_out, blob)
        receipt.bytes_up += len(blob)
        if sent_state is not None:
            receipt.state_sha256 = sent_state.result()
            receipt.bytes_up += len(state_blob)
    receipt.lora_residual = residual
    receipt.ok = True
    log.info(
        "round %d: aggregated %d update(s) of %s with %s (%s, robust %s), residual %s",
        ticket.round,
        len(updates),
        receipt.accepted,
        strategy.name,
        ticket.lora_mode,
        ticket.robust.to_wire() if ticket.robust else "off",
        residual,
    )


def _combine(
    ticket: AggregatorTicket,
    global_prev: TensorFile,
    updates: list[TensorFile],
    weights: list[float],
    strategy: Strategy,
) -> tuple[dict[str, torch.Tensor], float | None]:
    """The strategy's step from the round's mean: sample-weighted, or with differential privacy the
    unweighted mean of clipped updates plus noise (central) or of updates the parties noised (local)."""
    dp = ticket.dp
    if fedkseed.is_global(global_prev):  # the paper's server step: per seed, the weighted mean of the scalars
        pairs = [(u[fedkseed.SEEDS], u[fedkseed.GRADS]) for u in updates]
        return {fedkseed.ACCUM: fedkseed.aggregate(global_prev[fedkseed.ACCUM], pairs, weights)}, None
    if ticket.secure is not None:  # one update: the mean of the masked ones (local DP noised each already)
        return strategy.aggregate(global_prev, updates[0]), None
    if dp is None:
        return aggregate_round(global_prev, updates, weights, strategy, ticket.lora_mode, ticket.robust)
    if ticket.lora_mode != "average":
        raise ValueError("differential privacy needs loraMode average (the control plane refuses exact with it)")
    if dp.mode == "local":  # each update carries its party's clipping and noise already: any rule is post-processing
        return aggregate_round(global_prev, updates, [1.0] * len(updates), strategy, "average", ticket.robust)
    mean, clipped = privacy.private_mean(
        global_prev, updates, dp.clip_norm, dp.noise_multiplier, privacy.noise_generator()
    )
    log.info(
        "round %d: differential privacy: %d of %d update(s) clipped to %g",
        ticket.round,
        clipped,
        len(updates),
        dp.clip_norm,
    )
    return strategy.aggregate(global_prev, mean), None


def handle(ticket: AggregatorTicket) -> AggregatorReceipt:
    """Do one aggregator ticket and return its receipt; never raises for a failed round.

    Downloads global_in (hash-checked; the reference for names, shapes, dtypes), state_in if
    any, and every update (verified; refused ones are listed in receipt.rejected). Below
    ticket.min_updates accepted updates the receipt is ok=False with the quorum explained;
    otherwise the new global (and the strategy's state, if it has any) is uploaded.
    """
    start = time.monotonic()
    receipt = AggregatorReceipt(kind=ticket.kind, job=ticket.job, round=ticket.round, attempt=ticket.attempt, ok=False)
    if ticket.kind == "exit":
        receipt.ok = True
    else:
        try:
            _aggregate(ticket, receipt)
        except Exception as exc:  # any failure must become a receipt, not a crash loop
            receipt.ok = False
            receipt.error = _describe(exc)
            receipt.fault = "storage" if isinstance(exc, transfer.StorageFailure) else "pod"
            log.exception("round %d: aggregation failed", ticket.round)
    receipt.duration_seconds = round(time.monotonic() - start, 3)
    receipt.finished_at = utcnow()
    return receipt


def _invalid_ticket_receipt(raw: dict[str, Any], exc: ValidationError) -> AggregatorReceipt:
    problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()[:3])
    return AggregatorReceipt(
        job=str(raw.get("job", "")),
        round=as_int(raw.get("round"), -1),
        attempt=as_int(raw.get("attempt"), 0),
        ok=False,
        error=f"invalid aggregator ticket: {problems}",
        finished_at=utcnow(),
    )


def serve(mailbox_uri: str, poll: float = POLL_SECONDS) -> int:
    """Answer aggregator tickets from the mailbox at `mailbox_uri` until an exit ticket; returns 0."""
    mailbox = open_mailbox(mailbox_uri)
    last: str | None = None
    while True:
        raw = mailbox.wait_ticket(newer_than=last, poll=poll)
        last = ticket_id(raw)
        answered = answers(own_receipt(mailbox), raw)
        if raw.get("kind") == "exit":
            # Checked before full validation: a pod must stop even on a terse exit ticket.
            if not answered:
                receipt = AggregatorReceipt(
                    kind="exit",
                    job=str(raw.get("job", "")),
                    round=as_int(raw.get("round"), 0),
                    attempt=as_int(raw.get("attempt"), 0),
                    ok=True,
                    finished_at=utcnow(),
                )
                deliver(mailbox, receipt, raw.get("receiptOut"))
            log.info("exit ticket: stopping")
            return 0
        if answered:
            log.info("ticket %s already answered before a restart; waiting for the next", last)
            continue
        try:
            ticket = AggregatorTicket.model_validate(raw)
        except ValidationError as exc:
            receipt, receipt_out = _invalid_ticket_receipt(raw, exc), None
        else:
            log.info("ticket %s: %d update(s)", last, len(ticket.updates))
            receipt, receipt_out = handle(ticket), ticket.receipt_out
        deliver(mailbox, receipt, receipt_out)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if len(sys.argv) != 2:
        sys.exit("usage: python -m fedtune_trainer.aggregator MAILBOX")
    sys.exit(serve(sys.argv[1]))
