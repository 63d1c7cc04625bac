"""Knowledge distillation's loss (fedtune_trainer.distill.kd_loss) and the spec's cross-field checks."""

from __future__ import annotations

import math

import pytest
import torch
from fedtune.api.job import FederatedJobSpec
from fedtune_trainer.distill import kd_loss

STUDENT = torch.tensor([[2.0, -1.0, 0.5], [0.0, 1.0, 3.0]], dtype=torch.float64)
TEACHER = torch.tensor([[1.0, 0.0, -1.0], [-2.0, 2.0, 1.0]], dtype=torch.float64)
LABELS = torch.tensor([0, 2])


def _softmax(row: list[float], t: float = 1.0) -> list[float]:
    e = [math.exp(x / t) for x in row]
    return [x / sum(e) for x in e]


def _by_hand(alpha: float, t: float) -> tuple[float, float]:
    """Cross-entropy and T²·KL(teacher_T ‖ student_T), from the definitions, in plain floats."""
    ce = kl = 0.0
    for z, tz, y in zip(STUDENT.tolist(), TEACHER.tolist(), LABELS.tolist()):
        ce -= math.log(_softmax(z)[y])
        p, q = _softmax(z, t), _softmax(tz, t)
        kl += sum(qi * (math.log(qi) - math.log(pi)) for pi, qi in zip(p, q))
    n = len(LABELS)
    return ce / n, t * t * kl / n


@pytest.mark.parametrize("alpha,t", [(0.0, 2.0), (1.0, 2.0), (0.3, 4.0), (0.5, 1.0)])
def test_kd_loss_equals_the_hand_computed_value(alpha, t):
    ce, kl = _by_hand(alpha, t)
    out = kd_loss(STUDENT, TEACHER, LABELS, alpha, t)
    assert out.ce.item() == pytest.approx(ce, rel=1e-6)
    assert out.kl.item() == pytest.approx(kl, rel=1e-6)
    assert out.total.item() == pytest.approx((1 - alpha) * ce + alpha * kl, rel=1e-6)


def test_alpha_zero_is_cross_entropy_and_alpha_one_is_the_scaled_kl():
    ce = torch.nn.functional.cross_entropy(STUDENT.float(), LABELS)
    assert torch.equal(kd_loss(STUDENT, TEACHER, LABELS, 0.0, 3.0).total, ce)
    t = 3.0
    q = torch.softmax(TEACHER / t, -1)
    kl = (q * (q.log() - torch.log_softmax(STUDENT / t, -1))).sum(-1).mean() * t * t
    assert kd_loss(STUDENT, TEACHER, LABELS, 1.0, t).total.item() == pytest.approx(kl.item(), rel=1e-6)


def test_the_teacher_equal_to_the_student_adds_no_kl():
    assert kd_loss(STUDENT, STUDENT, LABELS, 0.5, 2.0).kl.item() == pytest.approx(0.0, abs=1e-7)


def _analytic_grad(alpha: float, t: float) -> torch.Tensor:
    """d loss / d student logits = ((1-α)(p - y) + α·T·(p_T - q_T)) / batch."""
    n = STUDENT.shape[0]
    p = torch.softmax(STUDENT, -1)
    y = torch.nn.functional.one_hot(LABELS, STUDENT.shape[1]).to(p.dtype)
    return ((1 - alpha) * (p - y) + alpha * t * (torch.softmax(STUDENT / t, -1) - torch.softmax(TEACHER / t, -1))) / n


@pytest.mark.parametrize("alpha,t", [(0.0, 2.0), (1.0, 2.0), (0.3, 4.0), (0.7, 0.5)])
def test_kd_loss_gradient_is_the_analytic_one(alpha, t):
    z = STUDENT.clone().requires_grad_(True)
    teacher = TEACHER.clone().requires_grad_(True)
    kd_loss(z, teacher, LABELS, alpha, t).total.backward()
    torch.testing.assert_close(z.grad.double(), _analytic_grad(alpha, t), rtol=1e-5, atol=1e-7)
    assert teacher.grad is None  # the teacher is never trained


def test_a_wrong_temperature_scaling_would_be_caught():
    # The gradient's soft part scales with T (the T² factor times d/dz of z/T): a loss scaled by T instead of
    # T², or not at all, gives another gradient, which the analytic form above tells apart.
    t = 4.0
    z = STUDENT.clone().requires_grad_(True)
    q = torch.softmax(TEACHER / t, -1)
    wrong = (q * (q.log() - torch.log_softmax(z.float() / t, -1))).sum(-1).mean() * t  # T, not T²
    wrong.backward()
    assert not torch.allclose(z.grad.double(), _analytic_grad(1.0, t), rtol=1e-3)


def test_kd_loss_refuses_mismatched_logits_and_bad_settings():
    with pytest.raises(ValueError, match="do not match"):
        kd_loss(STUDENT, TEACHER[:, :2], LABELS, 0.5, 2.0)
    with pytest.raises(ValueError, match="temperature"):
        kd_loss(STUDENT, TEACHER, LABELS, 0.5, 0.0)
    with pytest.raises(ValueError, match="alpha"):
        kd_loss(STUDENT, TEACHER, LABELS, 1.5, 2.0)


def _spec(**over) -> dict:
    spec = {
        "model": {"source": "file:///m", "task": "sequence-classification"},
        "data": {"labels": ["a", "b"]},
        "training": {"distillation": {"teacher": "file:///teacher", "alpha": 0.5, "temperature": 2.0}},
        "parties": [{"name": "alice"}],
    }
    spec.update(over)
    return spec


def test_spec_accepts_distillation_and_refuses_what_cannot_work():
    spec = FederatedJobSpec.model_validate(_spec())
    assert spec.training.distillation.alpha == 0.5
    cases = {
        "sequence-classification only": _spec(model={"source": "file:///m", "task": "causal-lm"}),
        "deepspeed.enabled: false": _spec(deepspeed={"enabled": True}),
        "s3:// teachers are not supported": _spec(
            training={"distillation": {"teacher": "s3://bucket/teacher", "alpha": 0.5}}
        ),
        "is the base model itself": _spec(training={"distillation": {"teacher": "/m"}}),
    }
    for needle, doc in cases.items():
        with pytest.raises(ValueError, match=needle):
            FederatedJobSpec.model_validate(doc)
    for bad in ({"teacher": "x", "alpha": 0}, {"teacher": "x", "alpha": 1.5}, {"teacher": "x", "temperature": 0}):
        with pytest.raises(ValueError):
            FederatedJobSpec.model_validate(_spec(training={"distillation": bad}))
