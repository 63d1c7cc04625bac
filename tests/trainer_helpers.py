"""Shared builders for the trainer tests: configs, toy data sets, loaded tiny models."""

from __future__ import annotations

import json
import random
from pathlib import Path

from fedtune.api.job import DataSchema, DeepSpeedSpec, ModelSpec, PeftSpec, TrainingSpec
from fedtune.api.protocol import TrainerConfig
from tiny_models import LABELS, make_tiny_model

WORDS = "alpha beta gamma delta river stone cloud paper green house".split()


def keyword_jsonl(n: int = 64, seed: int = 0) -> bytes:
    """Classification a tiny model can learn: the label is given away by one keyword."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        label = rng.choice(LABELS)
        words = rng.sample(WORDS, 4)
        words.insert(rng.randrange(5), "excellent" if label == "pos" else "terrible")
        lines.append(json.dumps({"text": " ".join(words), "label": label}))
    return ("\n".join(lines) + "\n").encode()


def echo_jsonl(n: int = 32, seed: int = 0) -> bytes:
    """Causal LM: the response repeats the prompt's last word; every example has the same length."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        words = rng.sample(WORDS, 3)
        lines.append(json.dumps({"prompt": " ".join(words), "response": f"{words[-1]} {words[-1]}"}))
    return ("\n".join(lines) + "\n").encode()


def config(
    path: Path | str,
    task: str,
    method: str = "lora",
    peft_config: dict | None = None,
    deepspeed: DeepSpeedSpec | None = None,
    prox_mu: float = 0.0,
    **training,
) -> TrainerConfig:
    """A TrainerConfig for a tiny model at `path` (training defaults: 20 steps, batch 8, lr 1e-2)."""
    defaults = {"local_steps": 20, "batch_size": 8, "learning_rate": 1e-2, "eval_batch_size": 16}
    if "local_epochs" in training:
        defaults.pop("local_steps")
    return TrainerConfig(
        model=ModelSpec(source=str(path), task=task),
        peft=PeftSpec(
            method=method, config={"r": 4} if peft_config is None and method == "lora" else peft_config or {}
        ),
        data=DataSchema(labels=LABELS, max_length=32),
        training=TrainingSpec(**{**defaults, **training}),
        deepspeed=deepspeed or DeepSpeedSpec(),
        prox_mu=prox_mu,
    )


def build(cfg: TrainerConfig, data: bytes | None = None):
    """(peft model, tokenizer, examples) for a config, as a party would load them."""
    from fedtune_trainer.data import load_examples
    from fedtune_trainer.models import apply_peft, load_base_model

    base, tokenizer = load_base_model(cfg.model, cfg.data, cfg.training.seed)
    model = apply_peft(base, cfg.peft, cfg.model.task, cfg.training.seed)
    if data is None:
        data = keyword_jsonl() if cfg.model.task == "sequence-classification" else echo_jsonl()
    return model, tokenizer, load_examples(data, cfg.data, cfg.model.task, tokenizer)


def tiny_paths(tmp_path_factory) -> dict[str, Path]:
    """Both tiny models, saved once per session."""
    root = tmp_path_factory.mktemp("tiny")
    return {task: make_tiny_model(root / task, task) for task in ("sequence-classification", "causal-lm")}
