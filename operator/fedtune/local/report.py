"""The end of a local run: per-round table, metrics.json and a PNG plot."""

from __future__ import annotations

import json
from pathlib import Path

from fedtune.api.job import FederatedJob
from fedtune.api.status import FederatedJobStatus
from fedtune.local.status_file import write_atomic


def _f(v: float | None, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def _held_out_columns(st: FederatedJobStatus) -> list[tuple[str, str, str]]:
    """(title, metric, format) of the held-out test set's columns: none without an evaluator."""
    if not any(h.held_out for h in st.history):
        return []
    if any(h.held_out and h.held_out.eval_accuracy is not None for h in st.history):
        return [("test loss", "eval_loss", ".4f"), ("test acc", "eval_accuracy", ".3f")]
    return [("test loss", "eval_loss", ".4f"), ("test ppl", "eval_perplexity", ".2f")]


def round_table(st: FederatedJobStatus) -> str:
    """A fixed-width table of the round history: the parties' own eval splits, then the held-out test set."""
    test = _held_out_columns(st)
    dp = st.privacy is not None
    head = (
        f"{'round':>5}  {'parties':>7}  {'train loss':>10}  {'eval loss':>9}  {'eval acc':>8}  {'eval ppl':>8}  "
        + "".join(f"{title:>9}  " for title, _, _ in test)
        + (f"{'ε spent':>8}  " if dp else "")
        + f"{'MB moved':>8}  {'seconds':>7}"
    )
    lines = [head, "-" * len(head)]
    for h in st.history:
        m = h.metrics
        held = "".join(f"{_f(getattr(h.held_out, k) if h.held_out else None, fmt):>9}  " for _, k, fmt in test)
        lines.append(
            f"{h.round:>5}  {len(h.participants) if h.round else '-':>7}  {_f(m.train_loss, '.4f'):>10}  "
            f"{_f(m.eval_loss, '.4f'):>9}  {_f(m.eval_accuracy, '.3f'):>8}  {_f(m.eval_perplexity, '.2f'):>8}  "
            f"{held}"
            + (f"{_f(h.epsilon, '.3f'):>8}  " if dp else "")
            + f"{(h.bytes_up + h.bytes_down) / 1e6:>8.2f}  {h.duration_seconds:>7.1f}"
        )
    if st.privacy is not None:
        p = st.privacy
        lines.append(
            f"\ndifferential privacy ({p.mode}, {p.accountant}): ε={p.epsilon:.3f} spent at δ={p.delta:g}, "
            f"budget ε={p.budget_epsilon:g} ({p.rounds_allowed} round(s) allowed)"
        )
    return "\n".join(lines)


def final_hint(method: str, where: str) -> tuple[str, str]:
    """(what final/ holds, how to load it) for a job's peft.method; `where` is final/ as the user typed it."""
    if method == "full":  # the whole model, as transformers saves one
        return "model (transformers layout)", f"AutoModelFor<task>.from_pretrained({where!r})"
    if method == "fedkseed":  # K accumulated scalars, replayed onto the base model
        return (
            "FedKSeed steps (fedkseed.safetensors)",
            f"python -m fedtune_trainer.fedkseed {where} OUT (a transformers model directory in OUT)",
        )
    if method == "offsite":  # the emulator's adapter layers, for the full model only the owner holds
        return (
            "offsite adapter layers (offsite.safetensors)",
            f"python -m fedtune_trainer.offsite {where} OUT [--eval FILE] (plugs them into the full model, a "
            "transformers directory in OUT)",
        )
    return "adapter (PEFT layout)", f"PeftModel.from_pretrained(base_model, {where!r})"


def personal_scores(st: FederatedJobStatus) -> dict[str, dict]:
    """Personalization: each trainer's last evaluation, global part beside personalised adapter (empty without)."""
    out = {}
    for p in st.parties:
        m = p.metrics
        if p.role != "trainer" or m is None or m.global_eval_loss is None:
            continue
        out[p.name] = {
            "globalEvalAccuracy": m.global_eval_accuracy,
            "personalEvalAccuracy": m.eval_accuracy,
            "globalEvalLoss": m.global_eval_loss,
            "personalEvalLoss": m.eval_loss,
            "evalSamples": p.num_eval_samples,
            "personalObject": p.personal_object,
        }
    return out


def personal_table(st: FederatedJobStatus) -> str | None:
    """Per-party accuracy (loss) of the global part and of the party's personalised adapter, last evaluation."""
    scores = personal_scores(st)
    if not scores:
        return None
    head = f"{'party':<16}  {'global acc':>10}  {'personal acc':>12}  {'global loss':>11}  {'personal loss':>13}"
    lines = ["per-party evaluation of the final global part: global (initial personal part) vs personalised", head]
    lines.append("-" * len(head))
    for name, s in scores.items():
        lines.append(
            f"{name.split('/', 1)[-1]:<16}  {_f(s['globalEvalAccuracy'], '.3f'):>10}  "
            f"{_f(s['personalEvalAccuracy'], '.3f'):>12}  {_f(s['globalEvalLoss'], '.4f'):>11}  "
            f"{_f(s['personalEvalLoss'], '.4f'):>13}"
        )
    return "\n".join(lines)


def _points(st: FederatedJobStatus, key: str, held_out: bool = False) -> list[tuple[int, float]]:
    """(round, metric) of every round that has it: the parties' own metrics, or the held-out test set's."""
    out = []
    for h in st.history:
        metrics = h.held_out if held_out else h.metrics
        if metrics is not None and (v := getattr(metrics, key)) is not None:
            out.append((h.round, v))
    return out


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
        "robust": job.spec.aggregator.robust.to_wire() if job.spec.aggregator.robust else None,
        "rounds": [h.to_wire() for h in st.history],
        "parties": [p.to_wire() for p in st.parties],
        "finalAdapter": st.final_adapter,
    }
    if st.privacy is not None:
        doc["privacy"] = st.privacy.to_wire()
    if job.spec.personalization is not None:
        doc["personalization"] = job.spec.personalization.to_wire() | {"parties": personal_scores(st)}
    doc.update(extra or {})
    return doc


def write_metrics(path: Path, doc: dict) -> None:
    write_atomic(path, json.dumps(doc, indent=2, default=str) + "\n")


def plot(
    st: FederatedJobStatus, path: Path, title: str, baseline: float | None = None, test_baseline: float | None = None
) -> bool:
    """Loss and accuracy (or perplexity) per round as a PNG, the held-out test set's beside.

    False if matplotlib is missing.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rounds = [h.round for h in st.history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for key, label in (("train_loss", "train loss (local)"), ("eval_loss", "eval loss (global)")):
        pts = _points(st, key)
        if pts:
            ax1.plot(*zip(*pts), marker="o", label=label)
    pts = _points(st, "eval_loss", held_out=True)
    if pts:
        ax1.plot(*zip(*pts), marker="s", label="held-out test loss (global)")
    ax1.set(xlabel="round", ylabel="loss", title="loss")
    ax1.legend()
    key, label = (
        ("eval_accuracy", "accuracy")
        if any(h.metrics.eval_accuracy is not None for h in st.history)
        else ("eval_perplexity", "perplexity")
    )
    pts = _points(st, key)
    if pts:
        ax2.plot(*zip(*pts), marker="o", color="tab:green", label=f"global {label}, parties' eval splits")
    pts = _points(st, key, held_out=True)
    if pts:
        ax2.plot(*zip(*pts), marker="s", color="tab:purple", label=f"global {label}, held-out test set")
    if baseline is not None and key == "eval_accuracy":
        ax2.axhline(baseline, linestyle="--", color="grey", label="majority class")
    if test_baseline is not None and key == "eval_accuracy":
        ax2.axhline(test_baseline, linestyle=":", color="tab:purple", label="majority class, test set")
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
