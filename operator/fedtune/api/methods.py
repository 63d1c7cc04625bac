"""Tables of the PEFT methods and aggregation strategies fedtune accepts, and their checks.

Pure data and functions: the operator validates specs with them without importing torch;
the trainer's strategies read their defaults from here so both sides agree.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from fedtune.api.method_params import Table, method_params
from fedtune.api.offsite import offsite_params

# Whether check_peft_config also asks peft itself (where installed; importing it takes seconds).
_ASK_PEFT: ContextVar[bool] = ContextVar("fedtune_ask_peft", default=True)

# peft method name (as written in a FederatedJob) -> peft.PeftType value.
PEFT_METHODS: dict[str, str] = {
    "lora": "LORA",
    "adalora": "ADALORA",
    "ia3": "IA3",
    "loha": "LOHA",
    "lokr": "LOKR",
    "oft": "OFT",
    "boft": "BOFT",
    "vera": "VERA",
    "fourierft": "FOURIERFT",
    "hra": "HRA",
    "ln_tuning": "LN_TUNING",
    "prompt_tuning": "PROMPT_TUNING",
    "prefix_tuning": "PREFIX_TUNING",
}

# Full fine-tuning: no PEFT wrapping; every parameter of the model trains and travels (the study's full-model
# FedAvg baseline). Not a peft method, so it is not in PEFT_METHODS; check_peft_config accepts it.
FULL = "full"

# FedKSeed (Qin et al., ICML 2024): full-parameter zeroth-order tuning whose only traffic is scalars. K random
# seeds are shared per job; each local step draws one, perturbs every weight along the Gaussian direction it
# seeds, and sends (seed index, projected gradient). The global is the per-seed accumulated gradient, K floats,
# which every party replays onto the base model. Not a peft method either; check_peft_config accepts it.
FEDKSEED = "fedkseed"

# peft.config of fedkseed: key -> (default, low, high, whether an integer). Keys in the job's camelCase.
FEDKSEED_PARAMS: Table = {
    "seeds": (4096, 1, 32767, True),  # K; indices travel as int16
    "steps": (200, 1, 100_000, True),  # zeroth-order steps per party per round
    "learningRate": (3e-7, 0.0, 1.0, False),
    "epsilon": (5e-4, 0.0, 1.0, False),  # perturbation scale
}

# Offsite tuning (Xiao et al., 2023; fedtune.api.offsite): parties train the first and last layers of an
# emulator (the model with its middle compressed) and never hold the full model. Not a peft method either.
OFFSITE = "offsite"

# Methods that wrap nothing: the model itself trains (all of it, or offsite's adapter layers).
UNWRAPPED = (FULL, FEDKSEED, OFFSITE)

# Every method a FederatedJob may name.
METHODS = (*PEFT_METHODS, *UNWRAPPED)


def fedkseed_params(config: dict[str, Any]) -> dict[str, float]:
    """fedkseed's peft.config with defaults filled in. Raises ValueError naming the field at fault."""
    return method_params("fedkseed", FEDKSEED_PARAMS, config, floats_open_low=True)


# Prompt-learning methods: peft saves their prompt as a tensor it computes from the trained parameters.
PROMPT_LEARNING = frozenset({"prompt_tuning", "prefix_tuning"})

# Methods peft has but fedtune refuses, and why.
UNFEDERATABLE = {
    "p_tuning": "peft saves only the prompt encoder's output, not the encoder it trains, so parties' "
    "updates cannot be aggregated; use prompt_tuning or prefix_tuning",
}

TASK_TYPES = {"sequence-classification": "SEQ_CLS", "causal-lm": "CAUSAL_LM"}

# (method, task) pairs the locked transformers and peft (requirements/lock.txt) cannot train on any
# model, and why. The operator has no torch to ask the libraries (fedtune.api.support.probe), so
# this table is how its admission refuses them; tests/test_model_support.py checks it against the
# probe on real architectures, and fails when a new lock changes the answer.
TASK_LIMITS: dict[tuple[str, str], str] = {
    ("prefix_tuning", "sequence-classification"): "prefix tuning feeds trained key/value prefixes through the "
    "model's past_key_values, and under transformers 5 no sequence-classification model's forward takes them "
    "(peft: 'Model does not support past key values'); use prompt_tuning, lora or ia3, or task causal-lm",
}

# What to suggest when a method cannot train a model.
ALTERNATIVES = "another PEFT method (lora, ia3 or prompt_tuning train on every model fedtune supports)"

# Keys fedtune owns; a peft config may not set them.
RESERVED_PEFT_KEYS = {"peft_type", "task_type", "base_model_name_or_path", "inference_mode", "revision"}


@dataclass(frozen=True)
class Param:
    """One strategy parameter: default and the open/closed bounds it must lie in."""

    default: float
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    doc: str = ""

    def check(self, name: str, value: float) -> str | None:
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            op = ">" if self.low_open else ">="
            return f"{name} must be {op} {self.low} (got {value})"
        if self.high is not None and (value > self.high or (self.high_open and value == self.high)):
            op = "<" if self.high_open else "<="
            return f"{name} must be {op} {self.high} (got {value})"
        return None


_ADAPTIVE = {
    "serverLearningRate": Param(0.01, 0.0, None, low_open=True, doc="server step size (eta)"),
    "beta1": Param(0.9, 0.0, 1.0, high_open=True, doc="first-moment decay"),
    "beta2": Param(0.99, 0.0, 1.0, high_open=True, doc="second-moment decay"),
    "tau": Param(1e-3, 0.0, None, low_open=True, doc="adaptivity (epsilon)"),
}

STRATEGIES: dict[str, dict[str, Param]] = {
    "fedavg": {},
    "fedprox": {"mu": Param(0.01, 0.0, None, doc="proximal term weight, applied by each party")},
    "fedadam": dict(_ADAPTIVE),
    "fedyogi": dict(_ADAPTIVE),
    "fedadagrad": {k: v for k, v in _ADAPTIVE.items() if k in ("serverLearningRate", "tau")},
    "fedavgm": {
        "serverLearningRate": Param(1.0, 0.0, None, low_open=True, doc="server step size"),
        "momentum": Param(0.9, 0.0, 1.0, high_open=True, doc="server momentum"),
    },
}

# How many adapter-sized tensors of server state each strategy keeps between rounds (FedOpt's m
# and v, FedAvgM's momentum); the control plane sizes the state upload from it. Unlisted: none.
SERVER_STATE_COPIES: dict[str, int] = {"fedadam": 2, "fedyogi": 2, "fedadagrad": 1, "fedavgm": 1}


def strategy_params(name: str, given: dict[str, float]) -> dict[str, float]:
    """All parameters of strategy `name` with defaults filled in. Raises ValueError on bad input."""
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; choose one of: {', '.join(sorted(STRATEGIES))}")
    table = STRATEGIES[name]
    unknown = sorted(set(given) - set(table))
    if unknown:
        allowed = ", ".join(sorted(table)) or "none"
        raise ValueError(f"strategy {name!r} has no parameter(s) {', '.join(unknown)}; it accepts: {allowed}")
    problems = [p for k, v in given.items() if (p := table[k].check(k, float(v)))]
    if problems:
        raise ValueError("; ".join(problems))
    return {k: float(given.get(k, p.default)) for k, p in table.items()}


@contextmanager
def peft_itself_deferred() -> Iterator[None]:
    """Within: check_peft_config makes only fedtune's own checks; the caller asks peft later.

    `fedtune run` parses the job at once and runs peft's check in the background while the pods
    and the S3 server start, instead of making the user wait seconds for peft and torch to import.
    """
    token = _ASK_PEFT.set(False)
    try:
        yield
    finally:
        _ASK_PEFT.reset(token)


def check_peft_config(method: str, config: dict[str, Any], task: str, model: str | None = None) -> None:
    """Validate a peft config. Deep checks run only where peft is installed (it imports torch).

    `model`: the job's model source, named in messages.
    """
    if method in UNFEDERATABLE:
        raise ValueError(f"{method} cannot be federated: {UNFEDERATABLE[method]}")
    if method not in METHODS:
        raise ValueError(f"unknown PEFT method {method!r}; choose one of: {', '.join(sorted(METHODS))}")
    if method == FULL:
        if config:
            raise ValueError(
                f"method full trains every parameter and takes no config (got {', '.join(sorted(config))}); "
                "remove peft.config"
            )
        return
    if method == FEDKSEED:
        fedkseed_params(config)
        return
    if method == OFFSITE:
        offsite_params(config)
        return
    if (method, task) in TASK_LIMITS:
        which = f"{model} (a {task} model)" if model else f"a {task} model"
        raise ValueError(f"{method} cannot train {which}: {TASK_LIMITS[method, task]}")
    reserved = sorted(RESERVED_PEFT_KEYS & set(config))
    if reserved:
        raise ValueError(f"config may not set {', '.join(reserved)}: fedtune sets them from the job")
    for key in ("r", "num_virtual_tokens"):
        if key in config and (not isinstance(config[key], int) or config[key] < 1):
            raise ValueError(f"config.{key} must be a positive integer (got {config[key]!r})")
    if method in ("prompt_tuning", "prefix_tuning") and "num_virtual_tokens" not in config:
        raise ValueError(f"{method} needs config.num_virtual_tokens, e.g. 16")
    if _ASK_PEFT.get():
        ask_peft(method, config, task)


def ask_peft(method: str, config: dict[str, Any], task: str) -> None:
    """peft's own verdict on a config fedtune's checks passed; nothing where peft is not installed."""
    if method in UNWRAPPED:
        return  # no peft config: nothing for peft to judge
    try:
        from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING  # lazy: imports torch; absent in the operator image
    except ImportError:
        return
    config_cls = PEFT_TYPE_TO_CONFIG_MAPPING[PEFT_METHODS[method]]
    try:
        config_cls(task_type=TASK_TYPES[task], **config)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"peft rejects this {method} config: {exc}") from None
