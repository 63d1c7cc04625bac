"""JSON-lines parsing, tokenization with loss masks, batching and the local training schedule."""

from __future__ import annotations

import json

import pytest
import torch
from fedtune.api.job import DataSchema
from fedtune_trainer.data import IGNORE, DataError, collate, load_examples, parse_jsonl
from fedtune_trainer.train import schedule
from tiny_models import LABELS, minilm_dir
from trainer_helpers import config

CLS, LM = "sequence-classification", "causal-lm"


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_dir())


def _jsonl(*docs) -> bytes:
    return "\n".join(d if isinstance(d, str) else json.dumps(d) for d in docs).encode()


def test_malformed_line_is_named():
    data = _jsonl({"text": "a", "label": "pos"}, "", '{"text": "b", "label": ', {"text": "c", "label": "neg"})
    with pytest.raises(DataError, match=r"train\.jsonl line 3: invalid JSON"):
        parse_jsonl(data, "train.jsonl")
    with pytest.raises(DataError, match="line 2: expected a JSON object"):
        parse_jsonl(_jsonl({"text": "a"}, [1, 2]))
    with pytest.raises(DataError, match="empty"):
        parse_jsonl(b"\n\n")


def test_blank_lines_are_skipped_and_numbers_kept():
    records = parse_jsonl(_jsonl({"a": 1}, "", {"a": 2}))
    assert [n for n, _ in records] == [1, 3]


def test_unknown_label_names_line_and_allowed_labels(tokenizer):
    schema = DataSchema(labels=LABELS)
    data = _jsonl({"text": "fine", "label": "pos"}, {"text": "meh", "label": "neutral"})
    with pytest.raises(DataError, match=r"line 2: unknown label 'neutral'.*allowed labels: neg, pos"):
        load_examples(data, schema, CLS, tokenizer)
    with pytest.raises(DataError, match=r"line 1: missing field 'label'"):
        load_examples(_jsonl({"text": "x"}), schema, CLS, tokenizer)


def test_numeric_labels_match_numeric_class_names(tokenizer):
    schema = DataSchema(labels=["0", "1", "2"], text_field="body", label_field="y")
    examples = load_examples(_jsonl({"body": "a", "y": 2}, {"body": "b", "y": "0"}), schema, CLS, tokenizer)
    assert [e["labels"] for e in examples] == [2, 0]
    with pytest.raises(DataError, match="unknown label True"):
        load_examples(_jsonl({"body": "a", "y": True}), schema, CLS, tokenizer)


def test_classification_truncates_to_max_length(tokenizer):
    schema = DataSchema(labels=LABELS, max_length=8)
    (example,) = load_examples(_jsonl({"text": "word " * 50, "label": "neg"}), schema, CLS, tokenizer)
    assert len(example["input_ids"]) == 8 and example["labels"] == 0
    assert example["input_ids"][0] == tokenizer.cls_token_id and example["input_ids"][-1] == tokenizer.sep_token_id


def test_causal_lm_loss_covers_the_response_only(tokenizer):
    schema = DataSchema(max_length=64)
    (example,) = load_examples(_jsonl({"prompt": "what is two plus two", "response": "four"}), schema, LM, tokenizer)
    response = tokenizer("four", add_special_tokens=False)["input_ids"]
    kept = [t for t in example["labels"] if t != IGNORE]
    assert kept == response
    assert example["input_ids"][-len(response) :] == response
    assert example["labels"][: -len(response)] == [IGNORE] * (len(example["input_ids"]) - len(response))


def test_causal_lm_uses_the_chat_template(tokenizer):
    templated = type(tokenizer).from_pretrained(minilm_dir())
    templated.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} {% endfor %}"
        "{% if add_generation_prompt %}<assistant> {% endif %}"
    )
    (example,) = load_examples(_jsonl({"prompt": "hi there", "response": "hello"}), DataSchema(), LM, templated)
    text = templated.decode(example["input_ids"])
    assert text.startswith("< user > hi there < assistant >")
    kept = [t for t in example["labels"] if t != IGNORE]
    assert templated.decode(kept) == "hello"


def test_causal_truncation_keeps_the_response(tokenizer):
    schema = DataSchema(max_length=10)
    data = _jsonl({"prompt": " ".join("abcdefghijklmnop"), "response": "x y z"})
    (example,) = load_examples(data, schema, LM, tokenizer)
    assert len(example["input_ids"]) == 10
    assert [t for t in example["labels"] if t != IGNORE] == tokenizer("x y z", add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(example["input_ids"][:7]) == "j k l m n o p", "the prompt loses its beginning"
    with pytest.raises(DataError, match="line 1: empty 'response'"):
        load_examples(_jsonl({"prompt": "q", "response": ""}), schema, LM, tokenizer)


def test_collate_pads_dynamically():
    batch = collate([{"input_ids": [5, 6, 7], "labels": [IGNORE, 6, 7]}, {"input_ids": [8], "labels": [8]}], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE, 6, 7], [8, IGNORE, IGNORE]]
    classes = collate([{"input_ids": [1, 2], "labels": 1}, {"input_ids": [3], "labels": 0}], pad_id=9)
    assert classes["labels"].tolist() == [1, 0] and classes["input_ids"].tolist() == [[1, 2], [3, 9]]
    assert classes["input_ids"].dtype == torch.long


def _flat(steps):
    return [i for step in steps for mb in step for i in mb]


def test_schedule_local_steps_and_accumulation():
    cfg = config("/unused", CLS, local_steps=5, batch_size=4, gradient_accumulation=3)
    steps = schedule(10, cfg, seed=0, rnd=1)
    assert len(steps) == 5 and all(len(step) == 3 for step in steps)
    assert all(1 <= len(mb) <= 4 for step in steps for mb in step)
    # 15 micro-batches over 10 examples: several shuffled epochs, each covering everything once.
    first_epoch = _flat(steps)[:10]
    assert sorted(first_epoch) == list(range(10))


def test_schedule_epochs_cover_the_data():
    cfg = config("/unused", CLS, local_epochs=2.0, batch_size=4, gradient_accumulation=1)
    steps = schedule(10, cfg, seed=0, rnd=1)
    assert len(steps) == 6  # ceil(10/4) = 3 micro-batches per epoch
    assert sorted(_flat(steps)) == sorted(list(range(10)) * 2)


def test_schedule_is_deterministic_per_round_and_caps_samples():
    cfg = config("/unused", CLS, local_steps=3, batch_size=4)
    assert schedule(50, cfg, 0, 1) == schedule(50, cfg, 0, 1)
    assert schedule(50, cfg, 0, 1) != schedule(50, cfg, 0, 2)
    assert schedule(50, cfg, 0, 1) != schedule(50, cfg, 1, 1)
    capped = config("/unused", CLS, local_epochs=1.0, batch_size=4, max_train_samples=6)
    used = set(_flat(schedule(50, capped, 0, 1)))
    assert len(used) == 6 and used != set(_flat(schedule(50, capped, 0, 2)))
    with pytest.raises(ValueError, match="no training examples"):
        schedule(0, cfg, 0, 1)


def test_a_line_ends_at_a_newline_only():
    from fedtune.api.records import parse_jsonl

    # U+2028 and friends are legal unescaped inside JSON strings; str.splitlines would cut there.
    text = '{"text": "a\u2028b\u0085c", "label": "x"}\r\n\n{"text": "d", "label": "y"}\n'
    assert [n for n, _ in parse_jsonl(text.encode())] == [1, 3]
    assert parse_jsonl(text.encode())[0][1]["text"] == "a\u2028b\u0085c"
