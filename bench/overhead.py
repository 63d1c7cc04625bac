"""Federation overhead per round: round wall time minus the slowest party's local training.

    python bench/overhead.py [--smoke] [--out bench/results] [--parties 2 4 8] [--rounds 8]

Runs fedtune's local mode (embedded SeaweedFS, one subprocess per party plus the aggregator,
the runner's control loop in this process) on the tiny random BERT of the tests, so training
takes milliseconds and what remains is the federation itself. Per round it reports
`duration_seconds - slowest_train_seconds` from the job's history (median and p90 over rounds).

The profile splits each round along its critical path, from the receipts the runner saw
(a `LocalRun` subclass keeps every receipt `_observe` returns; timestamps are wall clock on
this one machine):

- party pick-up+misc: round start -> the last party's receipt, minus what that party timed
  (ticket pick-up, ticket parsing, loading the global weights into the model, receipt write)
- download / eval / upload: that party's own timings (eval = the global adapter on its eval split)
- hand-off: last party receipt -> aggregator starts (runner wake-up, ticket signing and write,
  aggregator wake-up)
- aggregate: the aggregator's own duration (downloads, verification, FedAvg, upload)
- notice: aggregator done -> the runner records the round (runner wake-up)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import mlbench
import numpy as np

sys.path.insert(0, str(mlbench.ROOT / "tests"))
from toy_data import toy_jsonl  # noqa: E402  (tests/ helpers: tiny model and toy data)

STEPS = ("pickup+misc", "download", "eval", "train", "upload", "hand-off", "aggregate", "notice")


def make_run_class():
    from fedtune.local import runner

    class RecordingRun(runner.LocalRun):
        """LocalRun that keeps every distinct receipt it observed."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.seen: dict[tuple, object] = {}

        def _observe(self):
            obs = super()._observe()
            found = dict(obs.receipts)
            if obs.aggregator is not None:
                found["aggregator"] = obs.aggregator
            for name, r in found.items():
                self.seen.setdefault((name, r.kind, r.round, r.attempt), r)
            return obs

    return RecordingRun


def job_docs(model: Path, data: Path, parties: int, rounds: int, samples: int) -> list[dict]:
    """The tiny job: LoRA r=4 on query/value, 1 local epoch of `samples` records, FedAvg."""
    names = [f"p{i}" for i in range(parties)]
    job = {
        "apiVersion": "fedtune.io/v1alpha1",
        "kind": "FederatedJob",
        "metadata": {"name": f"overhead-{parties}"},
        "spec": {
            "model": {"source": f"file://{model}", "task": "sequence-classification"},
            "peft": {"method": "lora", "config": {"r": 4, "target_modules": ["query", "value"]}},
            "data": {"labels": ["negative", "positive"], "maxLength": 16},
            "training": {"localEpochs": 1, "batchSize": 8, "learningRate": 0.01},
            "rounds": rounds,
            "minParties": parties,
            "roundTimeoutSeconds": 600,
            "parties": [{"name": n} for n in names],
        },
    }
    party_docs = mlbench.party_documents(names)
    dataset = {
        "source": f"file://{data}",
        "labels": ["negative", "positive"],
        "partition": {"method": "iid"},
        "samplesPerParty": samples,
        "evalFraction": 0.25,
        "seed": 0,
    }
    return [
        job,
        *party_docs,
        {"apiVersion": "fedtune.io/v1alpha1", "kind": "Dataset", "metadata": {"name": "toy"}, "spec": dataset},
    ]


def profile(run, st) -> list[dict]:
    """Per finished round: overhead and its split along the critical path (seconds)."""
    out = []
    for h in st.history[1:]:
        start = h.finished_at.timestamp() - h.duration_seconds
        parties = [run.seen[(p, "train", h.round, h.attempt)] for p in h.participants]
        agg = run.seen[("aggregator", "aggregate", h.round, h.attempt)]
        last = max(parties, key=lambda r: r.finished_at)
        t = last.timings
        timed = t.download_seconds + t.eval_seconds + t.train_seconds + t.upload_seconds
        agg_end = agg.finished_at.timestamp()
        out.append(
            {
                "round": h.round,
                "wall": h.duration_seconds,
                "slowest_train": h.slowest_train_seconds,
                "overhead": h.duration_seconds - h.slowest_train_seconds,
                "pickup+misc": last.finished_at.timestamp() - start - timed,
                "download": t.download_seconds,
                "eval": t.eval_seconds,
                "train": t.train_seconds,
                "upload": t.upload_seconds,
                "hand-off": agg_end - agg.duration_seconds - last.finished_at.timestamp(),
                "aggregate": agg.duration_seconds,
                "notice": h.finished_at.timestamp() - agg_end,
            }
        )
    return out


def run_one(model: Path, data: Path, parties: int, args: argparse.Namespace, workdir: Path) -> dict:
    docs = job_docs(model, data, parties, args.rounds, args.samples)
    st, seconds, run, _ = mlbench.run_local(docs, workdir, threads=1, run_class=make_run_class())
    rows = profile(run, st)
    over = [r["overhead"] for r in rows]
    result = {
        "parties": parties,
        "rounds": len(rows),
        "median": statistics.median(over),
        "p90": float(np.percentile(over, 90)),
        "max": max(over),
        "wall": statistics.median(r["wall"] for r in rows),
        "train": statistics.median(r["slowest_train"] for r in rows),
        "total_seconds": seconds,
        "steps": {k: statistics.median(r[k] for r in rows) for k in STEPS},
        "per_round": rows,
    }
    print(
        f"  {parties} parties: overhead median {result['median']:.3f}s "
        f"p90 {result['p90']:.3f}s ({len(rows)} rounds, run {result['total_seconds']:.0f}s)",
        flush=True,
    )
    return result


def tables(results: list[dict]) -> tuple[str, str]:
    head = [
        "parties",
        "rounds",
        "overhead median s",
        "overhead p90 s",
        "max s",
        "round wall median s",
        "slowest train median s",
        "< 1 s?",
    ]
    summary = mlbench.md_table(
        head,
        [
            [
                r["parties"],
                r["rounds"],
                f"{r['median']:.3f}",
                f"{r['p90']:.3f}",
                f"{r['max']:.3f}",
                f"{r['wall']:.3f}",
                f"{r['train']:.3f}",
                "yes" if r["p90"] < 1 else "no",
            ]
            for r in results
        ],
    )
    split = mlbench.md_table(
        ["parties", *[f"{k} s" for k in STEPS]],
        [[r["parties"], *(f"{r['steps'][k]:.3f}" for k in STEPS)] for r in results],
    )
    return summary, split


def plot(results: list[dict], path: Path) -> None:
    plt = mlbench.pyplot()

    fig, ax = plt.subplots(figsize=(8, 4))
    steps = [k for k in STEPS if k != "train"]
    xs = [f"{r['parties']} parties" for r in results]
    bottom = [0.0] * len(results)
    for k in steps:
        vals = [r["steps"][k] for r in results]
        ax.bar(xs, vals, bottom=bottom, label=k)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.plot(xs, [r["median"] for r in results], "ko-", label="overhead median (wall - slowest train)")
    ax.plot(xs, [r["p90"] for r in results], "k^--", label="overhead p90")
    ax.axhline(1.0, color="red", lw=0.8, ls=":")
    ax.set_xlabel("parties")
    ax.set_ylabel("seconds per round")
    ax.set_title("Federation overhead per round (local mode, tiny model)")
    ax.legend(fontsize=7)
    mlbench.save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="2 parties, 2 rounds")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--parties", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--samples", type=int, default=16, help="records per party (3/4 train, 1/4 eval)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.parties, args.rounds = [2], 2
    mlbench.quiet()
    info = mlbench.machine_info()
    results = []
    with tempfile.TemporaryDirectory(prefix="fedtune-overhead-") as tmp:
        tmp = Path(tmp)
        model = Path(mlbench.tiny_model(tmp / "tiny").removeprefix("file://"))
        data = tmp / "toy.jsonl"
        data.write_bytes(toy_jsonl(max(200, 2 * args.samples * max(args.parties))))
        for n in args.parties:
            results.append(run_one(model, data, n, args, tmp / f"run-{n}"))
    summary, split = tables(results)
    print("\n" + summary + "\n\n" + split, flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    plot(results, args.out / "overhead.png")
    text = f"""# Federation overhead per round

`python bench/overhead.py{" --smoke" if args.smoke else ""}` ({args.rounds} rounds per party count)

## Machine

{mlbench.machine_md(info)}

## Setup

fedtune's local mode as `fedtune run` drives it: embedded SeaweedFS, one subprocess per party
(1 torch thread each, forked from the zygote) plus the aggregator, every process waking on inotify
events of its mailbox (no polling). The
model is the tests' tiny random BERT (2 layers, width 32) with LoRA r=4 on query/value,
{args.samples} records per party (3/4 train, 1 local epoch, batch 8), FedAvg. With training
this short, a round is almost all federation. Overhead = the history's
`duration_seconds - slowest_train_seconds`; the target is "well under a second per round".
{len(results[0]["per_round"]) if results else 0} rounds per party count (round 0, the initial
adapter, is not a training round). The machine has {info.get("cores (os.cpu_count)")} cores: with
more parties than cores, parties take turns for them (CPU slots), which shows up as overhead.

{summary}

## Where a round's overhead goes (medians, seconds; critical path = the party that answered last)

{split}

Steps: pick-up+misc = round start to the last party's receipt minus that party's own timings
(ticket pick-up, parsing, loading global weights into the model, waiting for a CPU slot, receipt write);
download / eval / train / upload = that party's timings (eval: the global adapter on its eval
split, part of the protocol); hand-off = last receipt to aggregator start (runner wake-up, URL
signing, ticket write, aggregator wake-up); aggregate = the aggregator's own time (downloads,
verification, FedAvg, upload); notice = aggregator done to the runner recording the round.

![overhead](overhead.png)
"""
    path = mlbench.write_result(args.out, "overhead.md", text)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
