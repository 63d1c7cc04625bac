"""Sample-level DP-SGD in local training (spec.privacy.dpSgd), through Opacus.

Every optimizer step Poisson-samples the party's training examples (Opacus' DPDataLoader, rate
1 / ceil(examples / batchSize)), computes every example's gradient (GradSampleModule's hooks),
clips each to maxGradNorm (C), adds N(0, (σ·C)²) to their sum and divides by the expected batch
size (DPOptimizer). The party's RDP accountant (`Accountant`, kept by the long-lived party process
across rounds) composes every step it took, so the ε it reports covers all the rounds the party
trained, for one example of its data.

The loss is each example's own mean token loss, averaged over the batch: Hugging Face's
causal-LM loss averages over all the batch's tokens, which would make one example's gradient
depend on the other examples' lengths. The model is wrapped for the round only: its hooks are
removed after it, so adapter I/O, evaluation and the next round see the plain peft model.
"""

from __future__ import annotations

from typing import Any

import torch
from fedtune.api.privacy import SampleDpSpec
from fedtune.api.protocol import TrainerConfig

from fedtune_trainer.data import IGNORE, collate
from fedtune_trainer.device import to_device


def new_accountant() -> Any:
    """An empty Opacus RDP accountant: one per party and job, kept across rounds."""
    from opacus.accountants import RDPAccountant

    return RDPAccountant()


def epsilon(accountant: Any, dp: SampleDpSpec) -> float:
    """ε at dp.delta of every step the accountant has seen (0 before the first)."""
    if not accountant.history:
        return 0.0
    return float(accountant.get_epsilon(dp.delta))


def example_losses(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Each example's loss: cross entropy of its label (classification) or the mean over its labelled tokens."""
    labels = batch["labels"]
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    if labels.dim() == 1:  # sequence classification: one label per example
        return torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    logits, labels = logits[:, :-1], labels[:, 1:]  # token t predicts token t + 1
    per_token = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=IGNORE, reduction="none"
    ).view(labels.shape)
    counted = (labels != IGNORE).sum(dim=1).clamp(min=1)
    return per_token.sum(dim=1) / counted


class _Indices(torch.utils.data.Dataset):
    """Positions into the round's pool: the loader samples indices, the batch is collated from them."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor]:
        return (torch.tensor(i),)  # a tuple: Opacus builds an empty batch's shapes from its fields


def run_dp_sgd(
    model, examples, pool: list[int], num_steps: int, cfg: TrainerConfig, params, anchors, pad_id, accountant
) -> tuple[float, int]:
    """`num_steps` DP-SGD steps of AdamW over Poisson batches of `pool` (indices into `examples`).

    The FedProx term depends on the weights only, not on any example: its gradient is added
    after the noise (post-processing), since Opacus' per-example gradients would not carry it.
    Returns (sum of example losses, examples seen).
    """
    from opacus import PrivacyEngine

    dp, tr = cfg.dp_sgd, cfg.training
    assert dp is not None
    dev = next(p.device for _, p in params)
    trainable = [p for _, p in params]
    optimizer = torch.optim.AdamW(trainable, lr=tr.learning_rate, weight_decay=tr.weight_decay)
    loader = torch.utils.data.DataLoader(_Indices(len(pool)), batch_size=tr.batch_size)
    engine = PrivacyEngine(accountant="rdp")
    engine.accountant = accountant  # the party's, so that the steps of every round compose
    private, optimizer, loader = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=dp.noise_multiplier,
        max_grad_norm=dp.max_grad_norm,
        poisson_sampling=True,
        grad_sample_mode="hooks",
    )
    loss_sum, seen, done = 0.0, 0, 0
    try:
        while done < num_steps:
            for (positions,) in loader:
                if done == num_steps:
                    break
                optimizer.zero_grad(set_to_none=True)
                if len(positions):
                    batch = to_device(collate([examples[pool[int(i)]] for i in positions], pad_id), dev)
                    losses = example_losses(private, batch)
                    losses.mean().backward()
                    loss_sum += float(losses.detach().sum())
                    seen += len(positions)
                else:  # an empty Poisson batch is still a step: noise only, and the accountant counts it
                    for p in trainable:
                        p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
                if optimizer.pre_step():  # clip, add noise, scale, and tell the accountant
                    if anchors:
                        with torch.no_grad():
                            for n, p in params:
                                p.grad.add_(cfg.prox_mu * (p.detach().float() - anchors[n]).to(p.grad.dtype))
                    optimizer.original_optimizer.step()
                done += 1
    finally:
        optimizer.zero_grad(set_to_none=True)
        private._close()  # removes its hooks and per-parameter attributes: the plain peft model again
        for p in trainable:  # and the optimizer's, which no round after this one needs
            for attr in ("grad_sample", "summed_grad"):
                if hasattr(p, attr):
                    delattr(p, attr)
    return loss_sum, seen
