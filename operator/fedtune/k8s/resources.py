"""DeepSpeed settings + a party's compute -> what a trainer pod asks of Kubernetes, and where it fits.

Derivation (`trainer_resources`), one row per output:

====================  =========================================================================
output                rule
====================  =========================================================================
nvidia.com/gpu        requests = limits = compute.gpusPerPod (extended resources cannot
                      overcommit); absent for CPU parties.
cpu                   request = compute.cpu; no limit: CFS throttling of one rank stalls all of
                      them at every collective, and idle node CPU is free to borrow.
/dev/shm              emptyDir medium Memory, 1Gi per GPU, at least 1Gi (NCCL's shared-memory
                      transport and DataLoader workers; the container default is 64Mi).
memory                request = limit = compute.memory + shm + offload extras below; tmpfs pages
                      are charged to the pod, and limit = request keeps the pod from being the
                      first one the node evicts under memory pressure.
 + offloadOptimizer   + 2Gi per rank: fp32 master weights, Adam moments and gradients of the
                      trainable parameters plus DeepSpeed's pinned transfer buffers, on the host.
 + offloadParams      + 1.5 x parameters x (2 bytes bf16, 4 bytes fp32) when spec.model.parameters is
                      given (the whole base model lives in host memory, +50% staging), else +8Gi.
                      Offload extras count only when deepspeed.enabled (otherwise ignored).
 + base model         CPU parties, spec.model.parameters given: + 1.2 x parameters x bytes per
                      weight (fp32 4, bf16 2; model.quantization: 8-bit ~1, 4-bit ~0.52 with
                      double quantisation, scales included; +20% for what stays unquantised,
                      in float32 after k-bit preparation, and loading): there the frozen model
                      lives in host memory (unless offloadParams counted it). On a GPU pod's
                      plain path a causal LM loads straight onto the GPU (a quantised model
                      too, quantised there), so its host sees one shard at a time.
 + full / fedkseed    CPU parties, spec.model.parameters given (with or without offload: a CPU
                      party holds everything in host memory), on top of the base model:
                      peft.method full (every weight trains with torch's AdamW): + parameters x
                      bytes per weight x 5: gradients and AdamW's two moments (in the weights'
                      dtype: float32 unless model.dtype bfloat16), PartyRuntime.initial and the
                      round's global (CPU copies of every weight); strategy fedprox with mu > 0
                      adds its float32 anchors, + 4 bytes per parameter.
                      peft.method fedkseed (float32 weights): + parameters x 4 x 2: the base
                      weights kept for replay (PartyRuntime.initial) and the direction z, drawn
                      one parameter tensor at a time in float32 (counted as the whole model: the
                      spec does not say the largest tensor, so this is an upper bound).
                      peft.method offsite: the base-model row only (the emulator is smaller than
                      the model spec.model.parameters counts; its adapter layers' optimizer state
                      is not counted separately).
world size            spec.world_size(gpusPerPod): one rank per GPU (plain PyTorch or DeepSpeed),
                      1 for CPU parties; the pod's command starts them (fedtune.api.launch).
global batch          spec.global_batch(gpusPerPod) = micro x accumulation x world; its
                      ValueError (trainBatchSize mismatch) propagates unchanged.
node selector         compute.nodeSelector + nvidia.com/gpu.product=<gpuProduct> when set.
affinity              required node affinity nvidia.com/gpu.product In [gpuProduct] when set.
tolerations           compute.tolerations, plus nvidia.com/gpu Exists:NoSchedule for GPU pods
                      (GPU pools are commonly tainted so; the ExtendedResourceToleration
                      admission plugin would add it too, the fit check must agree).
env                   FEDTUNE_WORLD_SIZE, FEDTUNE_GLOBAL_BATCH, OMP_NUM_THREADS (cpu / world,
                      torch otherwise sizes its pool from the node's cores), DS_ACCELERATOR=cpu
                      without GPUs. Not WORLD_SIZE: torch.distributed reads that as the number
                      of ranks already launched; torchrun sets it (and RANK) for each rank.
====================  =========================================================================
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

from fedtune.api.job import AggregatorSpec, FederatedJobSpec
from fedtune.api.methods import FEDKSEED, FULL
from fedtune.api.party import ComputeSpec
from fedtune.api.quantization import weight_bytes

GPU = "nvidia.com/gpu"
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
GI = 2**30
SHM_PER_GPU = 1 * GI
OFFLOAD_OPTIMIZER_PER_RANK = 2 * GI
OFFLOAD_PARAMS_UNKNOWN_MODEL = 8 * GI
OFFLOAD_PARAMS_HEADROOM = Decimal("1.5")
BASE_MODEL_HEADROOM = Decimal("1.2")
FULL_COPIES = 5  # full fine-tuning, per weight: gradient, AdamW exp_avg and exp_avg_sq, initial copy, round's global
FEDKSEED_COPIES = 2  # FedKSeed, per float32 weight: the base kept for replay, the direction z (an upper bound)
GPU_TOLERATION = {"key": GPU, "operator": "Exists", "effect": "NoSchedule"}

_SUFFIXES = {
    "Ki": Decimal(2**10), "Mi": Decimal(2**20), "Gi": Decimal(2**30),
    "Ti": Decimal(2**40), "Pi": Decimal(2**50), "Ei": Decimal(2**60),
    "n": Decimal("1e-9"), "u": Decimal("1e-6"), "m": Decimal("1e-3"), "": Decimal(1),
    "k": Decimal(10**3), "M": Decimal(10**6), "G": Decimal(10**9),
    "T": Decimal(10**12), "P": Decimal(10**15), "E": Decimal(10**18),
}  # fmt: skip


def parse_quantity(quantity: str | int | float) -> Decimal:
    """A Kubernetes quantity as a number: "500m" -> 0.5, "8Gi" -> 8589934592, "1G" -> 1e9, "1e3"."""
    text = str(quantity).strip()
    # Two-letter binary suffixes first, so "Mi" is not read as "M" followed by junk.
    for suffix in sorted(_SUFFIXES, key=len, reverse=True):
        if suffix and text.endswith(suffix):
            number, factor = text[: -len(suffix)], _SUFFIXES[suffix]
            break
    else:
        number, factor = text, Decimal(1)
    try:
        value = Decimal(number) * factor
    except InvalidOperation:
        raise ValueError(f"{quantity!r} is not a Kubernetes quantity (e.g. 500m, 2, 512Mi, 8Gi, 1G)") from None
    if not value.is_finite() or value < 0:
        raise ValueError(f"{quantity!r} is not a Kubernetes quantity (e.g. 500m, 2, 512Mi, 8Gi, 1G)")
    return value


def format_memory(num_bytes: Decimal | int) -> str:
    """Bytes as a quantity: whole Gi when exact, else Mi rounded up (never asks for less)."""
    whole = math.ceil(num_bytes)
    return f"{whole // GI}Gi" if whole % GI == 0 else f"{math.ceil(whole / 2**20)}Mi"


@dataclass(frozen=True)
class PodResources:
    """What one pod asks of the cluster; `requests`/`limits` go into the container as written."""

    requests: dict[str, str]
    limits: dict[str, str]
    shm_size: str | None = None
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: list[dict[str, Any]] = field(default_factory=list)
    affinity: dict[str, Any] | None = None
    world_size: int = 1
    global_batch: int | None = None
    env: dict[str, str] = field(default_factory=dict)

    @property
    def gpus(self) -> int:
        """GPUs requested (0 for CPU pods)."""
        return int(self.requests.get(GPU, "0"))

    def container_resources(self) -> dict[str, dict[str, str]]:
        """The container's `resources` field."""
        return {"requests": dict(self.requests), "limits": dict(self.limits)}


def _offload_bytes(spec: FederatedJobSpec, world: int, model_params: int | None) -> Decimal:
    ds = spec.deepspeed
    if not ds.enabled:
        return Decimal(0)
    extra = Decimal(0)
    if ds.offload_optimizer:
        extra += OFFLOAD_OPTIMIZER_PER_RANK * world
    if ds.offload_params:
        if model_params is None:
            extra += OFFLOAD_PARAMS_UNKNOWN_MODEL
        else:
            half = ds.bf16 or spec.model.dtype == "bfloat16"
            extra += OFFLOAD_PARAMS_HEADROOM * model_params * (2 if half else 4)
    return extra


def _training_state_bytes(spec: FederatedJobSpec, model_params: int) -> Decimal:
    """What a CPU party holds in host memory beside the base model when every weight trains (full, fedkseed)."""
    per_weight = Decimal(weight_bytes(spec.model.dtype, None))
    if spec.peft.method == FULL:
        extra = FULL_COPIES * model_params * per_weight
        if spec.strategy.name == "fedprox" and spec.strategy.resolved().get("mu", 0.0) > 0:
            extra += model_params * 4  # FedProx's anchors: a float32 copy of every trainable weight
        return extra
    if spec.peft.method == FEDKSEED:
        return FEDKSEED_COPIES * model_params * Decimal(4)
    return Decimal(0)


def _gpu_affinity(product: str) -> dict[str, Any]:
    term = {"matchExpressions": [{"key": GPU_PRODUCT_LABEL, "operator": "In", "values": [product]}]}
    return {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [term]}}}


def trainer_resources(spec: FederatedJobSpec, compute: ComputeSpec, *, model_params: int | None = None) -> PodResources:
    """Resources of a party's trainer pod (see the module docstring for every rule).

    `model_params` is the base model's parameter count when known (spec.model.parameters); it sizes
    parameter offload, a CPU party's model and, under full fine-tuning or FedKSeed, its training state.
    Raises ValueError when the batch settings do not fit this party's world size.
    """
    gpus = compute.gpus_per_pod
    world = spec.world_size(gpus)
    global_batch = spec.global_batch(gpus)
    shm = SHM_PER_GPU * max(1, gpus)
    memory = parse_quantity(compute.memory) + shm + _offload_bytes(spec, world, model_params)
    offloaded = spec.deepspeed.enabled and spec.deepspeed.offload_params  # already counted the model
    if not gpus and model_params is not None and not offloaded:
        memory += BASE_MODEL_HEADROOM * model_params * Decimal(weight_bytes(spec.model.dtype, spec.model.quantization))
    if not gpus and model_params is not None:
        memory += _training_state_bytes(spec, model_params)
    requests = {"cpu": compute.cpu, "memory": format_memory(memory)}
    limits = {"memory": requests["memory"]}
    node_selector = dict(compute.node_selector)
    tolerations = [dict(t) for t in compute.tolerations]
    affinity = None
    if gpus:
        requests[GPU] = limits[GPU] = str(gpus)
        if GPU_TOLERATION not in tolerations:
            tolerations.append(dict(GPU_TOLERATION))
    if compute.gpu_product:
        node_selector[GPU_PRODUCT_LABEL] = compute.gpu_product
        affinity = _gpu_affinity(compute.gpu_product)
    threads = max(1, math.floor(parse_quantity(compute.cpu) / world))
    env = {
        "FEDTUNE_WORLD_SIZE": str(world),
        "FEDTUNE_GLOBAL_BATCH": str(global_batch),
        "OMP_NUM_THREADS": str(threads),
    }
    if not gpus:
        env["DS_ACCELERATOR"] = "cpu"  # DeepSpeed otherwise probes for CUDA at import and fails
    return PodResources(
        requests=requests,
        limits=limits,
        shm_size=format_memory(shm),
        node_selector=node_selector,
        tolerations=tolerations,
        affinity=affinity,
        world_size=world,
        global_batch=global_batch,
        env=env,
    )


def aggregator_resources(aggregator: AggregatorSpec) -> PodResources:
    """Resources of the aggregator pod: modest CPU and memory from spec.aggregator, no GPU.

    It averages adapter tensors with numpy-sized work, so it needs no accelerator and no shm.
    """
    memory = format_memory(parse_quantity(aggregator.memory))
    threads = max(1, math.floor(parse_quantity(aggregator.cpu)))
    return PodResources(
        requests={"cpu": aggregator.cpu, "memory": memory},
        limits={"memory": memory},
        env={"OMP_NUM_THREADS": str(threads)},
    )


# --- Can some node hold the pod? -------------------------------------------------------------
# A capacity check against allocatable, not free, resources: pods already running are not
# subtracted. A busy node is a reason to wait in Pending; a node that could never hold the pod
# is a reason to report Unschedulable instead of waiting forever.

_SCHEDULING_EFFECTS = ("NoSchedule", "NoExecute")  # PreferNoSchedule only lowers a node's score


def _tolerates(toleration: dict[str, Any], taint: dict[str, Any]) -> bool:
    if toleration.get("effect") and toleration["effect"] != taint.get("effect"):
        return False
    if toleration.get("operator", "Equal") == "Exists":
        # An Exists toleration without a key tolerates every taint.
        return not toleration.get("key") or toleration["key"] == taint.get("key")
    return toleration.get("key") == taint.get("key") and (toleration.get("value") or "") == (taint.get("value") or "")


def _expression_matches(expr: dict[str, Any], labels: dict[str, str]) -> bool:
    key, op, values = expr["key"], expr["operator"], expr.get("values", [])
    if op == "In":
        return labels.get(key) in values
    if op == "NotIn":
        return labels.get(key) not in values
    if op == "Exists":
        return key in labels
    if op == "DoesNotExist":
        return key not in labels
    raise ValueError(f"node affinity operator {op!r} is not supported by the fit check")


def _affinity_matches(affinity: dict[str, Any] | None, labels: dict[str, str]) -> bool:
    required = ((affinity or {}).get("nodeAffinity") or {}).get("requiredDuringSchedulingIgnoredDuringExecution")
    if not required:
        return True
    # Terms are ORed; the expressions inside one term are ANDed (Kubernetes semantics).
    return any(
        all(_expression_matches(e, labels) for e in term.get("matchExpressions", []))
        for term in required["nodeSelectorTerms"]
    )


def _label_problems(resources: PodResources, labels: dict[str, str]) -> list[str]:
    problems = []
    for key, want in resources.node_selector.items():
        have = labels.get(key)
        if have is None:
            problems.append(f"missing label {key}={want}")
        elif have != want:
            problems.append(f"label {key}={have}, needs {want}")
    # The GPU product is in both the selector and the affinity; say it once.
    if not problems and not _affinity_matches(resources.affinity, labels):
        problems.append("does not match the required node affinity")
    return problems


def node_problems(resources: PodResources, node: dict[str, Any]) -> list[str]:
    """Every reason `node` (a Node object as a dict) cannot hold the pod; empty when it can."""
    spec, status = node.get("spec") or {}, node.get("status") or {}
    labels = (node.get("metadata") or {}).get("labels") or {}
    allocatable = status.get("allocatable") or {}
    problems = []
    if spec.get("unschedulable"):
        problems.append("cordoned (spec.unschedulable)")
    for resource, needed in resources.requests.items():
        if parse_quantity(allocatable.get(resource, "0")) < parse_quantity(needed):
            problems.append(f"{allocatable.get(resource, '0')} {resource} allocatable, {needed} needed")
    problems += _label_problems(resources, labels)
    for taint in spec.get("taints") or []:
        if taint.get("effect") in _SCHEDULING_EFFECTS and not any(_tolerates(t, taint) for t in resources.tolerations):
            value = f"={taint['value']}" if taint.get("value") else ""
            problems.append(f"taint {taint.get('key')}{value}:{taint['effect']} not tolerated")
    return problems


def node_fits(resources: PodResources, node: dict[str, Any]) -> str | None:
    """None when `node` could hold the pod, else why not (problems joined by " and ")."""
    return " and ".join(node_problems(resources, node)) or None


def find_fitting_node(
    resources: PodResources, nodes: list[dict[str, Any]], *, pod: str = "the pod", show: int = 5
) -> tuple[bool, str]:
    """(True, "<node> can hold <pod>") for the first node that fits, else (False, why none does).

    The reason names the `show` nodes with the fewest problems (the likeliest to fix) and what
    each lacks, e.g. "no node can hold the trainer pod of party hospital-a: 3 nodes checked;
    gpu-node-1: 1 nvidia.com/gpu allocatable, 2 needed; cpu-node: missing label ...".
    """
    failures = []
    for node in nodes:
        name = (node.get("metadata") or {}).get("name", "<unnamed>")
        problems = node_problems(resources, node)
        if not problems:
            return True, f"node {name} can hold {pod}"
        failures.append((len(problems), name, " and ".join(problems)))
    failures.sort()
    listed = "; ".join(f"{name}: {reason}" for _, name, reason in failures[:show])
    more = f"; and {len(failures) - show} more" if len(failures) > show else ""
    checked = f"{len(nodes)} node{'s' if len(nodes) != 1 else ''} checked"
    return False, f"no node can hold {pod}: {checked}" + (f"; {listed}{more}" if listed else "")
