"""Evaluation of the current adapter on a party's local eval split."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from fedtune.api.status import Metrics

from fedtune_trainer.data import IGNORE, batches
from fedtune_trainer.device import autocast, model_device, to_device


def evaluate(
    model: torch.nn.Module,
    data: Sequence[dict],
    task: str,
    batch_size: int,
    pad_id: int | None = None,
    precision: str = "fp32",
) -> Metrics:
    """eval_loss (per example for classification, per response token for causal LM), plus
    eval_accuracy (classification) or eval_perplexity = exp(eval_loss) (causal LM).

    Batches go to the model's device; `precision` (training.precision) autocasts the forward pass."""
    if not data:
        return Metrics()
    if pad_id is None:
        pad_id = getattr(model.config, "pad_token_id", None) or 0
    was_training = model.training
    model.eval()
    loss_sum, weight, correct = 0.0, 0, 0
    try:
        dev = model_device(model)
        with torch.no_grad():
            for batch in batches(data, batch_size, pad_id):
                batch = to_device(batch, dev)
                with autocast(dev, precision):
                    out = model(**batch)
                labels = batch["labels"]
                if task == "sequence-classification":
                    n = labels.shape[0]
                    correct += int((out.logits.argmax(dim=-1) == labels).sum())
                else:
                    # The model's loss is a mean over predicted tokens (labels shifted by one);
                    # weighting by that count makes the total a true per-token mean.
                    n = int((labels[:, 1:] != IGNORE).sum())
                loss_sum += float(out.loss) * n
                weight += n
    finally:
        model.train(was_training)
    loss = loss_sum / max(weight, 1)
    if task == "sequence-classification":
        return Metrics(eval_loss=loss, eval_accuracy=correct / len(data))
    return Metrics(eval_loss=loss, eval_perplexity=math.exp(min(loss, 700.0)))  # exp overflows past ~709
