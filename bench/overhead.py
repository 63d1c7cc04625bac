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
  (ticket poll latency, ticket parsing, loading the global weights into the model, receipt write)
- download / eval / upload: that party's own timings (eval = the global adapter on its eval split)
- hand-off: last party receipt -> aggregator starts (runner poll, ticket signing and write,
  aggregator poll)
- aggregate: the aggregator's own duration (downloads, verification, FedAvg, upload)
- notice: aggregator done -> the runner records the round (receipt copy to S3, runner poll)
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

import mlbench
import numpy as np

sys.path.insert(0, str(mlbench.ROOT / "tests"))
from toy_data import toy_jsonl  # noqa: E402  (tests/ helpers: tiny model and toy data)

STEPS = ("pickup+misc", "download", "eval", "train", "upload", "hand-off", "aggregate", "notice")


def default_poll() -> float:
    from fedtune.api.mailbox import POLL_SECONDS

    return POLL_SECONDS


def make_run_class():
    from fedtune.local import runner

    class RecordingRun(runner.LocalRun):
        """LocalRun that keeps every distinct receipt it observed; optionally other poll intervals.

        `poll` (seconds) replaces both the runner's loop interval and the pods' `--poll`
        (a what-if: fedtune's default is fedtune_trainer.mailbox.POLL_SECONDS everywhere).
        """

        def __init__(self, *args, poll: float | None = None, **kwargs):
            super().__init__(*args, **kwargs)
            self.seen: dict[tuple, object] = {}
            self.poll = poll

        def _start_pods(self):
            if self.poll is not None:
                start = self.pods.start

                def with_poll(pod):
                    pod.argv = [*pod.argv, "--poll", str(self.poll)]
                    start(pod)

                self.pods.start = with_poll
            super()._start_pods()

        def run(self):
            default = runner.POLL_SECONDS
            runner.POLL_SECONDS = self.poll if self.poll is not None else default
            try:
                return super().run()
            finally:
                runner.POLL_SECONDS = default

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
    party_docs = [
        {
            "apiVersion": "fedtune.io/v1alpha1",
            "kind": "Party",
            "metadata": {"name": n},
            "spec": {"storage": {"bucket": f"{n}-data"}},
        }
        for n in names
    ]
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


def run_one(
    model: Path, data: Path, parties: int, args: argparse.Namespace, workdir: Path, poll: float | None = None
) -> dict:
    import yaml
    from fedtune.documents import parse_documents

    docs = job_docs(model, data, parties, args.rounds, args.samples)
    parsed = parse_documents(yaml.safe_dump_all(docs), "overhead")
    run = make_run_class()(parsed, workdir, out=io.StringIO(), threads=1, poll=poll)
    start = time.perf_counter()
    st = run.run()
    if st.phase != "Succeeded":
        raise RuntimeError(f"{parties} parties: run failed: {st.message}\n{run.out.getvalue()}")
    rows = profile(run, st)
    over = [r["overhead"] for r in rows]
    result = {
        "parties": parties,
        "poll": poll if poll is not None else default_poll(),
        "rounds": len(rows),
        "median": statistics.median(over),
        "p90": float(np.percentile(over, 90)),
        "max": max(over),
        "wall": statistics.median(r["wall"] for r in rows),
        "train": statistics.median(r["slowest_train"] for r in rows),
        "total_seconds": time.perf_counter() - start,
        "steps": {k: statistics.median(r[k] for r in rows) for k in STEPS},
        "per_round": rows,
    }
    print(
        f"  {parties} parties, poll {result['poll']}s: overhead median {result['median']:.3f}s "
        f"p90 {result['p90']:.3f}s ({len(rows)} rounds, run {result['total_seconds']:.0f}s)",
        flush=True,
    )
    return result


def tables(results: list[dict]) -> tuple[str, str]:
    head = [
        "parties",
        "poll s",
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
                r["poll"],
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
        ["parties", "poll s", *[f"{k} s" for k in STEPS]],
        [[r["parties"], r["poll"], *(f"{r['steps'][k]:.3f}" for k in STEPS)] for r in results],
    )
    return summary, split


def plot(results: list[dict], path: Path) -> None:
    plt = mlbench.pyplot()

    fig, ax = plt.subplots(figsize=(8, 4))
    steps = [k for k in STEPS if k != "train"]
    xs = [f"{r['parties']}\npoll {r['poll']}" for r in results]
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
    parser.add_argument(
        "--compare-poll",
        type=float,
        nargs="*",
        default=[0.1],
        help="also run every party count with these poll intervals (runner and pods; fedtune's default is 0.02 s)",
    )
    args = parser.parse_args(argv)
    if args.smoke:
        args.parties, args.rounds, args.compare_poll = [2], 2, []
    mlbench.quiet()
    info = mlbench.machine_info()
    results = []
    with tempfile.TemporaryDirectory(prefix="fedtune-overhead-") as tmp:
        tmp = Path(tmp)
        model = Path(mlbench.tiny_model(tmp / "tiny").removeprefix("file://"))
        data = tmp / "toy.jsonl"
        data.write_bytes(toy_jsonl(max(200, 2 * args.samples * max(args.parties))))
        for poll in [None, *args.compare_poll]:
            for n in args.parties:
                results.append(run_one(model, data, n, args, tmp / f"run-{n}-{poll}", poll))
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
(1 torch thread each) plus the aggregator, the runner's control loop polling mailboxes. The
model is the tests' tiny random BERT (2 layers, width 32) with LoRA r=4 on query/value,
{args.samples} records per party (3/4 train, 1 local epoch, batch 8), FedAvg. With training
this short, a round is almost all federation. Overhead = the history's
`duration_seconds - slowest_train_seconds`; the target is "well under a second per round".
{len(results[0]["per_round"]) if results else 0} rounds per party count (round 0, the initial
adapter, is not a training round). The machine has {info.get("cores (os.cpu_count)")} cores: with
more parties than cores, processes wait for CPU, which shows up as overhead. Rows with another
poll interval are a what-if: the runner's loop and the pods' `--poll` set to that value
(fedtune's default is {default_poll()} s for both; 0.1 s was the default before this benchmark).

{summary}

## Where a round's overhead goes (medians, seconds; critical path = the party that answered last)

{split}

Steps: pick-up+misc = round start to the last party's receipt minus that party's own timings
(ticket poll latency, parsing, loading global weights into the model, receipt write);
download / eval / train / upload = that party's timings (eval: the global adapter on its eval
split, part of the protocol); hand-off = last receipt to aggregator start (runner poll, URL
signing, ticket write, aggregator poll); aggregate = the aggregator's own time (downloads,
verification, FedAvg, upload); notice = aggregator done to the runner recording the round.

![overhead](overhead.png)
"""
    path = mlbench.write_result(args.out, "overhead.md", text)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
