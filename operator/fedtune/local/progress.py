"""Live progress of a local run: one line per thing that happened, so it reads well in a terminal and in CI logs."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from fedtune.api.status import FederatedJobStatus, PartyState
from fedtune.rounds.machine import Event

_SHOWN_EVENTS = {
    "PartyReady",
    "RoundStarted",
    "RoundRetry",
    "QuorumLost",
    "PartyDropped",
    "UpdateRejected",
    "HeldOutEvaluated",
    "StorageUnavailable",
    "StorageAvailable",
    "PrivacyBudgetExhausted",
}


def _short(name: str) -> str:
    return name.split("/", 1)[-1]


def _party_line(p: PartyState, rnd: int) -> str | None:
    who = f"{_short(p.name):<10}"
    m = p.metrics
    if p.state == "Submitted":
        acc = f"  global acc {m.eval_accuracy:.3f}" if m and m.eval_accuracy is not None else ""
        ppl = f"  global ppl {m.eval_perplexity:.2f}" if m and m.eval_perplexity is not None else ""
        loss = f"train loss {m.train_loss:.4f}" if m and m.train_loss is not None else ""
        return f"{who} round {rnd} update: {p.num_samples} samples, {loss}{acc}{ppl}, {p.train_seconds:.1f}s training"
    if p.state == "StorageFailed":
        return f"{who} the storage failed it: {p.message}"
    if p.state in ("Failed", "Straggler", "Dropped"):
        return f"{who} {p.state.lower()}: {p.message}"
    if p.state == "Done" and p.role == "evaluator":
        return None  # its HeldOutEvaluated event says what it found
    if p.state == "Done" and m and m.global_eval_accuracy is not None and m.eval_accuracy is not None:
        acc = f"global acc {m.global_eval_accuracy:.3f}, personalised acc {m.eval_accuracy:.3f}"
        return f"{who} final evaluation: {acc}"
    if p.state == "Done":
        acc = f"acc {m.eval_accuracy:.3f}" if m and m.eval_accuracy is not None else ""
        ppl = f"ppl {m.eval_perplexity:.2f}" if m and m.eval_perplexity is not None else ""
        return f"{who} final evaluation: {acc}{ppl}"
    return None


class Progress:
    """Prints what changed between two statuses."""

    def __init__(self, out: TextIO = sys.stdout):
        self.out = out
        self.t0 = time.monotonic()
        self.states: dict[str, tuple[str, int, int]] = {}
        self.rounds_seen: set[int] = set()

    def say(self, text: str) -> None:
        print(f"[{time.monotonic() - self.t0:6.1f}s] {text}", file=self.out, flush=True)

    def update(self, st: FederatedJobStatus, events: list[Event]) -> None:
        for h in st.history:
            if h.round > 0 and h.round not in self.rounds_seen and h.finished_at is not None:
                self.rounds_seen.add(h.round)
                res = f", LoRA residual {h.lora_residual:.2e}" if h.lora_residual is not None else ""
                res += f", ε={h.epsilon:.3f} spent" if h.epsilon is not None else ""
                res += f", sample-level ε≤{h.sample_epsilon:.3f} per party" if h.sample_epsilon is not None else ""
                self.say(
                    f"round {h.round} aggregated: {len(h.participants)} update(s), "
                    f"{(h.bytes_up + h.bytes_down) / 1e6:.2f} MB moved, {h.duration_seconds:.1f}s{res}"
                )
        for e in events:
            if e.reason in _SHOWN_EVENTS:
                self.say(("! " if e.type == "Warning" else "") + e.message.removeprefix("default/"))
        for p in st.parties:
            key = (p.state, st.current_round, st.attempt)
            if self.states.get(p.name) != key:
                self.states[p.name] = key
                line = _party_line(p, st.current_round)
                if line:
                    self.say(line)
