"""Evaluation of the current adapter on a party's local eval split.

A pod of several ranks evaluates on all of them: each rank runs its share of the batches, and the
sums are added up over the ranks, so the metrics are those of one process over the whole split.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from fedtune.api.status import Metrics

from fedtune_trainer.data import IGNORE, collate
from fedtune_trainer.device import autocast, model_device, to_device
from fedtune_trainer.ranks import SOLO, Ranks


def evaluate(
    model: torch.nn.Module,
    data: Sequence[dict],
    task: str,
    batch_size: int,
    pad_id: int | None = None,
    precision: str = "fp32",
    ranks: Ranks = SOLO,
) -> Metrics:
    """eval_loss (per example for classification, per response token for causal LM), plus
    eval_accuracy (classification) or eval_perplexity = exp(eval_loss) (causal LM).

    Batches go to the model's device; `precision` (training.precision) autocasts the forward pass.
    With several `ranks` every rank calls this with the same data and runs the same number of
    forward passes (a ZeRO-3 forward gathers weights from every rank); all get the same metrics."""
    if not data:
        return Metrics()
    if pad_id is None:
        pad_id = getattr(model.config, "pad_token_id", None) or 0
    starts = range(0, len(data), batch_size)  # the one-process batches, in order
    mine = [(start, True) for start in starts[ranks.rank :: ranks.world]]
    # A rank with one batch fewer than others runs the first batch once more and drops its result.
    padding = [(0, False)] * (math.ceil(len(starts) / ranks.world) - len(mine))
    was_training = model.training
    model.eval()
    sums = (0.0, 0, 0)  # loss x weight, weight (examples or predicted tokens), correct predictions
    try:
        dev = model_device(model)
        with torch.no_grad():
            for start, counts in mine + padding:
                batch = to_device(collate(data[start : start + batch_size], pad_id), dev)
                with autocast(dev, precision):
                    out = model(**batch)
                if counts:
                    sums = tuple(s + c for s, c in zip(sums, _counts(out, batch["labels"], task)))
    finally:
        model.train(was_training)
    loss_sum, weight, correct = ranks.sum(*sums)
    loss = loss_sum / max(weight, 1)
    if task == "sequence-classification":
        return Metrics(eval_loss=loss, eval_accuracy=correct / len(data))
    return Metrics(eval_loss=loss, eval_perplexity=math.exp(min(loss, 700.0)))  # exp overflows past ~709


def _counts(out, labels: torch.Tensor, task: str) -> tuple[float, int, int]:
    """One batch's (loss x weight, weight, correct predictions)."""
    if task == "sequence-classification":
        n = labels.shape[0]
        return float(out.loss) * n, n, int((out.logits.argmax(dim=-1) == labels).sum())
    # The model's loss is a mean over predicted tokens (labels shifted by one); weighting by that
    # count makes the total a true per-token mean.
    n = int((labels[:, 1:] != IGNORE).sum())
    return float(out.loss) * n, n, 0
