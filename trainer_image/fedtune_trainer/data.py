"""A party's JSON-lines data turned into token ids, and batches with dynamic padding.

An example is a dict: `input_ids` (list of ints) and `labels` (a class id for classification,
or one id per token for causal LM with -100 wherever no loss is wanted: prompt and padding).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import torch
from fedtune.api.job import DataSchema
from fedtune.api.records import DataError, field, label_id, parse_jsonl

__all__ = ["IGNORE", "DataError", "collate", "load_examples", "parse_jsonl"]

IGNORE = -100  # label id torch's cross-entropy skips


def load_examples(data: bytes, schema: DataSchema, task: str, tokenizer: Any, source: str = "data") -> list[dict]:
    """Parse and tokenize JSON-lines bytes for `task` (sequence-classification or causal-lm)."""
    records = parse_jsonl(data, source)
    if task == "sequence-classification":
        return _classification(records, schema, tokenizer, source)
    if task == "causal-lm":
        return _causal(records, schema, tokenizer, source)
    raise ValueError(f"unknown task {task!r}")


def _classification(records: list, schema: DataSchema, tokenizer: Any, source: str) -> list[dict]:
    texts, label_ids = [], []
    for number, record in records:
        texts.append(str(field(record, schema.text_field, number, source)))
        label_ids.append(label_id(record, schema, number, source))
    encoded = tokenizer(texts, truncation=True, max_length=schema.max_length)["input_ids"]
    return [{"input_ids": list(ids), "labels": label} for ids, label in zip(encoded, label_ids)]


def _split_prompt_response(tokenizer: Any, prompt: str, response: str) -> tuple[str, str]:
    """The text the model reads as prompt, and the text it must learn to produce."""
    if not getattr(tokenizer, "chat_template", None):
        return prompt + "\n", response
    user = [{"role": "user", "content": prompt}]
    head = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": response}], tokenize=False)
    if not full.startswith(head):
        # Some templates render the generation prompt differently; split where the texts diverge.
        n = 0
        while n < min(len(head), len(full)) and head[n] == full[n]:
            n += 1
        head = full[:n]
    return head, full[len(head) :]


def _causal(records: list, schema: DataSchema, tokenizer: Any, source: str) -> list[dict]:
    templated = bool(getattr(tokenizer, "chat_template", None))
    # Templates carry their own begin/end markers; plain text gets the tokenizer's bos/eos.
    bos = [] if templated or tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    eos = [] if templated or tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    heads, tails, numbers = [], [], []
    for number, record in records:
        prompt = str(field(record, schema.prompt_field, number, source))
        response = str(field(record, schema.response_field, number, source))
        head, tail = _split_prompt_response(tokenizer, prompt, response)
        heads.append(head)
        tails.append(tail)
        numbers.append(number)
    head_ids = tokenizer(heads, add_special_tokens=False)["input_ids"]
    tail_ids = tokenizer(tails, add_special_tokens=False)["input_ids"]
    examples = []
    for number, p, r in zip(numbers, head_ids, tail_ids):
        p, r = bos + list(p), list(r) + eos
        if not r:
            raise DataError(f"{source} line {number}: empty {schema.response_field!r}: nothing to learn from")
        p, r = _truncate(p, r, schema.max_length)
        examples.append({"input_ids": p + r, "labels": [IGNORE] * len(p) + r})
    return examples


def _truncate(prompt: list[int], response: list[int], limit: int) -> tuple[list[int], list[int]]:
    """Fit `limit` tokens, keeping at least half of them for the response when it is long.

    Cutting only at the end would leave long-prompt examples with no response tokens (no
    loss); the prompt loses its beginning instead, keeping the part next to the answer.
    """
    if len(prompt) + len(response) <= limit:
        return prompt, response
    keep_response = min(len(response), max(limit - len(prompt), limit // 2))
    keep_prompt = limit - keep_response
    return (prompt[len(prompt) - keep_prompt :] if keep_prompt else []), response[:keep_response]


def collate(examples: Sequence[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad a batch to its longest example (right padding; labels of padding are ignored)."""
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    token_labels = isinstance(examples[0]["labels"], list)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long) if token_labels else None
    for row, example in enumerate(examples):
        n = len(example["input_ids"])
        ids[row, :n] = torch.tensor(example["input_ids"], dtype=torch.long)
        mask[row, :n] = 1
        if labels is not None:
            labels[row, :n] = torch.tensor(example["labels"], dtype=torch.long)
    if labels is None:
        labels = torch.tensor([e["labels"] for e in examples], dtype=torch.long)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def shuffled(n: int, seed: int, rnd: int, epoch: int) -> list[int]:
    """A permutation of range(n) that depends only on (seed, round, epoch): every restart repeats it."""
    order = list(range(n))
    random.Random(f"{seed}/{rnd}/{epoch}").shuffle(order)
    return order
