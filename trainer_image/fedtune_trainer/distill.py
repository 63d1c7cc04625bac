"""Knowledge distillation (training.distillation): the loss, and the teacher each party loads.

Hinton, Vinyals and Dean (2015), "Distilling the Knowledge in a Neural Network": the student
learns from the teacher's class probabilities softened by a temperature T, which carry how the
teacher ranks the wrong classes ("dark knowledge"), as well as from the hard labels. The soft
term's gradient scales as 1/T², so it is multiplied by T² to keep the two terms' balance when
T changes:

    loss = (1 - alpha) · CE(z, y) + alpha · T² · KL(softmax(t / T) ‖ softmax(z / T))

with z the student's logits, t the teacher's and y the labels; its gradient with respect to z
is ((1 - alpha)(softmax(z) - onehot(y)) + alpha · T · (softmax(z / T) - softmax(t / T))) / batch.

FedKD-LoRA: the teacher is fine-tuned once on a public share of the data (`fedtune teacher`);
every party trains its LoRA student against it on its private data. The teacher is frozen: it
is never trained, averaged or uploaded.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from fedtune.api.job import DataSchema, DistillationSpec, ModelSpec


class KDLoss(NamedTuple):
    """The loss to back-propagate, and its two parts (cross-entropy, T²·KL) for reporting."""

    total: torch.Tensor
    ce: torch.Tensor
    kl: torch.Tensor


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    alpha: float,
    temperature: float,
) -> KDLoss:
    """(1 - alpha)·CE + alpha·T²·KL(teacher_T ‖ student_T), each averaged over the batch.

    Logits are (batch, classes); labels are class ids (batch,). Computed in float32 whatever the
    logits' dtype; no gradient reaches the teacher's logits.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"teacher logits {tuple(teacher_logits.shape)} do not match the student's {tuple(student_logits.shape)}"
        )
    z = student_logits.float()
    t = teacher_logits.detach().float()
    ce = F.cross_entropy(z, labels)
    log_p = F.log_softmax(z / temperature, dim=-1)
    log_q = F.log_softmax(t / temperature, dim=-1)
    # Σ q (log q − log p), summed over classes and averaged over the batch.
    kl = F.kl_div(log_p, log_q, reduction="batchmean", log_target=True) * temperature**2
    return KDLoss((1.0 - alpha) * ce + alpha * kl, ce, kl)


def teacher_spec(model: ModelSpec, kd: DistillationSpec) -> ModelSpec:
    """The teacher as a model source: the student's task and dtype, never quantised."""
    return ModelSpec(source=kd.teacher, task=model.task, dtype=model.dtype)


def load_teacher(
    model: ModelSpec, data: DataSchema, kd: DistillationSpec, student_tokenizer: Any, device: torch.device | None
) -> torch.nn.Module:
    """The frozen teacher (eval mode, no gradients), checked against the job's labels and the student's tokenizer."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    from fedtune_trainer.models import DTYPES, resolve_source

    spec = teacher_spec(model, kd)
    where = resolve_source(spec)
    name = f"training.distillation.teacher {kd.teacher}"
    config = AutoConfig.from_pretrained(where)
    labels = list(data.labels)
    if config.num_labels != len(labels):
        raise ValueError(
            f"{name} has {config.num_labels} outputs but data.labels lists {len(labels)} classes: prepare the "
            "teacher with this job's labels (`fedtune teacher`)"
        )
    named = [str(config.id2label.get(i, "")) for i in range(config.num_labels)]
    if named != labels and not all(n == f"LABEL_{i}" for i, n in enumerate(named)):
        raise ValueError(
            f"{name} orders its classes {named} but data.labels is {labels}: the soft labels would go to the "
            "wrong classes; prepare the teacher with this job's labels"
        )
    tokenizer = AutoTokenizer.from_pretrained(where)
    if tokenizer.get_vocab() != student_tokenizer.get_vocab():
        raise ValueError(
            f"{name}: its tokenizer's vocabulary differs from the student's ({model.source}): the teacher must "
            "read the same token ids; fine-tune it from a model with the student's tokenizer"
        )
    teacher = AutoModelForSequenceClassification.from_pretrained(where, dtype=DTYPES[model.dtype])
    teacher.requires_grad_(False)
    teacher.eval()
    if device is not None:
        teacher.to(device)
    return teacher


def teacher_logits(teacher: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The teacher's logits for a batch (no labels passed, no gradient kept)."""
    with torch.no_grad():
        return teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
