"""The real kopf operator against the Kubernetes emulator (kmock), with pods run as local processes
against a real SeaweedFS: create -> pods -> rounds -> Succeeded, restart, failures, bad input."""

from __future__ import annotations

import base64
import uuid

import fedtune.k8s.operator as operator_module
import pytest
from fedtune.k8s.settings import OperatorSettings
from kube import KubeEmulator, kube_fixture  # noqa: F401  (the `kube` fixture)
from pod_executor import PodExecutor
from tiny_models import make_tiny_model
from toy_data import toy_jsonl

HUB = "hub"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "bert", "sequence-classification")


@pytest.fixture(autouse=True)
def fast_operator(monkeypatch):
    monkeypatch.setattr(
        operator_module,
        "SETTINGS",
        OperatorSettings(resync_seconds=0.5, metrics_port=0, pod_backoff_seconds=0.5, max_pod_restarts=3),
    )


def _secret(ns: str, name: str, creds) -> dict:
    enc = lambda v: base64.b64encode(v.encode()).decode()  # noqa: E731
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": ns},
        "data": {"accessKeyId": enc(creds.access_key_id), "secretAccessKey": enc(creds.secret_access_key)},
    }


def make_world(
    kube: KubeEmulator,
    s3world,
    model,
    parties=("alice", "bob"),
    consent=(HUB,),
    gpus=0,
    node_gpus=0,
    s3_model=False,
    evaluator: str | None = None,
    **job,
):
    """Namespaces, a node (with `node_gpus` GPUs), credentials, data in each party's bucket, Parties and a FederatedJob.

    `s3_model`: the model files go to the coordinator bucket and the job names them by s3:// URI.
    `evaluator`: one more Party, named as the job's spec.evaluator (its eval split is the held-out set).
    """
    prefix = f"op-{uuid.uuid4().hex[:8]}"
    source = f"file://{model}"
    if s3_model:
        for f in model.rglob("*"):
            if f.is_file():
                s3world.bucket("hub").put_bytes(f"{prefix}/model/{f.relative_to(model)}", f.read_bytes())
        source = f"s3://hub-bkt/{prefix}/model"
    kube.create(
        {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": "cpu-1"},
            "status": {"allocatable": {"cpu": "16", "memory": "64Gi", "pods": "110", "nvidia.com/gpu": str(node_gpus)}},
        }
    )
    kube.create(_secret(HUB, "hub-s3", s3world.creds("hub")))
    for i, name in enumerate(parties + ((evaluator,) if evaluator else ())):
        ns = f"org-{name}"
        s3world.bucket(name).put_bytes(f"{prefix}/train.jsonl", toy_jsonl(48, seed=i))
        s3world.bucket(name).put_bytes(f"{prefix}/eval.jsonl", toy_jsonl(16, seed=100 + i))
        kube.create(_secret(ns, "s3", s3world.creds(name)))
        kube.create(
            {
                "apiVersion": "fedtune.io/v1alpha1",
                "kind": "Party",
                "metadata": {"name": name, "namespace": ns},
                "spec": {
                    "storage": {
                        "endpoint": s3world.endpoint,
                        "bucket": f"{name}-bkt",
                        "credentialsSecret": {"name": "s3"},
                    },
                    "data": {"trainKey": f"{prefix}/train.jsonl", "evalKey": f"{prefix}/eval.jsonl"},
                    "compute": {"cpu": "1", "memory": "1Gi", "gpusPerPod": gpus},
                    "consent": {"allowedNamespaces": list(consent)},
                },
            }
        )
    spec = {
        "model": {"source": source, "task": "sequence-classification"},
        "peft": {"method": "lora", "config": {"r": 4, "target_modules": ["query", "value"]}},
        "data": {"labels": ["negative", "positive"], "maxLength": 16},
        "training": {"localEpochs": 1, "batchSize": 8, "learningRate": 0.01},
        "storage": {"endpoint": s3world.endpoint, "bucket": "hub-bkt", "credentialsSecret": {"name": "hub-s3"}},
        "rounds": 2,
        "minParties": len(parties),
        "roundTimeoutSeconds": 120,
        "parties": [{"name": p, "namespace": f"org-{p}"} for p in parties],
    }
    if evaluator:
        spec["evaluator"] = {"name": evaluator, "namespace": f"org-{evaluator}"}
    spec.update(job)
    return kube.create(
        {
            "apiVersion": "fedtune.io/v1alpha1",
            "kind": "FederatedJob",
            "metadata": {"name": "fj1", "namespace": HUB},
            "spec": spec,
        }
    )


def status(kube):
    return (kube.get("fj", HUB, "fj1") or {}).get("status") or {}


def condition(kube, ctype):
    return next((c for c in status(kube).get("conditions", []) if c["type"] == ctype), None)


def children(kube):
    out = []
    for res in (
        "pods",
        "secrets",
        "serviceaccounts",
        "rbac.authorization.k8s.io/v1/roles",
        "rbac.authorization.k8s.io/v1/rolebindings",
    ):
        out += [o for o in kube.list(res, labels="fedtune.io/job=fj1")]
    return out


def test_job_runs_to_success_and_deletion_cleans_every_namespace(kube, s3world, tiny_model, tmp_path):
    with PodExecutor(kube, tmp_path / "pods") as pods, kube.run_kopf("fedtune.k8s.operator"):
        job = make_world(kube, s3world, tiny_model)
        kube.wait_for(lambda: status(kube).get("phase") in ("Succeeded", "Failed"), timeout=240, what="the job to end")
        st = status(kube)
        assert st["phase"] == "Succeeded", st
        assert [h["round"] for h in st["history"]] == [0, 1, 2]
        assert st["history"][1]["participants"] == ["org-alice/alice", "org-bob/bob"]
        assert st["finalAdapter"] == f"s3://hub-bkt/fedtune/{job['metadata']['uid']}/final/"
        final = s3world.bucket("hub").get_bytes(f"fedtune/{job['metadata']['uid']}/final/adapter_model.safetensors")
        assert len(final) > 1000
        assert condition(kube, "Ready")["status"] == "True" and st["lastMetric"].startswith("acc=")
        assert {p.split("/")[0] for p in pods.started} == {"org-alice", "org-bob", HUB}
        assert kube.get("parties", "org-alice", "alice")["status"]["phase"] == "Ready"
        agg = [
            p for p in kube.list("pods", HUB) if p["metadata"]["labels"]["app.kubernetes.io/component"] == "aggregator"
        ]
        assert agg[0]["metadata"]["ownerReferences"][0]["uid"] == job["metadata"]["uid"]
        reasons = {e.get("reason") for e in kube.list("events", HUB)}
        assert {"RoundStarted", "RoundCompleted", "Succeeded"} <= reasons
        assert {o["metadata"]["namespace"] for o in children(kube)} == {"org-alice", "org-bob", HUB}
        kube.delete("fj", HUB, "fj1")
        kube.wait_for(
            lambda: kube.get("fj", HUB, "fj1") is None and not children(kube),
            timeout=30,
            what="the job and its children in every namespace to be deleted",
        )


def test_operator_restart_mid_job_loses_and_repeats_no_round(kube, s3world, tiny_model, tmp_path):
    with PodExecutor(kube, tmp_path / "pods"):
        with kube.run_kopf("fedtune.k8s.operator"):
            job = make_world(kube, s3world, tiny_model, rounds=3)
            kube.wait_for(lambda: status(kube).get("currentRound", 0) >= 2, timeout=180, what="round 2")
        before = status(kube)["currentRound"]
        with kube.run_kopf("fedtune.k8s.operator"):
            kube.wait_for(lambda: status(kube).get("phase") in ("Succeeded", "Failed"), timeout=240, what="the end")
    st = status(kube)
    assert st["phase"] == "Succeeded" and before >= 2
    assert [h["round"] for h in st["history"]] == [0, 1, 2, 3]
    log = (tmp_path / "pods").glob("hub--*aggregator*.log")
    text = "".join(p.read_text() for p in log)
    for rnd in (1, 2, 3):  # each round aggregated exactly once across the restart
        assert text.count(f"round {rnd}: aggregated") == 1, text
    uid = job["metadata"]["uid"]
    assert s3world.bucket("hub").exists(f"fedtune/{uid}/global/3.safetensors")


def test_failed_trainer_pod_is_recreated_and_resumes(kube, s3world, tiny_model, tmp_path):
    # The model comes from s3:// (presigned URLs per file): the recreated pod downloads it again.
    with PodExecutor(kube, tmp_path / "pods") as pods, kube.run_kopf("fedtune.k8s.operator"):
        make_world(kube, s3world, tiny_model, s3_model=True)
        kube.wait_for(lambda: status(kube).get("stage") == "training", timeout=120, what="round 1 training")
        alice = next(p for p in kube.list("pods", "org-alice"))
        pods.kill("org-alice", alice["metadata"]["name"])
        kube.wait_for(lambda: status(kube).get("phase") in ("Succeeded", "Failed"), timeout=240, what="the end")
        st = status(kube)
    assert st["phase"] == "Succeeded", st
    assert next(p for p in st["parties"] if p["name"] == "org-alice/alice")["podRestarts"] == 1
    assert sum(1 for p in pods.started if p.startswith("org-alice/")) == 2
    assert "PodFailed" in {e.get("reason") for e in kube.list("events", HUB)}


def test_invalid_spec_gets_a_condition_not_a_crash_loop(kube, s3world, tiny_model, tmp_path):
    with kube.run_kopf("fedtune.k8s.operator"):
        make_world(kube, s3world, tiny_model, minParties=5)
        kube.wait_for(lambda: condition(kube, "InvalidSpec"), timeout=30, what="InvalidSpec")
        import time

        time.sleep(2)  # a crash loop would keep retrying and posting
        cond = condition(kube, "InvalidSpec")
        assert cond["status"] == "True" and "minParties (5) is larger than the number of parties (2)" in cond["message"]
        assert status(kube)["phase"] == "Failed" and condition(kube, "Stalled")["status"] == "True"
        assert not kube.list("pods")
        assert sum(e.get("reason") == "InvalidSpec" for e in kube.list("events", HUB)) == 1
        # the spec is corrected (GitOps: a new commit): the job starts over and runs
        kube.patch("fj", HUB, "fj1", {"spec": {"minParties": 2}})
        kube.wait_for(lambda: status(kube).get("phase") == "Running", timeout=30, what="Running after the fix")
        assert condition(kube, "InvalidSpec") is None
        kube.wait_for(lambda: len(kube.list("pods")) == 3, timeout=30, what="pods after the fix")


def test_party_without_consent_blocks_the_job_with_a_clear_condition(kube, s3world, tiny_model, tmp_path):
    with kube.run_kopf("fedtune.k8s.operator"):
        make_world(kube, s3world, tiny_model, consent=())
        kube.wait_for(lambda: condition(kube, "PartiesReady"), timeout=30, what="PartiesReady")
        c = condition(kube, "PartiesReady")
        assert c["status"] == "False" and c["reason"] == "ConsentDenied"
        assert "does not consent to jobs from namespace hub" in c["message"]
        assert not kube.list("pods")
        kube.patch("parties", "org-alice", "alice", {"spec": {"consent": {"allowedNamespaces": [HUB]}}})
        kube.patch("parties", "org-bob", "bob", {"spec": {"consent": {"allowedNamespaces": [HUB]}}})
        kube.wait_for(lambda: len(kube.list("pods")) == 3, timeout=30, what="pods once consent is given")


def test_no_node_fits_sets_unschedulable_instead_of_pending_pods(kube, s3world, tiny_model, tmp_path):
    with kube.run_kopf("fedtune.k8s.operator"):
        make_world(kube, s3world, tiny_model, gpus=2)
        kube.wait_for(lambda: condition(kube, "Unschedulable"), timeout=30, what="Unschedulable")
        c = condition(kube, "Unschedulable")
        assert c["status"] == "True" and "nvidia.com/gpu" in c["message"] and "cpu-1" in c["message"]
        assert not kube.list("pods")


def test_spec_changes_allowed_and_refused_while_running(kube, s3world, tiny_model, tmp_path):
    with PodExecutor(kube, tmp_path / "pods"), kube.run_kopf("fedtune.k8s.operator"):
        make_world(kube, s3world, tiny_model, rounds=2)
        kube.wait_for(lambda: status(kube).get("phase") == "Running", timeout=60, what="Running")
        kube.patch("fj", HUB, "fj1", {"spec": {"peft": {"config": {"r": 16}}}})
        kube.wait_for(
            lambda: (condition(kube, "SpecChangeRejected") or {}).get("status") == "True",
            timeout=30,
            what="SpecChangeRejected",
        )
        assert "peft.config.r cannot change while the job runs" in condition(kube, "SpecChangeRejected")["message"]
        kube.patch("fj", HUB, "fj1", {"spec": {"peft": {"config": {"r": 4}}, "rounds": 3}})
        kube.wait_for(lambda: status(kube).get("phase") in ("Succeeded", "Failed"), timeout=240, what="the end")
        st = status(kube)
    assert st["phase"] == "Succeeded" and [h["round"] for h in st["history"]] == [0, 1, 2, 3]
    assert condition(kube, "SpecChangeRejected")["status"] == "False"


def test_party_with_wrong_credentials_reports_storage_error(kube, s3world, tiny_model, tmp_path):
    from fedtune.storage.s3 import S3Credentials

    with kube.run_kopf("fedtune.k8s.operator"):
        make_world(kube, s3world, tiny_model)
        kube.wait_for(
            lambda: (kube.get("parties", "org-alice", "alice").get("status") or {}).get("phase") == "Ready",
            timeout=30,
            what="alice Ready",
        )
        wrong = S3Credentials(s3world.creds("bob").access_key_id, "not-the-secret-key-0123456789abcdefghijkl")
        kube.create(_secret("org-carol", "s3", wrong))
        kube.create(
            {
                "apiVersion": "fedtune.io/v1alpha1",
                "kind": "Party",
                "metadata": {"name": "carol", "namespace": "org-carol"},
                "spec": {
                    "storage": {
                        "endpoint": s3world.endpoint,
                        "bucket": "carol-bkt",
                        "credentialsSecret": {"name": "s3"},
                    }
                },
            }
        )
        kube.wait_for(
            lambda: (kube.get("parties", "org-carol", "carol").get("status") or {}).get("phase") == "Error",
            timeout=30,
            what="carol Error",
        )
        conds = {c["type"]: c for c in kube.get("parties", "org-carol", "carol")["status"]["conditions"]}
        assert conds["StorageReady"]["status"] == "False"
        assert (
            "carol-bkt" in conds["StorageReady"]["message"] and "secret access key" in conds["StorageReady"]["message"]
        )
        assert "not-the-secret" not in conds["StorageReady"]["message"]  # never echo a secret


def test_an_evaluator_party_scores_every_global_adapter_on_its_held_out_set(kube, s3world, tiny_model, tmp_path):
    with PodExecutor(kube, tmp_path / "pods") as pods, kube.run_kopf("fedtune.k8s.operator"):
        make_world(kube, s3world, tiny_model, evaluator="carol")
        kube.wait_for(lambda: status(kube).get("phase") in ("Succeeded", "Failed"), timeout=240, what="the job to end")
        st = status(kube)
        assert st["phase"] == "Succeeded", st
        assert [h.get("heldOutSamples") for h in st["history"]] == [16, 16, 16]
        assert all(h["participants"] == ["org-alice/alice", "org-bob/bob"] for h in st["history"][1:])
        referee = next(p for p in st["parties"] if p["name"] == "org-carol/carol")
        assert referee["role"] == "evaluator" and referee.get("numSamples") is None
        assert "org-carol" in {p.split("/")[0] for p in pods.started}
        assert "HeldOutEvaluated" in {e.get("reason") for e in kube.list("events", HUB)}
        kube.delete("fj", HUB, "fj1")
        kube.wait_for(
            lambda: kube.get("fj", HUB, "fj1") is None and not children(kube),
            timeout=30,
            what="the job's children, the evaluator's namespace included, to be deleted",
        )


def test_a_two_gpu_party_runs_its_pod_command_as_two_ranks(kube, s3world, tiny_model, tmp_path):
    # The pod executor runs the container command as it is: torchrun starts two ranks, which train
    # on the CPU with gloo (no GPU here) exactly as they would on the node's two GPUs.
    with PodExecutor(kube, tmp_path / "pods"), kube.run_kopf("fedtune.k8s.operator"):
        make_world(kube, s3world, tiny_model, parties=("alice",), gpus=2, node_gpus=2, rounds=1, minParties=1)
        kube.wait_for(lambda: status(kube).get("phase") in ("Succeeded", "Failed"), timeout=240, what="the job to end")
        st = status(kube)
        (pod,) = kube.list("pods", "org-alice")
    assert st["phase"] == "Succeeded", st
    command = pod["spec"]["containers"][0]["command"]
    assert command[:3] == ["python", "-m", "torch.distributed.run"] and "--nproc-per-node=2" in command
    log = "".join(p.read_text() for p in (tmp_path / "pods").glob("org-alice--*.log"))
    assert "alice/rank0 INFO rank 0 of 2" in log and "alice/rank1 INFO rank 1 of 2" in log
    assert "alice/rank1 INFO [org-alice/alice] rank 1: ticket train-r1-a0 from rank 0" in log
    assert "rank 1: exit ticket: stopping" in log
