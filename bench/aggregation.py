"""Aggregation cost: time and peak memory to combine P LoRA updates of a 7B-shaped model.

    python bench/aggregation.py [--smoke] [--out bench/results] [--layers 8] [--parties 2 4 ... 64]

Adapters are LoRA r=16 on q, k, v and o (4096 x 4096 each) of `--layers` Llama-7B-shaped
layers (default 8 to keep it fast; a 7B model has 32), random tensors in float32 or bfloat16.
One round is `fedtune_trainer.strategies.aggregate_round` with FedAvg: `average` averages A
and B separately; `exact` re-factors the mean of the products B·A per module (from the
P·r x P·r Gram matrices of the stacked factors, batched over modules, float64).

The whole 7B adapter with 8 parties on 2 threads, exact against average in one run:

    python bench/aggregation.py --layers 32 --parties 8 --dtypes float32 --threads 2 --out DIR

Each (dtype, mode, P) runs in a fresh process (multiprocessing "spawn"): it builds the inputs,
then times `--repeats` rounds (median reported) and reads the peak resident set size
(`getrusage` ru_maxrss) after them. Peak memory = that peak minus the RSS with the inputs
already in memory: what aggregation adds. (tracemalloc would not see it: torch allocates its
tensors outside Python's allocator.) "per 32 layers" columns extrapolate to a full 7B model:
time linearly (every module is combined independently); memory see `peak_full`.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import statistics
import sys
import time
from pathlib import Path

import mlbench

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
FULL_LAYERS = 32


def make_adapter(layers: int, hidden: int, rank: int, dtype, generator) -> dict:
    """One party's LoRA adapter under peft's names: A (r, hidden), B (hidden, r) per projection."""
    import torch

    out = {}
    for i in range(layers):
        for proj in PROJECTIONS:
            stem = f"base_model.model.model.layers.{i}.self_attn.{proj}"
            a = torch.randn(rank, hidden, generator=generator) / hidden**0.5
            b = torch.randn(hidden, rank, generator=generator) * 0.01
            out[f"{stem}.lora_A.weight"], out[f"{stem}.lora_B.weight"] = a.to(dtype), b.to(dtype)
    return out


def _rss_kib() -> int:
    with open("/proc/self/statm") as fh:
        pages = int(fh.read().split()[1])
    return pages * resource.getpagesize() // 1024


def measure(job: dict) -> dict:
    """Runs in a fresh process: build inputs, time `repeats` rounds, report peak RSS growth."""
    import gc

    import torch
    from fedtune_trainer.strategies import aggregate_round, make_strategy

    torch.set_num_threads(job["threads"])
    dtype = getattr(torch, job["dtype"])
    gen = torch.Generator().manual_seed(job["seed"])
    shape = (job["layers"], job["hidden"], job["rank"], dtype, gen)
    # Warm-up on one small module: loads the linear-algebra kernels, whose memory is not aggregation's.
    tiny = (1, 64, job["rank"], dtype, torch.Generator().manual_seed(1))
    aggregate_round(make_adapter(*tiny), [make_adapter(*tiny)] * 2, [1.0, 1.0], make_strategy("fedavg"), job["mode"])
    global_prev = make_adapter(*shape)
    updates = [make_adapter(*shape) for _ in range(job["parties"])]
    weights = [float(10 + i) for i in range(job["parties"])]  # unequal sample counts
    gc.collect()
    base_kib = _rss_kib()
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    seconds, residual = [], None
    while len(seconds) < job["repeats"] and sum(seconds) < job["budget"]:  # at least one round
        start = time.perf_counter()
        new_global, residual = aggregate_round(global_prev, updates, weights, make_strategy("fedavg"), job["mode"])
        seconds.append(time.perf_counter() - start)
        del new_global
        gc.collect()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        **job,
        "seconds": statistics.median(seconds),
        "all_seconds": seconds,
        "peak_mib": max(0, peak - base_kib) / 1024,
        "resolved": peak > peak_before,  # False: aggregation stayed below the input-building peak
        "residual": residual,
    }


def adapter_bytes(layers: int, hidden: int, rank: int, dtype: str) -> int:
    return layers * len(PROJECTIONS) * 2 * rank * hidden * (2 if dtype == "bfloat16" else 4)


def run_all(args: argparse.Namespace) -> list[dict]:
    ctx = mp.get_context("spawn")
    results = []
    for dtype in args.dtypes:
        for mode in args.modes:
            capped = False
            for parties in args.parties:
                if capped:
                    results.append({"dtype": dtype, "mode": mode, "parties": parties, "skipped": True})
                    continue
                job = {
                    "dtype": dtype,
                    "mode": mode,
                    "parties": parties,
                    "layers": args.layers,
                    "hidden": args.hidden,
                    "rank": args.rank,
                    "repeats": args.repeats,
                    "budget": args.repeat_budget,
                    "threads": args.threads,
                    "seed": 0,
                }
                with ctx.Pool(1, maxtasksperchild=1) as pool:
                    res = pool.apply(measure, (job,))
                results.append(res)
                print(
                    f"  {dtype:8s} {mode:7s} P={parties:<3d} {res['seconds']:8.3f}s  peak +{res['peak_mib']:8.1f} MiB",
                    flush=True,
                )
                # A config slower than the cap stops this (dtype, mode) series: P only gets bigger.
                capped = res["seconds"] > args.cap_seconds
    return results


def table(results: list[dict], args: argparse.Namespace) -> str:
    scale = FULL_LAYERS / args.layers
    headers = [
        "dtype",
        "mode",
        "P",
        "inputs MiB (P x adapter)",
        "time s",
        f"time s per {FULL_LAYERS} layers",
        "peak MiB (added)",
        f"peak MiB per {FULL_LAYERS} layers",
        "peak / adapter",
        "time / average",
    ]
    done = [r for r in results if not r.get("skipped")]
    average = {(r["dtype"], r["parties"]): r["seconds"] for r in done if r["mode"] == "average"}
    rows = []
    for r in results:
        size = adapter_bytes(args.layers, args.hidden, args.rank, r["dtype"])
        if r.get("skipped"):
            rows.append(
                [r["dtype"], r["mode"], r["parties"], f"{r['parties'] * size / 2**20:.1f}"] + ["skipped (cap)"] * 6
            )
            continue
        base = average.get((r["dtype"], r["parties"]))
        rows.append(
            [
                r["dtype"],
                r["mode"],
                r["parties"],
                f"{r['parties'] * size / 2**20:.1f}",
                f"{r['seconds']:.3f}",
                f"{r['seconds'] * scale:.2f}",
                f"{r['peak_mib']:.0f}" + ("" if r["resolved"] else " (≤)"),
                f"{peak_full(r, done, scale):.0f}",
                f"{r['peak_mib'] * 2**20 / size:.1f}",
                f"{r['seconds'] / base:.1f}" if base else "-",
            ]
        )
    return mlbench.md_table(headers, rows)


def peak_full(r: dict, done: list[dict], scale: float) -> float:
    """Peak MiB extrapolated to 32 layers.

    Average mode: all of it is per-tensor outputs and accumulators, linear in layers. Exact mode
    re-factors a chunk of modules at a time with a bounded float64 scratch; only its outputs
    grow with layers, as average mode's do: its peak + (scale - 1) x average mode's peak.
    """
    if r["mode"] == "average":
        return r["peak_mib"] * scale
    avg = next(
        (a["peak_mib"] for a in done if (a["mode"], a["dtype"], a["parties"]) == ("average", r["dtype"], r["parties"])),
        None,
    )
    return r["peak_mib"] * scale if avg is None else r["peak_mib"] + (scale - 1) * avg


def plot(results: list[dict], args: argparse.Namespace, path: Path) -> None:
    plt = mlbench.pyplot()

    scale = FULL_LAYERS / args.layers
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4))
    series = sorted({(r["dtype"], r["mode"]) for r in results})
    done_all = [r for r in results if not r.get("skipped")]
    for dtype, mode in series:
        done = [r for r in results if (r["dtype"], r["mode"]) == (dtype, mode) and not r.get("skipped")]
        xs = [r["parties"] for r in done]
        style = "-" if mode == "exact" else "--"
        ax_t.plot(xs, [r["seconds"] * scale for r in done], style, marker="o", label=f"{mode} {dtype}")
        ax_m.plot(xs, [peak_full(r, done_all, scale) for r in done], style, marker="o", label=f"{mode} {dtype}")
    for ax, what in ((ax_t, "seconds per round"), (ax_m, "peak MiB added")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("parties P")
        ax.set_ylabel(f"{what} (per {FULL_LAYERS} layers, extrapolated)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"Aggregating LoRA r={args.rank} on q,k,v,o of a 7B shape (measured on {args.layers} layers)")
    mlbench.save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="1 small layer, P = 2 and 4")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--layers", type=int, default=8, help=f"layers measured (a 7B model has {FULL_LAYERS})")
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--parties", type=int, nargs="+", default=[2, 4, 8, 16, 32, 64])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    parser.add_argument("--modes", nargs="+", default=["average", "exact"], choices=["average", "exact"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the aggregator pod runs 1 locally)")
    parser.add_argument("--repeat-budget", type=float, default=20, help="no further repeats after this many seconds")
    parser.add_argument("--cap-seconds", type=float, default=120, help="stop a series after a round this slow")
    args = parser.parse_args(argv)
    if args.smoke:
        args.layers, args.hidden, args.parties, args.repeats = 1, 256, [2, 4], 1
    info = mlbench.machine_info()
    info["torch threads"] = str(args.threads)
    started = time.perf_counter()
    results = run_all(args)
    md = table(results, args)
    print("\n" + md, flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    plot(results, args, args.out / "aggregation.png")
    size = adapter_bytes(args.layers, args.hidden, args.rank, "float32")
    exact = [r["residual"] for r in results if r.get("mode") == "exact" and r.get("residual") is not None]
    text = f"""# Aggregation: time and peak memory per round

`{" ".join(["python bench/aggregation.py", *argv])}` (measured on {args.layers} layer(s), hidden
{args.hidden}, LoRA r={args.rank}; {time.perf_counter() - started:.0f} s in all)

## Machine

{mlbench.machine_md(info)}

## Setup

One adapter = LoRA r={args.rank} on q, k, v, o ({args.hidden} x {args.hidden}) of {args.layers} layer(s):
{args.layers * len(PROJECTIONS) * 2} tensors, {size / 2**20:.1f} MiB in float32 (a 7B model's 32 layers:
{size * FULL_LAYERS / args.layers / 2**20:.0f} MiB). Random tensors, unequal sample weights, FedAvg through
`aggregate_round` (global adapter in, next global adapter out; downloads and verification are not
included). Time = median of up to {args.repeats} round(s) in one process (no new repeat after
{args.repeat_budget:.0f} s), after a warm-up on one small module; peak MiB (added) = peak RSS
(getrusage ru_maxrss) minus the RSS with the P inputs and the previous global already in memory
(not tracemalloc: torch allocates outside Python's allocator); "(≤)" marks a peak that stayed
below the input-building peak (an upper bound). "per {FULL_LAYERS} layers": time x
{FULL_LAYERS}/{args.layers} (every module is combined independently); memory x {FULL_LAYERS}/{args.layers}
for average mode, and for exact mode its peak + ({FULL_LAYERS}/{args.layers} - 1) x average mode's peak
(exact mode re-factors a chunk of modules at a time, with a float64 scratch that does not grow
with the layer count). torch threads: {args.threads}. A series stops
after a configuration slower than {args.cap_seconds:.0f} s ("skipped (cap)").
Exact-mode residuals: random factors of P parties give mean products of rank up to P x r, so
the rank-{args.rank} re-factoring is lossy here (max residual seen {max(exact) if exact else 0:.2f});
trained adapters that agree are far closer to rank r.

{md}

![aggregation](aggregation.png)
"""
    path = mlbench.write_result(args.out, "aggregation.md", text)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
