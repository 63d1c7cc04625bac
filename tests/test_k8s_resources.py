"""DeepSpeed + compute -> pod resources, Kubernetes quantities, and the node fit check (no cluster)."""

from __future__ import annotations

from decimal import Decimal

import pytest
from fedtune.api.job import AggregatorSpec, FederatedJobSpec
from fedtune.api.party import ComputeSpec
from fedtune.k8s.resources import (
    GPU,
    aggregator_resources,
    find_fitting_node,
    format_memory,
    node_fits,
    parse_quantity,
    trainer_resources,
)

GI = 2**30


def job_spec(deepspeed: dict | None = None, training: dict | None = None, dtype: str = "float32") -> FederatedJobSpec:
    return FederatedJobSpec.model_validate(
        {
            "model": {"source": "pkg://tiny/model", "task": "causal-lm", "dtype": dtype},
            "parties": [{"name": "hospital-a"}],
            "deepspeed": deepspeed or {},
            "training": training or {"batchSize": 4, "gradientAccumulation": 2},
        }
    )


DS = {"enabled": True}
Z2_OPT = {"enabled": True, "zeroStage": 2, "offloadOptimizer": True}
Z3_BOTH = {"enabled": True, "zeroStage": 3, "offloadOptimizer": True, "offloadParams": True, "bf16": True}

# (case, deepspeed, compute, model_params, memory, shm, gpus, world, global batch)
DERIVATION = [
    ("cpu party, no deepspeed", {}, {}, None, "9Gi", "1Gi", 0, 1, 8),
    ("cpu party, zero 0", DS, {"cpu": "4", "memory": "6Gi"}, None, "7Gi", "1Gi", 0, 1, 8),
    ("gpu without deepspeed: one rank per gpu", {}, {"gpusPerPod": 2}, None, "10Gi", "2Gi", 2, 2, 16),
    ("4 gpus zero 0", DS, {"gpusPerPod": 4, "memory": "32Gi"}, None, "36Gi", "4Gi", 4, 4, 32),
    ("zero 1 bf16, no offload", {**DS, "zeroStage": 1, "bf16": True}, {"gpusPerPod": 1}, None, "9Gi", "1Gi", 1, 1, 8),
    ("zero 2 optimizer offload x2 ranks", Z2_OPT, {"gpusPerPod": 2}, None, "14Gi", "2Gi", 2, 2, 16),
    ("zero 2 offload on cpu", Z2_OPT, {}, None, "11Gi", "1Gi", 0, 1, 8),
    ("zero 3 both offloads, size unknown", Z3_BOTH, {"gpusPerPod": 1}, None, "19Gi", "1Gi", 1, 1, 8),
    # 8Gi party + 1Gi shm + 2Gi optimizer offload + 1e9 bf16 params x 2 bytes x 1.5 (2861.02Mi) -> 14126Mi
    ("zero 3 both offloads, 1B params", Z3_BOTH, {"gpusPerPod": 1}, 10**9, "14126Mi", "1Gi", 1, 1, 8),
    ("offload flags ignored when disabled", {**Z2_OPT, "enabled": False}, {}, None, "9Gi", "1Gi", 0, 1, 8),
    ("decimal memory quantity", {}, {"memory": "8G"}, None, "8654Mi", "1Gi", 0, 1, 8),
]


@pytest.mark.parametrize(
    "deepspeed,compute,model_params,memory,shm,gpus,world,batch",
    [c[1:] for c in DERIVATION],
    ids=[c[0] for c in DERIVATION],
)
def test_derivation(deepspeed, compute, model_params, memory, shm, gpus, world, batch):
    res = trainer_resources(job_spec(deepspeed), ComputeSpec.model_validate(compute), model_params=model_params)
    assert res.requests["memory"] == res.limits["memory"] == memory
    assert res.shm_size == shm
    assert res.gpus == gpus
    assert res.world_size == world and res.env["FEDTUNE_WORLD_SIZE"] == str(world)
    assert res.global_batch == batch and res.env["FEDTUNE_GLOBAL_BATCH"] == str(batch)
    assert "cpu" not in res.limits  # no CPU throttling of ranks
    if gpus:
        assert res.requests[GPU] == res.limits[GPU] == str(gpus)
        assert "DS_ACCELERATOR" not in res.env
    else:
        assert GPU not in res.requests and GPU not in res.limits
        assert res.env["DS_ACCELERATOR"] == "cpu"
    assert "WORLD_SIZE" not in res.env  # a lone process would wait for ranks that never come


def test_fp32_param_offload_counts_four_bytes():
    spec = job_spec({"enabled": True, "zeroStage": 3, "offloadParams": True})
    res = trainer_resources(spec, ComputeSpec(memory="8Gi"), model_params=2**28)
    assert res.requests["memory"] == format_memory(8 * GI + GI + Decimal("1.5") * 2**28 * 4) == "10752Mi"


def method_spec(method: str, dtype: str = "float32", strategy: dict | None = None, **model) -> FederatedJobSpec:
    spec = {
        "model": {"source": "pkg://tiny/model", "task": "causal-lm", "dtype": dtype, **model},
        "parties": [{"name": "hospital-a"}],
        "peft": {"method": method},
    }
    if strategy:
        spec["strategy"] = strategy
    return FederatedJobSpec.model_validate(spec)


def cpu_memory(spec: FederatedJobSpec, params: int | None, **compute) -> int:
    res = trainer_resources(spec, ComputeSpec.model_validate(compute), model_params=params)
    return int(parse_quantity(res.requests["memory"]))


P = 2**28  # parameters: 1 GiB in float32


@pytest.mark.parametrize("dtype,per_weight", [("float32", 4), ("bfloat16", 2)])
def test_full_fine_tuning_counts_gradients_adamw_moments_and_the_kept_copies_on_a_cpu_party(dtype, per_weight):
    lora = cpu_memory(method_spec("lora", dtype), P)
    full = cpu_memory(method_spec("full", dtype), P)
    assert lora == parse_quantity(format_memory(8 * GI + GI + Decimal("1.2") * P * per_weight))  # the base model
    # gradients, exp_avg, exp_avg_sq, PartyRuntime.initial and the round's global: five weight-sized tensors
    assert full - lora == 5 * P * per_weight
    prox = cpu_memory(method_spec("full", dtype, strategy={"name": "fedprox", "params": {"mu": 0.01}}), P)
    assert prox - full == 4 * P  # FedProx's float32 anchors
    assert cpu_memory(method_spec("full", dtype), None) == cpu_memory(method_spec("lora", dtype), None)  # unknown


def test_fedkseed_counts_the_base_weights_kept_for_replay_and_a_direction_on_a_cpu_party():
    lora, fedkseed = cpu_memory(method_spec("lora"), P), cpu_memory(method_spec("fedkseed"), P)
    assert fedkseed - lora == 2 * 4 * P  # PartyRuntime.initial and z, both float32


def test_offsite_and_gpu_pods_are_sized_as_before():
    offsite = method_spec("offsite", emulator="pkg://tiny/emulator")
    assert cpu_memory(offsite, P) == cpu_memory(method_spec("lora"), P)
    gpu = {"gpusPerPod": 1}
    assert cpu_memory(method_spec("full"), P, **gpu) == cpu_memory(method_spec("lora"), P, **gpu)  # state on the GPU


def test_gpu_product_sets_selector_affinity_and_keeps_tolerations():
    own = {"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}
    compute = ComputeSpec(gpus_per_pod=1, gpu_product="A100", node_selector={"pool": "ml"}, tolerations=[own])
    res = trainer_resources(job_spec(DS), compute)
    assert res.node_selector == {"pool": "ml", "nvidia.com/gpu.product": "A100"}
    terms = res.affinity["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    assert terms == [{"matchExpressions": [{"key": "nvidia.com/gpu.product", "operator": "In", "values": ["A100"]}]}]
    assert res.tolerations[0] == own
    assert {"key": GPU, "operator": "Exists", "effect": "NoSchedule"} in res.tolerations
    assert compute.tolerations == [own]  # the party's spec is not mutated


def test_cpu_party_has_no_gpu_placement():
    res = trainer_resources(job_spec(), ComputeSpec(node_selector={"pool": "cpu"}))
    assert res.node_selector == {"pool": "cpu"} and res.affinity is None and res.tolerations == []


@pytest.mark.parametrize("cpu,threads", [("500m", "1"), ("2", "1"), ("7", "3"), ("8", "4")])
def test_threads_per_rank(cpu, threads):
    res = trainer_resources(job_spec(DS), ComputeSpec(gpus_per_pod=2, cpu=cpu))
    assert res.env["OMP_NUM_THREADS"] == threads


def test_train_batch_size_inconsistent_with_world_size():
    spec = job_spec({"enabled": True, "trainBatchSize": 8})  # fits 1 GPU (4 x 2 x 1), not 2
    assert trainer_resources(spec, ComputeSpec(gpus_per_pod=1)).global_batch == 8
    with pytest.raises(ValueError, match=r"trainBatchSize \(8\) != .* \(4 x 2 x 2 = 16\) for a party with 2 GPU"):
        trainer_resources(spec, ComputeSpec(gpus_per_pod=2))


def test_aggregator_resources():
    res = aggregator_resources(AggregatorSpec(cpu="500m", memory="2Gi"))
    assert res.requests == {"cpu": "500m", "memory": "2Gi"} and res.limits == {"memory": "2Gi"}
    assert res.gpus == 0 and res.shm_size is None and not res.node_selector and res.global_batch is None


QUANTITIES = [
    ("500m", Decimal("0.5")),
    ("2", 2),
    ("1.5", Decimal("1.5")),
    ("8Gi", 8 * GI),
    ("512Mi", 512 * 2**20),
    ("1G", 10**9),
    ("100k", 100_000),
    ("32766072Ki", 32766072 * 1024),
    ("1e3", 1000),
    (4, 4),
]


@pytest.mark.parametrize("text,value", QUANTITIES)
def test_parse_quantity(text, value):
    assert parse_quantity(text) == value


@pytest.mark.parametrize("bad", ["", "Gi", "eight", "8 GB", "-1", "nan"])
def test_parse_quantity_rejects(bad):
    with pytest.raises(ValueError, match="not a Kubernetes quantity"):
        parse_quantity(bad)


@pytest.mark.parametrize("num,text", [(8 * GI, "8Gi"), (GI + 1, "1025Mi"), (3 * 10**9, "2862Mi")])
def test_format_memory_never_rounds_down(num, text):
    assert format_memory(num) == text


def node(name, gpus=0, cpu="16", memory="64Gi", labels=None, taints=None, cordoned=False):
    allocatable = {"cpu": cpu, "memory": memory}
    if gpus:
        allocatable[GPU] = str(gpus)
    spec = {"taints": taints or []}
    if cordoned:
        spec["unschedulable"] = True
    return {"metadata": {"name": name, "labels": labels or {}}, "spec": spec, "status": {"allocatable": allocatable}}


A100 = {"nvidia.com/gpu.product": "A100"}
GPU_TAINT = {"key": GPU, "value": "present", "effect": "NoSchedule"}
DEDICATED = {"key": "dedicated", "value": "ml", "effect": "NoExecute"}
TWO_A100 = trainer_resources(job_spec(DS), ComputeSpec(gpus_per_pod=2, gpu_product="A100", cpu="4", memory="16Gi"))
TOLERATES_ML = trainer_resources(
    job_spec(DS),
    ComputeSpec(tolerations=[{"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoExecute"}]),
)
CPU_ONLY = trainer_resources(job_spec(), ComputeSpec(cpu="2", memory="8Gi"))

# (case, resources, node, None if it fits else a fragment of the reason)
FITS = [
    ("enough gpus", TWO_A100, node("g", gpus=4, labels=A100), None),
    ("gpu taint tolerated automatically", TWO_A100, node("g", gpus=2, labels=A100, taints=[GPU_TAINT]), None),
    ("too few gpus", TWO_A100, node("g", gpus=1, labels=A100), "1 nvidia.com/gpu allocatable, 2 needed"),
    ("no gpus at all", TWO_A100, node("c", labels=A100), "0 nvidia.com/gpu allocatable, 2 needed"),
    (
        "wrong product",
        TWO_A100,
        node("g", gpus=2, labels={"nvidia.com/gpu.product": "T4"}),
        "label nvidia.com/gpu.product=T4, needs A100",
    ),
    ("missing product label", TWO_A100, node("g", gpus=2), "missing label nvidia.com/gpu.product=A100"),
    ("cordoned", CPU_ONLY, node("c", cordoned=True), "cordoned"),
    ("untolerated taint", CPU_ONLY, node("c", taints=[DEDICATED]), "taint dedicated=ml:NoExecute not tolerated"),
    ("tolerated taint", TOLERATES_ML, node("c", taints=[DEDICATED]), None),
    ("PreferNoSchedule is no bar", CPU_ONLY, node("c", taints=[{"key": "x", "effect": "PreferNoSchedule"}]), None),
    ("cpu too small", CPU_ONLY, node("c", cpu="1500m"), "1500m cpu allocatable, 2 needed"),
    ("memory too small", CPU_ONLY, node("c", memory="8Gi"), "8Gi memory allocatable, 9Gi needed"),
    ("memory in Ki fits", CPU_ONLY, node("c", memory="32766072Ki"), None),
    ("cpu pod on a gpu node", CPU_ONLY, node("g", gpus=8, labels=A100), None),
]


@pytest.mark.parametrize("resources,the_node,reason", [c[1:] for c in FITS], ids=[c[0] for c in FITS])
def test_node_fits(resources, the_node, reason):
    got = node_fits(resources, the_node)
    if reason is None:
        assert got is None
    else:
        assert got is not None and reason in got


def test_exists_toleration_without_key_tolerates_everything():
    res = trainer_resources(job_spec(), ComputeSpec(tolerations=[{"operator": "Exists"}]))
    assert node_fits(res, node("c", taints=[DEDICATED, GPU_TAINT])) is None


def test_find_fitting_node_picks_a_fitting_one():
    nodes = [node("cpu-node"), node("gpu-node-2", gpus=2, labels=A100)]
    assert find_fitting_node(TWO_A100, nodes, pod="the trainer pod") == (
        True,
        "node gpu-node-2 can hold the trainer pod",
    )


def test_find_fitting_node_explains_best_candidates_first():
    nodes = [
        node("cpu-node"),
        node("gpu-node-1", gpus=1, labels=A100),
        node("gpu-node-3", gpus=2, labels=A100, cordoned=True, taints=[DEDICATED]),
    ]
    ok, reason = find_fitting_node(TWO_A100, nodes, pod="the trainer pod of party hospital-a")
    assert not ok
    assert reason.startswith("no node can hold the trainer pod of party hospital-a: 3 nodes checked; ")
    assert reason.index("gpu-node-1: 1 nvidia.com/gpu allocatable, 2 needed") < reason.index("cpu-node: 0 nvidia")
    assert "cpu-node: 0 nvidia.com/gpu allocatable, 2 needed and missing label nvidia.com/gpu.product=A100" in reason
    assert "gpu-node-3: cordoned (spec.unschedulable) and taint dedicated=ml:NoExecute not tolerated" in reason


def test_find_fitting_node_bounds_the_message():
    ok, reason = find_fitting_node(TWO_A100, [node(f"n{i}") for i in range(8)], show=3)
    assert not ok and "8 nodes checked" in reason and reason.endswith("; and 5 more") and "n3:" not in reason
    assert find_fitting_node(TWO_A100, []) == (False, "no node can hold the pod: 0 nodes checked")
