"""Teacher preparation for knowledge distillation (`fedtune teacher`, training.distillation).

As in the FedKD-LoRA setup, the teacher is fine-tuned first, centrally, on a public share of the
data: the coordinator holds it and never sees a party's private data. Preparation is full
fine-tuning (every weight of the base model trains; no adapter to merge) for a few epochs with
AdamW, reading and tokenizing the public JSON-lines file exactly as the parties read theirs. The
result is a plain transformers checkpoint (weights, config with the job's labels, tokenizer) that
the job's training.distillation.teacher then names.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path

import torch
from fedtune.api.protocol import TrainerConfig

from fedtune_trainer.data import collate, load_examples, shuffled
from fedtune_trainer.device import model_device, pick_device, to_device
from fedtune_trainer.evaluate import evaluate
from fedtune_trainer.models import load_base_model

PROVENANCE = "fedtune_teacher.json"  # written next to the checkpoint: what it was trained from


def prepare_teacher(
    cfg: TrainerConfig,
    public: bytes,
    output: Path,
    epochs: int,
    learning_rate: float,
    eval_data: bytes | None = None,
    log=print,
) -> dict:
    """Fine-tune cfg.model on the `public` JSON lines for `epochs` epochs and save it under `output`.

    Returns what it also writes to output/fedtune_teacher.json: base, data digest, epochs, losses
    and the accuracy on `eval_data` (or on the public data itself when none is given).
    """
    if cfg.model.task != "sequence-classification":
        raise ValueError(f"teacher preparation supports sequence-classification (not {cfg.model.task})")
    tr = cfg.training
    # The teacher is never quantised: it is fine-tuned in full.
    spec = cfg.model.model_copy(update={"quantization": None})
    net, tokenizer = load_base_model(spec, cfg.data, tr.seed)
    examples = load_examples(public, cfg.data, spec.task, tokenizer, source="public data")
    if not examples:
        raise ValueError("the public data holds no examples")
    net.requires_grad_(True)
    net.to(pick_device())  # a GPU when there is one
    dev = model_device(net)
    optimizer = torch.optim.AdamW(net.parameters(), lr=learning_rate, weight_decay=tr.weight_decay)
    pad = tokenizer.pad_token_id
    torch.manual_seed(tr.seed)
    losses = []
    start = time.perf_counter()
    net.train()
    for epoch in range(epochs):
        order = shuffled(len(examples), tr.seed, 0, epoch)
        total = 0.0
        for i in range(0, len(order), tr.batch_size):
            idx = order[i : i + tr.batch_size]
            loss = net(**to_device(collate([examples[j] for j in idx], pad), dev)).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), tr.max_grad_norm)
            optimizer.step()
            total += float(loss.detach()) * len(idx)
        losses.append(total / len(examples))
        log(f"teacher epoch {epoch + 1}/{epochs}: train loss {losses[-1]:.4f}")
    net.eval()
    held = load_examples(eval_data, cfg.data, spec.task, tokenizer, source="eval data") if eval_data else examples
    metrics = evaluate(net, held, spec.task, tr.eval_batch_size, pad)
    output.mkdir(parents=True, exist_ok=True)
    net.save_pretrained(output, safe_serialization=True)
    tokenizer.save_pretrained(output)
    doc = {
        "base": cfg.model.source,
        "method": "full fine-tuning",
        "publicData": {"sha256": hashlib.sha256(public).hexdigest(), "examples": len(examples)},
        "epochs": epochs,
        "learningRate": learning_rate,
        "trainLoss": losses,
        "evalOn": "eval data" if eval_data else "public data",
        "evalLoss": metrics.eval_loss,
        "evalAccuracy": metrics.eval_accuracy,
        "seconds": round(time.perf_counter() - start, 2),
    }
    (output / PROVENANCE).write_text(json.dumps(doc, indent=2) + "\n")
    log(
        f"teacher saved to {output}: accuracy {metrics.eval_accuracy:.4f} on the {doc['evalOn']} ({len(held)} examples)"
    )
    return doc


def main(argv: list[str]) -> int:
    """`python -m fedtune_trainer teacher --config FILE --data FILE --output DIR ...` (what `fedtune teacher` runs)."""
    import argparse

    parser = argparse.ArgumentParser(prog="fedtune_trainer teacher", description=__doc__)
    parser.add_argument("--config", required=True, help="a trainer config (JSON): model, data schema, training")
    parser.add_argument("--data", required=True, help="the public JSON-lines share to fine-tune on")
    parser.add_argument("--output", required=True, help="directory to write the checkpoint to")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--learning-rate", type=float, default=5e-5)
    parser.add_argument("--eval", default=None, help="held-out JSON lines to report the teacher's accuracy on")
    args = parser.parse_args(argv)
    cfg = TrainerConfig.model_validate_json(Path(args.config).read_text())
    evals = Path(args.eval).read_bytes() if args.eval else None
    try:
        prepare_teacher(cfg, Path(args.data).read_bytes(), Path(args.output), args.epochs, args.learning_rate, evals)
    except ValueError as exc:  # data or model mistakes: say what, not a traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
