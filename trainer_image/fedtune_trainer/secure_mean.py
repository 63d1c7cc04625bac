"""The aggregator's side of secure aggregation: the mean of the round's updates from their masked sum.

It downloads the survivors' masked updates, every dealer's shares object (for the commitments that
authenticate a revealed share) and the survivors' reveals, each checked against the sha256 its
owner's receipt gave; rebuilds the survivors' self masks and the dropped parties' mask keys from t
valid shares; removes the masks from the sum; and divides by the total weight. It never holds one
party's update in clear: only the sum exists unmasked. A masked update that cannot be used (refused on
download, or not one uint64 vector of the global's length) fails the round (its masks could not be removed
without revealing what they hide), naming the party in receipt.rejected.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from fedtune.api.protocol import AggregatorReceipt, AggregatorTicket

from fedtune_trainer import secagg, secure_vectors, transfer
from fedtune_trainer.tensorfile import TensorFile

log = logging.getLogger(__name__)


SMALL_OBJECT_BYTES = 1024 * 1024  # a shares object or a reveal: ~300 bytes per party


def _get(url: str, sha256: str, what: str, path: Path, max_bytes: int) -> bytes:
    """The object, refused above `max_bytes` or unless it has the sha256 its owner's receipt gave."""
    try:
        transfer.get_to_file(url, path, sha256, max_bytes=max_bytes)
    except transfer.StorageFailure:
        raise
    except transfer.TransferError as exc:
        raise ValueError(f"secure aggregation: {what}: {exc}") from None
    return path.read_bytes()


def secure_mean(
    ticket: AggregatorTicket, global_prev: TensorFile, workdir: Path, receipt: AggregatorReceipt
) -> dict[str, torch.Tensor]:
    """The weighted mean of the survivors' updates (global + Σ wᵢ·deltaᵢ / Σ wᵢ), from masked uploads only."""
    sec = ticket.secure
    ctx = secagg.Context(job=ticket.job, round=ticket.round, attempt=ticket.attempt)
    n = secure_vectors.length(global_prev)
    limit = 8 * n + 1024 * 1024  # one uint64 per value and a header
    jobs = [(f"masked update of {u.party}", u.url, u.sha256, limit) for u in ticket.updates]
    jobs += [(f"shares of {p}", o.url, o.sha256, SMALL_OBJECT_BYTES) for p, o in sec.shares_in.items()]
    jobs += [(f"reveal of {p}", o.url, o.sha256, SMALL_OBJECT_BYTES) for p, o in sec.reveals_in.items()]
    with ThreadPoolExecutor(max_workers=8) as pool:
        got = [
            pool.submit(_get, url, sha, what, workdir / f"secure-{i}", cap)
            for i, (what, url, sha, cap) in enumerate(jobs)
        ]
    updates = len(ticket.updates)  # the first jobs: a failure there is the party's (storage failures aside)
    blobs, unusable = {}, {}
    for i, ((what, *_), f) in enumerate(zip(jobs, got)):
        try:
            blobs[what] = f.result()
        except ValueError as exc:
            if i >= updates:
                raise
            unusable[ticket.updates[i].party] = str(exc)
    receipt.bytes_down += sum(len(b) for b in blobs.values())
    masked = {}
    for u in ticket.updates:
        if u.party not in unusable:
            try:
                masked[u.party] = secure_vectors.from_bytes(
                    blobs[f"masked update of {u.party}"], n, f"masked update of {u.party}"
                )
            except ValueError as exc:
                unusable[u.party] = str(exc)
    if unusable:
        # The sum needs every survivor's masked vector, and this attempt's reveals gave out the self-mask
        # shares of these parties: their masks cannot be removed without revealing what they hide. The round
        # fails naming them (rejected: the control plane counts a failure against each) and is retried with
        # fresh keys.
        receipt.rejected.update(unusable)
        for party, why in unusable.items():
            log.warning("round %d: secure aggregation: rejected %s: %s", ticket.round, party, why)
        raise ValueError(
            f"secure aggregation needs every survivor's masked update to unmask their sum; {len(unusable)} "
            f"cannot be used: {'; '.join(unusable.values())}"
        )
    shares = {p: blobs[f"shares of {p}"] for p in sec.shares_in}
    reveals = {p: blobs[f"reveal of {p}"] for p in sec.reveals_in}
    roster = {p: secagg.PublicKeys(c=k.c, s=k.s) for p, k in sec.roster.items()}
    total, refused = secagg.unmask(
        ctx,
        masked,
        roster,
        list(sec.dropped),
        shares,
        reveals,
        sec.threshold,
    )
    for holder, why in refused.items():
        log.warning("round %d: secure aggregation: a share revealed by %s was refused: %s", ticket.round, holder, why)
    weight = sum(float(u.num_samples) for u in ticket.updates) if sec.weighted else float(len(ticket.updates))
    receipt.accepted.extend(u.party for u in ticket.updates)
    log.info(
        "round %d: secure aggregation: unmasked the sum of %d update(s) (%d dropped after dealing, %d reveal(s))",
        ticket.round,
        len(masked),
        len(sec.dropped),
        len(reveals),
    )
    return secure_vectors.add_delta(global_prev, secagg.dequantise(total, weight))
