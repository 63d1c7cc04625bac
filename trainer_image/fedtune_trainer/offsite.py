"""Offsite tuning (peft.method offsite): the emulator, its trainable adapter, and the plug-back.

`build_emulator` (the model owner's side: `fedtune emulator`) loads the full base model as the parties
would, keeps the layers fedtune.api.offsite.kept_layers names and saves the result as a transformers
directory whose config.json records how it was derived (CONFIG_KEY). Parties load that directory as
their model; `mark_trainable` leaves the first and last adapterLayers layers and a classifier's head
trainable and freezes the rest (the compressed middle, embeddings, norms). What trains is what
travels (fedtune_trainer.adapters). `plug` writes the final adapter into the full model.
`python -m fedtune_trainer.offsite FINAL OUT [--eval FILE]` does that for a finished job's final/.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from fedtune.api.offsite import (
    CONFIG_KEY,
    OFFSITE_DOC,
    OFFSITE_TENSORS,
    adapter_layer_indices,
    adapter_map,
    kept_layers,
    plugged_name,
)

from fedtune_trainer.models import DTYPES, HEADS  # HEADS: a classifier's head is new, so it trains too


def layer_list(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    """(dotted path, module) of the model's transformer layers: the ModuleList config.num_hidden_layers long."""
    total = getattr(model.config, "num_hidden_layers", None)
    found = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.ModuleList) and name and len(m) == total
    ]
    if len(found) != 1:
        raise ValueError(
            f"offsite tuning: cannot tell the transformer layers of {type(model).__name__} (config.num_hidden_layers "
            f"{total}; ModuleLists of that length: {', '.join(n for n, _ in found) or 'none'}); choose another method"
        )
    return found[0]


def build_emulator(model: torch.nn.Module, adapter_layers: int, drop_ratio: float) -> dict[str, Any]:
    """Turn the full `model` into its emulator, in place; returns what config.json records under CONFIG_KEY."""
    path, layers = layer_list(model)
    total = len(layers)
    kept = kept_layers(total, adapter_layers, drop_ratio)
    parent_name, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, torch.nn.ModuleList([layers[i] for i in kept]))
    for new, layer in enumerate(getattr(parent, attr)):  # decoder layers know their index (their cache slot)
        for m in layer.modules():
            if isinstance(getattr(m, "layer_idx", None), int):
                m.layer_idx = new
    config = model.config
    config.num_hidden_layers = len(kept)
    if isinstance(getattr(config, "layer_types", None), list) and len(config.layer_types) == total:
        config.layer_types = [config.layer_types[i] for i in kept]
    info = {"layersPath": path, "fullLayers": total, "kept": kept, "adapterLayers": adapter_layers}
    info["dropRatio"] = drop_ratio
    setattr(config, CONFIG_KEY, info)
    return info


def emulator_info(model: torch.nn.Module, params: dict[str, float]) -> dict[str, Any]:
    """What the emulator's config records; ValueError when the model is no emulator, or one derived with other
    peft.config (`params`: adapterLayers, dropRatio) than the job's: the plug-back would map other layers."""
    info = getattr(model.config, CONFIG_KEY, None)
    if not isinstance(info, dict) or not {"layersPath", "kept", "adapterLayers", "dropRatio"} <= set(info):
        raise ValueError(
            "peft.method offsite: the model parties load (model.emulator) is not an emulator: its config.json has "
            f"no {CONFIG_KEY}; build it with `fedtune emulator JOB.yaml`"
        )
    for key in ("adapterLayers", "dropRatio"):
        if info[key] != params[key]:
            raise ValueError(
                f"peft.config.{key} ({params[key]}) differs from the emulator's ({info[key]}): rebuild the emulator "
                f"(remove it and run `fedtune emulator JOB.yaml`), or set {key} to the emulator's"
            )
    return info


def mark_trainable(model: torch.nn.Module, params: dict[str, float]) -> list[str]:
    """Freeze the emulator but its adapter layers and a classifier's head; returns the trainable names.

    `params`: the job's offsite peft.config (fedtune.api.offsite.offsite_params)."""
    adapter_layers = int(params["adapterLayers"])
    info = emulator_info(model, params)
    path, layers = layer_list(model)
    if path != info["layersPath"] or len(layers) != len(info["kept"]):
        raise ValueError(
            f"model.emulator: its layers ({path}, {len(layers)}) are not those its config records "
            f"({info['layersPath']}, {len(info['kept'])}); rebuild it with `fedtune emulator JOB.yaml`"
        )
    model.requires_grad_(False)
    for i in adapter_layer_indices(len(layers), adapter_layers):
        layers[i].requires_grad_(True)
    for name, m in model.named_modules():
        if name.rsplit(".", 1)[-1] in HEADS:
            m.requires_grad_(True)
    return [n for n, p in model.named_parameters() if p.requires_grad]


def plug(full: torch.nn.Module, tensors: dict[str, torch.Tensor], info: dict[str, Any]) -> list[str]:
    """Write the emulator-trained `tensors` into the `full` model; returns the full model's names written.

    Every tensor must land on a parameter of the same shape: a silent partial plug-back would ship
    the base model's layers as if trained."""
    mapping = adapter_map(info["kept"], info["adapterLayers"])
    own = dict(full.named_parameters())
    written, bad = [], []
    for name, value in tensors.items():
        try:
            target = plugged_name(name, info["layersPath"], mapping)
        except KeyError:
            bad.append(f"{name} (a compressed middle layer: only adapter layers train)")
            continue
        param = own.get(target)
        if param is None or tuple(param.shape) != tuple(value.shape):
            bad.append(f"{name} -> {target} ({'absent' if param is None else f'shape {tuple(param.shape)}'})")
            continue
        written.append(target)
    if bad:
        raise ValueError(f"the adapter does not plug into the full model: {'; '.join(bad[:3])}")
    with torch.no_grad():
        for name, value in tensors.items():
            own[plugged_name(name, info["layersPath"], mapping)].copy_(value)
    return written


def export(final_dir: str, out_dir: str, eval_file: str | None = None) -> dict[str, Any]:
    """Plug a finished job's final/ into the full model and save it (transformers layout) in `out_dir`.

    The full model is built as the emulator was (fedtune.api.job.ModelSpec in offsite.json: the owner's
    source, the job's seed for a new head); the emulator's derivation is recomputed from its parameters."""
    from fedtune.api.job import DataSchema, ModelSpec
    from safetensors.torch import load_file

    from fedtune_trainer.models import load_base_model

    doc = json.loads((Path(final_dir) / OFFSITE_DOC).read_text())
    spec, data = ModelSpec.model_validate(doc["model"]), DataSchema.model_validate(doc["data"])
    model, tokenizer = load_base_model(spec, data, doc["seed"])
    path, layers = layer_list(model)
    k, ratio = doc["offsite"]["adapterLayers"], doc["offsite"]["dropRatio"]
    info = {"layersPath": path, "kept": kept_layers(len(layers), k, ratio), "adapterLayers": k}
    tensors = load_file(Path(final_dir) / OFFSITE_TENSORS)
    written = plug(model, {n: t.to(DTYPES[spec.dtype]) for n, t in tensors.items()}, info)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    out: dict[str, Any] = {"plugged": len(written), "fullLayers": len(layers)}
    if eval_file:
        from fedtune_trainer.data import load_examples
        from fedtune_trainer.evaluate import evaluate

        examples = load_examples(Path(eval_file).read_bytes(), data, spec.task, tokenizer, source=eval_file)
        model.eval()
        metrics = evaluate(model, examples, spec.task, 32, tokenizer.pad_token_id)
        out.update(evalLoss=metrics.eval_loss, evalAccuracy=metrics.eval_accuracy)
    return out


def model_bytes(directory: Path) -> int:
    """Bytes of a model directory's weight files (what a party downloads to load it)."""
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".bin"))


def build_main(argv: list[str]) -> int:
    """`python -m fedtune_trainer emulator --config FILE --output DIR` (what `fedtune emulator` runs)."""
    import argparse

    from fedtune.api.offsite import offsite_params
    from fedtune.api.protocol import TrainerConfig
    from fedtune.api.support import local_model_dir

    from fedtune_trainer.models import load_base_model

    parser = argparse.ArgumentParser(prog="fedtune_trainer emulator", description=__doc__)
    parser.add_argument("--config", required=True, help="a trainer config (JSON) naming the FULL model")
    parser.add_argument("--output", required=True, help="directory to write the emulator to")
    args = parser.parse_args(argv)
    cfg = TrainerConfig.model_validate_json(Path(args.config).read_text())
    params = offsite_params(cfg.peft.config)
    out = Path(args.output)
    if out.exists():
        print(f"error: {out} exists: remove it to build the emulator again", file=sys.stderr)
        return 2
    try:
        model, tokenizer = load_base_model(cfg.model, cfg.data, cfg.training.seed)
        info = build_emulator(model, params["adapterLayers"], params["dropRatio"])
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    tmp = out.with_name(out.name + ".part")  # a crash mid-write must not leave an emulator that looks complete
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(out)
    full_dir = local_model_dir(cfg.model.source)
    full = model_bytes(full_dir) if full_dir is not None else None
    emulator = model_bytes(out)
    share = f" ({emulator / full:.0%} of the full model's {full:,} bytes)" if full else ""
    print(
        f"emulator written to {out}: {len(info['kept'])} of {info['fullLayers']} layers (full layers "
        f"{info['kept']}), {emulator:,} bytes of weights{share}; layers {info['kept'][: params['adapterLayers']]} "
        f"and {info['kept'][-params['adapterLayers'] :]} train"
    )
    return 0


def main(argv: list[str]) -> int:
    """`python -m fedtune_trainer.offsite FINAL_DIR OUT_DIR [--eval FILE]`: the plugged-in full model."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m fedtune_trainer.offsite", description=export.__doc__)
    parser.add_argument("final", help="a finished job's final/ directory (offsite.safetensors, offsite.json)")
    parser.add_argument("out", help="where the full model with the trained adapter layers goes")
    parser.add_argument("--eval", default=None, help="JSON lines in the job's schema to report its accuracy on")
    args = parser.parse_args(argv)
    try:
        result = export(args.final, args.out, args.eval)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
