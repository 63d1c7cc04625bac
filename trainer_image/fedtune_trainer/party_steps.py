"""The steps a party's ticket handlers share: fetch the global adapter and the data a round needs,
load the global on every rank, evaluate the loaded adapter, upload a result."""

from __future__ import annotations

import time

from fedtune.api.protocol import TrainerReceipt, TrainerTicket, Upload
from fedtune.api.status import Metrics

from fedtune_trainer import transfer
from fedtune_trainer.party_runtime import PartyRuntime
from fedtune_trainer.ranks import Ranks


def download_global(ticket: TrainerTicket, receipt: TrainerReceipt) -> dict:
    """Rank 0: the tensors of the global adapter the ticket names."""
    from fedtune_trainer.adapters import from_bytes

    if ticket.global_in is None:
        raise ValueError(f"{ticket.kind} ticket carries no globalIn adapter")
    start = time.perf_counter()
    raw = transfer.get(ticket.global_in.url, ticket.global_in.sha256)
    receipt.bytes_down += len(raw)
    receipt.timings.download_seconds += time.perf_counter() - start
    return from_bytes(raw)


def load_global(rt: PartyRuntime, tensors: dict, ranks: Ranks) -> None:
    """Every rank: reset the adapter to the global one (under ZeRO-3 a collective: fedtune_trainer.engines)."""
    from fedtune_trainer.adapters import check_adapter_state, load_adapter_state

    with ranks.together():
        check_adapter_state(rt.model, tensors)  # the same verdict on every rank: same model, same tensors
    with ranks.lockstep("loading the global adapter"):
        load_adapter_state(rt.model, tensors)


def eval_examples(ticket: TrainerTicket, rt: PartyRuntime, receipt: TrainerReceipt) -> list[dict] | None:
    """Rank 0: the examples evaluation runs on (None without an eval split)."""
    if ticket.eval_data is None:
        return None
    return rt.examples(ticket.job, ticket.eval_data, ticket.config, receipt)[: ticket.config.training.max_eval_samples]


def evaluate_loaded(
    ticket: TrainerTicket, rt: PartyRuntime, receipt: TrainerReceipt, data: list[dict] | None, ranks: Ranks
) -> Metrics:
    """Every rank: the metrics of the loaded adapter on `data`, each rank evaluating its share."""
    from fedtune_trainer.engines import forward_engine
    from fedtune_trainer.evaluate import evaluate

    cfg = ticket.config
    if data is None:
        return Metrics()
    start = time.perf_counter()
    with ranks.lockstep("evaluating"), forward_engine(rt.model, cfg):
        metrics = evaluate(
            rt.model,
            data,
            cfg.model.task,
            cfg.training.eval_batch_size,
            rt.tokenizer.pad_token_id,
            cfg.training.precision,
            ranks,
        )
    receipt.timings.eval_seconds = time.perf_counter() - start
    receipt.num_eval_samples = len(data)
    return metrics


def upload(target: str | Upload, data: bytes, receipt: TrainerReceipt) -> str:
    start = time.perf_counter()
    digest = transfer.put(target, data)  # in parts when the control plane made it a multipart upload
    receipt.bytes_up += len(data)
    receipt.timings.upload_seconds += time.perf_counter() - start
    return digest


def fetch_round(ticket: TrainerTicket, rt: PartyRuntime, receipt: TrainerReceipt) -> tuple:
    """Rank 0: what every rank needs for a train ticket: training examples, global adapter, eval examples,
    and (personalization) this party's personal part."""
    train = rt.examples(ticket.job, ticket.train_data, ticket.config, receipt)
    global_state, evals = download_global(ticket, receipt), eval_examples(ticket, rt, receipt)
    own = rt.own_part(ticket, receipt) if ticket.config.personalization is not None else None
    return train, global_state, evals, own


def fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"
