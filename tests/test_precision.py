"""Device choice, mixed precision and gradient checkpointing of the plain PyTorch path (on CPU here)."""

from __future__ import annotations

import logging

import pytest
import torch
from fedtune.api import FederatedJob
from fedtune.api.errors import SpecError
from fedtune.documents import parse_documents
from fedtune_trainer.adapters import adapter_state, load_adapter_state
from fedtune_trainer.data import collate
from fedtune_trainer.device import pick_device
from fedtune_trainer.evaluate import evaluate
from fedtune_trainer.models import enable_gradient_checkpointing
from fedtune_trainer.train import train_local
from trainer_helpers import build, config, tiny_paths

CLS = "sequence-classification"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_paths(tmp_path_factory)


def linear_output_dtypes(model) -> tuple[list[torch.dtype], object]:
    """Record the dtype of every nn.Linear output (autocast shows there)."""
    seen: list[torch.dtype] = []
    handles = [
        m.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
        for m in model.modules()
        if isinstance(m, torch.nn.Linear)
    ]
    return seen, handles


def train(tiny, precision: str, steps: int = 30):
    cfg = config(tiny[CLS], CLS, local_steps=steps, precision=precision)
    model, tok, examples = build(cfg)
    before = evaluate(model, examples, CLS, 16, tok.pad_token_id, precision)
    seen, handles = linear_output_dtypes(model)
    result = train_local(model, examples, cfg, None, 0, 1, tok.pad_token_id)
    for h in handles:
        h.remove()
    after = evaluate(model, examples, CLS, 16, tok.pad_token_id, precision)
    return result, (before.eval_loss, after.eval_loss), adapter_state(model), set(seen)


def test_bf16_autocast_trains_like_fp32_and_the_adapter_stays_float32(tiny):
    ref, ref_losses, ref_state, ref_dtypes = train(tiny, "fp32")
    bf, bf_losses, bf_state, bf_dtypes = train(tiny, "bf16")
    assert ref_dtypes == {torch.float32} and torch.bfloat16 in bf_dtypes  # autocast was on, and only there
    assert abs(bf.train_loss - ref.train_loss) < 0.05, (bf.train_loss, ref.train_loss)
    assert abs(bf_losses[1] - ref_losses[1]) < 0.05
    for before, after in (bf_losses, ref_losses):  # both trained: the loss on the data went down
        assert after < before - 0.005, (before, after)
    assert {t.dtype for t in bf_state.values()} == {torch.float32}  # what travels is the adapter's own dtype
    drift = max((bf_state[k] - ref_state[k]).abs().max().item() for k in ref_state)
    assert 0 < drift < 0.1  # close, not identical: bf16 did change the arithmetic


def test_fp16_trains_with_loss_scaling(tiny):
    res, (before, after), state, dtypes = train(tiny, "fp16")
    assert torch.float16 in dtypes
    assert torch.isfinite(torch.tensor(res.train_loss)) and after < before - 0.005
    assert {t.dtype for t in state.values()} == {torch.float32}


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tiny):
    cfg = config(tiny[CLS], CLS)
    plain, tok, examples = build(cfg)
    ckpt, _, _ = build(cfg)
    load_adapter_state(ckpt, adapter_state(plain))
    enable_gradient_checkpointing(ckpt)
    assert ckpt.get_base_model().is_gradient_checkpointing and not plain.get_base_model().is_gradient_checkpointing
    batch = collate(examples[:8], tok.pad_token_id)
    grads, losses = [], []
    for model in (plain, ckpt):
        model.train()
        torch.manual_seed(7)  # the same dropout masks: checkpointing must replay them when recomputing
        loss = model(**batch).loss
        loss.backward()
        losses.append(loss.item())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert losses[0] == pytest.approx(losses[1], abs=1e-6)
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-5)


def test_the_device_is_chosen_once_and_said(caplog):
    pick_device.cache_clear()
    with caplog.at_level(logging.INFO, logger="fedtune_trainer.device"):
        first, second = pick_device(), pick_device()
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert first is second and first.type == expected
    assert [r.getMessage().split(" ")[1].split(":")[0] for r in caplog.records] == [expected]


def test_precision_is_for_the_plain_path():
    spec = {
        "model": {"source": "/m", "task": CLS},
        "data": {"labels": ["neg", "pos"]},
        "training": {"precision": "bf16"},
        "deepspeed": {"enabled": True},
        "parties": [{"name": "a"}],
    }
    with pytest.raises(ValueError, match="training.precision \\(bf16\\) is for the plain PyTorch path"):
        FederatedJob.model_validate({"metadata": {"name": "j"}, "spec": spec})
    with pytest.raises(SpecError, match="training.precision \\(fp16\\) is for the plain PyTorch path"):
        parse_documents(  # as fedtune validate and run read a file
            "kind: FederatedJob\napiVersion: fedtune.io/v1alpha1\nmetadata: {name: j}\n"
            "spec: {model: {source: /m, task: causal-lm}, training: {precision: fp16}, "
            "deepspeed: {enabled: true}, parties: [{name: a}]}",
            "j",
            require_parties=False,
        )
    with pytest.raises(SpecError, match="training.precision"):
        parse_documents(
            "kind: FederatedJob\napiVersion: fedtune.io/v1alpha1\nmetadata: {name: j}\n"
            "spec: {model: {source: /m, task: causal-lm}, training: {precision: fp8}, parties: [{name: a}]}",
            "j",
            require_parties=False,
        )
