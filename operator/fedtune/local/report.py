"""The end of a local run: per-round table, metrics.json and a PNG plot."""

from __future__ import annotations

import json
from pathlib import Path

from fedtune.api.job import FederatedJob
from fedtune.api.status import FederatedJobStatus


def _f(v: float | None, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def round_table(st: FederatedJobStatus) -> str:
    """A fixed-width table of the round history."""
    head = (
        f"{'round':>5}  {'parties':>7}  {'train loss':>10}  {'eval loss':>9}  {'eval acc':>8}  {'eval ppl':>8}  "
        f"{'MB moved':>8}  {'seconds':>7}"
    )
    lines = [head, "-" * len(head)]
    for h in st.history:
        m = h.metrics
        lines.append(
            f"{h.round:>5}  {len(h.participants) if h.round else '-':>7}  {_f(m.train_loss, '.4f'):>10}  "
            f"{_f(m.eval_loss, '.4f'):>9}  {_f(m.eval_accuracy, '.3f'):>8}  {_f(m.eval_perplexity, '.2f'):>8}  "
            f"{(h.bytes_up + h.bytes_down) / 1e6:>8.2f}  {h.duration_seconds:>7.1f}"
        )
    return "\n".join(lines)


def metrics_document(job: FederatedJob, st: FederatedJobStatus, extra: dict | None = None) -> dict:
    """What metrics.json holds: the job, its outcome and every round."""
    doc = {
        "job": job.metadata.name,
        "uid": job.metadata.uid,
        "phase": st.phase,
        "message": st.message,
        "strategy": job.spec.strategy.name,
        "peftMethod": job.spec.peft.method,
        "loraMode": job.spec.aggregator.lora_mode,
        "rounds": [h.to_wire() for h in st.history],
        "parties": [p.to_wire() for p in st.parties],
        "finalAdapter": st.final_adapter,
    }
    doc.update(extra or {})
    return doc


def write_metrics(path: Path, doc: dict) -> None:
    path.write_text(json.dumps(doc, indent=2, default=str) + "\n")


def plot(st: FederatedJobStatus, path: Path, title: str, baseline: float | None = None) -> bool:
    """Loss and accuracy (or perplexity) per round as a PNG. False if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rounds = [h.round for h in st.history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for key, label in (("train_loss", "train loss (local)"), ("eval_loss", "eval loss (global)")):
        pts = [(h.round, getattr(h.metrics, key)) for h in st.history if getattr(h.metrics, key) is not None]
        if pts:
            ax1.plot(*zip(*pts), marker="o", label=label)
    ax1.set(xlabel="round", ylabel="loss", title="loss")
    ax1.legend()
    key, label = (
        ("eval_accuracy", "accuracy")
        if any(h.metrics.eval_accuracy is not None for h in st.history)
        else ("eval_perplexity", "perplexity")
    )
    pts = [(h.round, getattr(h.metrics, key)) for h in st.history if getattr(h.metrics, key) is not None]
    if pts:
        ax2.plot(*zip(*pts), marker="o", color="tab:green", label=f"global {label}")
    if baseline is not None and key == "eval_accuracy":
        ax2.axhline(baseline, linestyle="--", color="grey", label="majority class")
    ax2.set(xlabel="round", ylabel=label, title=f"{label} of the global adapter")
    ax2.legend()
    for ax in (ax1, ax2):
        ax.set_xticks(rounds)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
