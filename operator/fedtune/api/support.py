"""Whether the installed transformers and peft can train a job's PEFT method on its model.

fedtune's own checks (fedtune.api.methods) know methods and tasks; only the libraries know what a
model's architecture accepts. `probe` builds the model from its config on the meta device (no
weights, no memory), wraps it with the job's peft config and runs one forward pass: what would
fail in round 1 (prefix tuning on a model whose forward takes no past_key_values, target modules
the model does not have) fails here, in seconds, before any pod starts. It needs torch,
transformers and peft, imported lazily: `fedtune validate` and `fedtune run` call it where they are
installed and the model's files are on this machine; the operator (no torch) relies on the static
table in methods.TASK_LIMITS, and the trainer runs one real forward pass at init.
"""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path
from typing import Any

from fedtune.api.job import DataSchema, ModelSpec, PeftSpec
from fedtune.api.methods import ALTERNATIVES, OFFSITE, PEFT_METHODS, TASK_TYPES, UNWRAPPED

# What the first forward pass feeds the model: a batch of one short sequence.
_PROBE_TOKENS = 8
# How peft and transformers say a model cannot take a method (anything else is another fault).
UNSUPPORTED = (ValueError, TypeError, KeyError)


def local_model_dir(source: str) -> Path | None:
    """The directory of a model source on this machine (file://, pkg://, a path); None for hf:// and s3://.

    Raises FileNotFoundError when a local source names something that is not there.
    """
    if source.startswith(("hf://", "s3://")):
        return None
    if source.startswith("pkg://"):
        package, _, sub = source[len("pkg://") :].partition("/")
        # find_spec without importing: some model packages fail to import (missing deps) yet ship the files.
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(f"model source {source}: Python package {package!r} is not installed")
        path = Path(list(spec.submodule_search_locations)[0]) / sub
    else:
        path = Path(source.removeprefix("file://"))
    if not path.exists():
        raise FileNotFoundError(f"model source {source}: {path} does not exist")
    return path


def libraries() -> str:
    """The versions the verdict depends on, for messages."""
    from importlib.metadata import version

    return f"transformers {version('transformers')}, peft {version('peft')}"


def _config(model: ModelSpec, data: DataSchema, where: Path) -> Any:
    from transformers import AutoConfig

    kwargs: dict[str, Any] = {"gguf_file": model.gguf_file} if model.gguf_file else {}
    if model.task == "sequence-classification":
        kwargs.update(id2label=dict(enumerate(data.labels)), label2id={n: i for i, n in enumerate(data.labels)})
    return AutoConfig.from_pretrained(where, **kwargs)


def probe(model: ModelSpec, peft: PeftSpec, data: DataSchema, where: Path) -> str | None:
    """Why the installed libraries cannot train `peft` on this model, or None when one forward pass works.

    Only failures that peft or transformers report as unsupported count (ValueError, TypeError,
    KeyError); a meta-device limitation of some operation (RuntimeError, NotImplementedError) is not
    a verdict, and the trainer's forward pass at init decides instead.
    """
    with warnings.catch_warnings():  # deprecation notices of the libraries are not the user's concern here
        warnings.simplefilter("ignore")
        return _probe(model, peft, data, where)


def _probe(model: ModelSpec, peft: PeftSpec, data: DataSchema, where: Path) -> str | None:
    import torch
    from peft import get_peft_model
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    config = _config(model, data, where)
    arch = (getattr(config, "architectures", None) or [type(config).__name__])[0]
    auto = AutoModelForSequenceClassification if model.task == "sequence-classification" else AutoModelForCausalLM
    full = peft.method in UNWRAPPED  # no peft wrapping: the model itself trains
    if peft.method == OFFSITE:  # the emulator needs a middle to compress
        from fedtune.api.offsite import kept_layers, offsite_params

        params = offsite_params(peft.config)
        try:
            kept_layers(getattr(config, "num_hidden_layers", 0) or 0, params["adapterLayers"], params["dropRatio"])
        except ValueError as exc:
            return f"{model.source} ({arch}): {exc}"
    peft_config = None
    if not full:
        config_cls = PEFT_TYPE_TO_CONFIG_MAPPING[PEFT_METHODS[peft.method]]
        peft_config = config_cls(task_type=TASK_TYPES[model.task], **peft.config)
    with torch.device("meta"):
        try:
            net = auto.from_config(config)
        except ValueError as exc:  # e.g. an architecture with no model class for this task
            return f"{model.source} ({arch}) has no {model.task} model in {libraries()}: {exc}"
        names = _linear_names(net)  # before peft wraps (and renames) the modules
        try:
            wrapped = net if full else get_peft_model(net, peft_config)
        except UNSUPPORTED as exc:
            return (
                f"peft cannot apply {peft.method} to {model.source} ({arch}): {exc}; fix peft.config for this "
                f"architecture (its linear modules: {', '.join(names)})"
            )
        try:
            first_forward(wrapped)
        except UNSUPPORTED as exc:
            return cannot_train(peft.method, f"{model.source} ({arch})", model.task, exc)
        except (RuntimeError, NotImplementedError):
            return None  # the meta device, not the model: left to the trainer's check at init
    return None


def first_forward(model: Any) -> None:
    """One forward pass without gradients on a batch of one short sequence, on the model's device."""
    import torch

    ids = torch.zeros((1, _PROBE_TOKENS), dtype=torch.long, device=next(model.parameters()).device)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=torch.ones_like(ids))


def cannot_train(method: str, what: str, task: str, exc: BaseException) -> str:
    """Why `method` cannot train a model, with the fix (the probe's and the trainer's message)."""
    return f"{method} cannot train {what} ({task}) with {libraries()}: {exc}; use {ALTERNATIVES}, or another model"


def _linear_names(net: Any) -> list[str]:
    """The distinct last names of a model's linear layers: what target_modules may name."""
    import torch

    return sorted({name.rsplit(".", 1)[-1] for name, m in net.named_modules() if isinstance(m, torch.nn.Linear)})


def verdict(
    model: ModelSpec, method: PeftSpec, data: DataSchema, model_here: bool = False
) -> tuple[str | None, str | None]:
    """(problem, note) for a job's model as far as this machine can tell.

    problem: why the job cannot train, "field: why and the fix"; note: why no verdict was possible here (the
    model is not on this machine, or torch/transformers/peft are not installed). `model_here`: the
    model must be on this machine (local mode), so a missing one is a problem, not a note.
    """
    try:
        where = local_model_dir(model.source)
    except FileNotFoundError as exc:
        if model_here:
            return f"spec.model.source: {exc}", None
        return None, f"{exc} here: the model's architecture was not checked"
    if where is None:
        return None, f"{model.source} is not on this machine: the model's architecture was not checked here"
    if importlib.util.find_spec("peft") is None or importlib.util.find_spec("transformers") is None:
        return None, "transformers and peft are not installed here: the model's architecture was not checked"
    if model.quantization is not None:
        from fedtune.api.quantization import cannot_run_here

        unable = cannot_run_here()
        if unable and model_here:
            return f"spec.{unable}", None
        if unable:  # `validate` runs where the document is, not where the parties train
            return None, f"{unable} (this machine only: each party's trainer checks its own at start)"
    problem = probe(model, method, data, where)
    return (f"spec.peft: {problem}" if problem else None), None
