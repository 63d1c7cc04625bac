"""Names, labels and manifests of the per-pod objects, built without a cluster."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import pytest
from fedtune.api.job import FederatedJob
from fedtune.api.launch import pod_command
from fedtune.api.party import Party
from fedtune.documents import parse_documents
from fedtune.k8s import names
from fedtune.k8s.builders import (
    CACHE_DIR,
    aggregator_context,
    build_aggregator_pod,
    build_mailbox_role,
    build_mailbox_secret,
    build_pod_objects,
    build_role_binding,
    build_service_account,
    build_ticket_patch,
    build_trainer_pod,
    owner_reference,
    trainer_context,
)

DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
UID = "0b7c1f6e-3d2a-4c55-9a1e-7f00c0ffee00"
ZERO3_EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "k8s" / "multi-gpu-zero3.yaml"


def make_job(name="sentiment", namespace="coord", deepspeed=None, uid=UID) -> FederatedJob:
    return FederatedJob.model_validate(
        {
            "metadata": {"name": name, "namespace": namespace, "uid": uid},
            "spec": {
                "model": {"source": "pkg://tiny/model", "task": "causal-lm"},
                "parties": [{"name": "hospital-a", "namespace": "org-a"}],
                "deepspeed": deepspeed or {},
                "trainerImage": "registry.example/fedtune/trainer:1.2.3",
                "aggregator": {"cpu": "500m", "memory": "2Gi"},
            },
        }
    )


def make_party(compute=None, name="hospital-a", namespace="org-a") -> Party:
    return Party.model_validate(
        {
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"storage": {"bucket": "org-a-bucket"}, "compute": compute or {}},
        }
    )


ML_TOLERATION = {"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}
GPU_PARTY = {"gpusPerPod": 2, "gpuProduct": "A100", "cpu": "8", "memory": "32Gi", "tolerations": [ML_TOLERATION]}
TRAINER = trainer_context(make_job(deepspeed={"enabled": True, "zeroStage": 2}), make_party(GPU_PARTY))
CPU_TRAINER = trainer_context(make_job(), make_party())
AGGREGATOR = aggregator_context(make_job())
CONTEXTS = {"gpu trainer": TRAINER, "cpu trainer": CPU_TRAINER, "aggregator": AGGREGATOR}


# --- names and labels ---------------------------------------------------------------------

LONG = "x" * 63
NAME_CASES = [
    ("short", ("coord", "sentiment", "org-a/hospital-a")),
    ("long everything", (LONG, LONG, f"{LONG}/{'p' * 200}")),
    ("dotted party name", ("coord", "sentiment", "org-a/hospital.a.example")),
    ("uppercase party name", ("coord", "sentiment", "org-a/Hospital_A")),
]


@pytest.mark.parametrize("key", [c[1] for c in NAME_CASES], ids=[c[0] for c in NAME_CASES])
def test_names_are_stable_short_and_dns_safe(key):
    first, again = names.trainer_names(*key), names.trainer_names(*key)
    assert first == again
    for value in (first.pod, first.service_account, first.role, first.role_binding, first.secret):
        assert len(value) <= 63 and DNS_LABEL.match(value), value
    assert first.secret.endswith("-mailbox") and first.namespace == key[2].split("/")[0]
    labels = names.trainer_labels(key[0], key[1], UID, key[2])
    assert all(len(v) <= 63 and LABEL_VALUE.match(v) for v in labels.values()), labels


def test_names_are_readable_when_short():
    n = names.trainer_names("coord", "sentiment", "org-a/hospital-a")
    assert re.fullmatch(r"fedtune-sentiment-hospital-a-[0-9a-f]{8}", n.pod)
    assert n.mailbox_uri == f"k8s://org-a/{n.secret}"
    agg = names.aggregator_names("coord", "sentiment")
    assert (agg.pod, agg.secret, agg.namespace) == (
        "fedtune-sentiment-aggregator",
        "fedtune-sentiment-aggregator-mailbox",
        "coord",
    )
    long_agg = names.aggregator_names("coord", LONG)
    assert len(long_agg.secret) <= 63 and long_agg.secret != names.aggregator_names("coord", LONG[:-1]).secret


COLLISIONS = [
    ("same job name, other coordinator", ("ns-1", "job", "org/p"), ("ns-2", "job", "org/p")),
    ("ambiguous dashes", ("ns", "a-b", "org/c"), ("ns", "a", "org/b-c")),
    ("dot vs dash", ("ns", "job", "org/p.q"), ("ns", "job", "org/p-q")),
    ("differ only past the cut", ("ns", LONG, "org/" + "p" * 100 + "1"), ("ns", LONG, "org/" + "p" * 100 + "2")),
]


@pytest.mark.parametrize("a,b", [c[1:] for c in COLLISIONS], ids=[c[0] for c in COLLISIONS])
def test_distinct_identities_get_distinct_names(a, b):
    assert names.trainer_names(*a).pod != names.trainer_names(*b).pod


def test_labels_select_a_job_and_say_what_each_pod_is():
    labels = names.trainer_labels("coord", "sentiment", UID, "org-a/hospital-a")
    assert labels == {
        "app.kubernetes.io/name": "fedtune",
        "app.kubernetes.io/component": "trainer",
        "app.kubernetes.io/managed-by": "fedtune-operator",
        "fedtune.io/job": "sentiment",
        "fedtune.io/job-namespace": "coord",
        "fedtune.io/job-uid": UID,
        "fedtune.io/party": "hospital-a",
    }
    assert names.job_selector("coord", "sentiment").items() <= labels.items()
    agg = names.aggregator_labels("coord", "sentiment", None)
    assert agg["app.kubernetes.io/component"] == "aggregator" and "fedtune.io/job-uid" not in agg
    with pytest.raises(ValueError, match="namespace/name"):
        names.trainer_names("coord", "sentiment", "hospital-a")


# --- RBAC and mailbox ----------------------------------------------------------------------


@pytest.mark.parametrize("ctx", CONTEXTS.values(), ids=CONTEXTS.keys())
def test_role_grants_only_the_one_mailbox_secret(ctx):
    role = build_mailbox_role(ctx)
    assert role["metadata"]["namespace"] == ctx.names.namespace
    assert role["rules"] == [
        {
            "apiGroups": [""],
            "resources": ["secrets"],
            "resourceNames": [ctx.names.secret],
            "verbs": ["get", "watch", "patch", "update"],
        }
    ]
    binding = build_role_binding(ctx)
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role["metadata"]["name"],
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": ctx.names.service_account, "namespace": ctx.names.namespace}
    ]
    assert build_service_account(ctx)["automountServiceAccountToken"] is False


def test_mailbox_secret_holds_the_ticket_and_never_the_receipt():
    ticket = {"kind": "train", "round": 1, "update_put": "https://s3.example/u?X-Amz-Signature=abc"}
    secret = build_mailbox_secret(TRAINER, ticket)
    assert secret["type"] == "Opaque" and set(secret["data"]) == {"ticket.json"}
    assert json.loads(base64.b64decode(secret["data"]["ticket.json"])) == ticket
    assert "receipt.json" in secret["metadata"]["annotations"]["fedtune.io/mailbox-writers"]
    assert build_mailbox_secret(TRAINER, dict(reversed(ticket.items()))) == secret  # canonical encoding
    assert build_ticket_patch(ticket) == {"data": {"ticket.json": secret["data"]["ticket.json"]}}
    assert "data" not in build_mailbox_secret(TRAINER) and "stringData" not in secret


# --- pods ------------------------------------------------------------------------------------


def container(pod):
    [c] = pod["spec"]["containers"]
    return c


def test_trainer_pod_runs_the_trainer_against_its_mailbox():
    pod = build_trainer_pod(TRAINER)
    spec, c = pod["spec"], container(pod)
    assert pod["metadata"]["namespace"] == "org-a" and pod["metadata"]["labels"] == TRAINER.labels
    assert c["image"] == "registry.example/fedtune/trainer:1.2.3"
    # Two GPUs: one rank per GPU under torchrun, and a rank that dies ends the pod (no restarts in place).
    assert c["command"] == [
        "python",
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
        "--max-restarts=0",
        "-m",
        "fedtune_trainer",
        "party",
        "--mailbox",
        f"k8s://org-a/{TRAINER.names.secret}",
    ]
    assert spec["serviceAccountName"] == TRAINER.names.service_account
    assert spec["automountServiceAccountToken"] is True and spec["restartPolicy"] == "Never"
    assert c["resources"] == TRAINER.resources.container_resources()
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert spec["nodeSelector"] == {"nvidia.com/gpu.product": "A100"}
    assert spec["affinity"] == TRAINER.resources.affinity
    assert ML_TOLERATION in spec["tolerations"]
    env = {e["name"]: e["value"] for e in c["env"]}
    assert (
        env["FEDTUNE_WORLD_SIZE"] == "2" and env["FEDTUNE_CACHE"] == CACHE_DIR and env["FEDTUNE_NAME"] == "hospital-a"
    )


@pytest.mark.parametrize("deepspeed", [{}, {"enabled": True, "zeroStage": 2}], ids=["torch", "deepspeed"])
def test_one_rank_per_gpu_with_or_without_deepspeed(deepspeed):
    for gpus, ranks in ((0, 1), (1, 1), (2, 2), (4, 4)):
        ctx = trainer_context(make_job(deepspeed=deepspeed), make_party({"gpusPerPod": gpus, "cpu": "8"}))
        command = container(build_trainer_pod(ctx))["command"]
        env = {e["name"]: e["value"] for e in container(build_trainer_pod(ctx))["env"]}
        assert ctx.resources.world_size == ranks and env["FEDTUNE_WORLD_SIZE"] == str(ranks)
        assert env["OMP_NUM_THREADS"] == str(8 // ranks), "the pod's CPUs are shared by its ranks"
        if ranks == 1:
            assert command == ["python", "-m", "fedtune_trainer", "party", "--mailbox", ctx.names.mailbox_uri]
        else:
            assert command[:3] == ["python", "-m", "torch.distributed.run"]
            assert f"--nproc-per-node={ranks}" in command and "--max-restarts=0" in command
            assert command[-5:] == ["-m", "fedtune_trainer", "party", "--mailbox", ctx.names.mailbox_uri]


def test_zero3_across_ranks_builds_a_pod_of_ranks():
    job = make_job(deepspeed={"enabled": True, "zeroStage": 3})
    assert trainer_context(job, make_party({"gpusPerPod": 1})).resources.world_size == 1
    assert trainer_context(job, make_party({"gpusPerPod": 2})).resources.world_size == 2


def test_the_zero3_example_runs_its_party_as_four_ranks():
    # examples/k8s/multi-gpu-zero3.yaml: one party with four GPUs per pod, DeepSpeed ZeRO-3 across them.
    docs = parse_documents(ZERO3_EXAMPLE.read_text(), ZERO3_EXAMPLE.name)  # as `fedtune validate` reads it
    job = docs.job.model_copy(update={"metadata": docs.job.metadata.model_copy(update={"uid": UID})})
    ctx = trainer_context(job, docs.parties["bank-north/bank-north"])
    assert job.spec.deepspeed.zero_stage == 3 and ctx.resources.world_size == 4
    assert ctx.resources.global_batch == 32 == job.spec.deepspeed.train_batch_size  # 2 x 4 x 4 GPUs
    c = container(build_trainer_pod(ctx))
    assert c["command"] == pod_command("party", ctx.names.mailbox_uri, world_size=4)
    assert c["command"][:3] == ["python", "-m", "torch.distributed.run"] and "--nproc-per-node=4" in c["command"]
    env = {e["name"]: e["value"] for e in c["env"]}
    assert env["FEDTUNE_WORLD_SIZE"] == "4" and env["FEDTUNE_GLOBAL_BATCH"] == "32"
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "4"


def test_cpu_trainer_pod_has_no_gpu_placement():
    pod = build_trainer_pod(CPU_TRAINER)
    assert "nvidia.com/gpu" not in container(pod)["resources"]["limits"]
    assert not {"nodeSelector", "affinity", "tolerations"} & pod["spec"].keys()
    assert {"name": "DS_ACCELERATOR", "value": "cpu"} in container(pod)["env"]


def test_aggregator_pod_is_modest_and_cpu_only():
    pod = build_aggregator_pod(AGGREGATOR)
    c = container(pod)
    assert pod["metadata"]["namespace"] == "coord" and c["name"] == "aggregator"
    assert c["command"][3:5] == ["aggregator", "--mailbox"]
    assert c["resources"] == {"requests": {"cpu": "500m", "memory": "2Gi"}, "limits": {"memory": "2Gi"}}
    assert "/dev/shm" not in {m["mountPath"] for m in c["volumeMounts"]}


def test_a_context_builds_only_its_own_kind_of_pod():
    with pytest.raises(ValueError, match="aggregator context cannot build the party pod"):
        build_trainer_pod(AGGREGATOR)
    with pytest.raises(ValueError, match="party context cannot build the aggregator pod"):
        build_aggregator_pod(TRAINER)


@pytest.mark.parametrize("ctx", CONTEXTS.values(), ids=CONTEXTS.keys())
def test_pod_security_context_is_complete(ctx):
    pod = build_pod_objects(ctx)[-1]
    assert pod["spec"]["securityContext"] == {
        "runAsNonRoot": True,
        "runAsUser": 1000,
        "runAsGroup": 1000,
        "fsGroup": 1000,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    c = container(pod)
    assert c["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "privileged": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
    }
    # A read-only root needs writable scratch and cache directories.
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert {"/tmp", CACHE_DIR} <= mounts.keys()
    assert all("emptyDir" in volumes[name] for name in mounts.values())
    if ctx.role == "party":
        assert volumes[mounts["/dev/shm"]]["emptyDir"] == {"medium": "Memory", "sizeLimit": ctx.resources.shm_size}


CREDENTIAL_NAME = re.compile(r"KEY|SECRET|TOKEN|PASSW|CREDENTIAL|AWS_|S3_", re.I)
CREDENTIAL_VALUE = re.compile(r"AKIA[0-9A-Z]{12,}|X-Amz-|Signature=|BEGIN .*PRIVATE|^[A-Za-z0-9+/]{32,}={0,2}$")


@pytest.mark.parametrize("ctx", CONTEXTS.values(), ids=CONTEXTS.keys())
def test_no_credentials_reach_the_pod(ctx):
    pod = build_pod_objects(ctx, ticket={"round": 1, "put": "https://s3/x?X-Amz-Signature=s"})[-1]
    c = container(pod)
    assert "envFrom" not in c
    for var in c["env"]:
        assert set(var) == {"name", "value"}, var  # no valueFrom: secretKeyRef
        assert not CREDENTIAL_NAME.search(var["name"]) and not CREDENTIAL_VALUE.search(var["value"]), var
    # The mailbox is read through the API: no Secret or projected volume of any kind.
    assert all(set(v) == {"name", "emptyDir"} for v in pod["spec"]["volumes"])
    assert "X-Amz" not in json.dumps(pod)


def test_pod_objects_come_in_creation_order_in_one_namespace():
    ticket = {"round": 0}
    objs = build_pod_objects(TRAINER, ticket)
    assert [o["kind"] for o in objs] == ["ServiceAccount", "Role", "RoleBinding", "Secret", "Pod"]
    assert {o["metadata"]["namespace"] for o in objs} == {"org-a"}
    assert all(o["metadata"]["labels"] == TRAINER.labels and "ownerReferences" not in o["metadata"] for o in objs)
    assert build_pod_objects(TRAINER, ticket) == objs  # deterministic: re-applies are no-ops


def test_owner_reference():
    job = {"apiVersion": "fedtune.io/v1alpha1", "kind": "FederatedJob", "metadata": {"name": "sentiment", "uid": UID}}
    assert owner_reference(job) == {
        "apiVersion": "fedtune.io/v1alpha1",
        "kind": "FederatedJob",
        "name": "sentiment",
        "uid": UID,
        "controller": True,
        "blockOwnerDeletion": True,
    }
    with pytest.raises(ValueError, match="no metadata.uid"):
        owner_reference({**job, "metadata": {"name": "sentiment"}})


@pytest.mark.parametrize("ctx", CONTEXTS.values(), ids=CONTEXTS.keys())
def test_manifests_validate_against_kubernetes_schemas(ctx):
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    for obj in build_pod_objects(ctx, ticket={"round": 1}):
        # strict: unknown fields (typos) are errors, as with kubectl's --validate=strict
        kubernetes_validate.validate(obj, "1.30.0", strict=True)
