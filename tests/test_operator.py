"""The real kopf operator against a real kube-apiserver (tests/kube.py), as the operator chart's
ServiceAccount, with pods run as local processes (tests/pod_executor.py plays scheduler and kubelet)
against a real SeaweedFS: create -> pods -> rounds -> Succeeded, failures, bad input. (An operator killed
mid-job and a failed trainer pod are faults of the chaos suite: tests/test_chaos_operator.py.)"""

from __future__ import annotations

import base64
import os
import signal
import time

import pytest
from fedtune.k8s.names import trainer_names
from operator_world import children, condition, ended, job_pods, make_world, pods_of, s3_secret, status

pytestmark = pytest.mark.usefixtures("fast_operator")


def test_job_runs_to_success_and_deletion_cleans_every_namespace(kube, s3world, tiny_model):
    with pods_of(kube) as pods, kube.run_kopf("fedtune.k8s.operator"):
        w = make_world(kube, s3world, tiny_model)
        kube.wait_for(lambda: ended(w), timeout=240, what="the job to end")
        st = status(w)
        assert st["phase"] == "Succeeded", st
        assert [h["round"] for h in st["history"]] == [0, 1, 2]
        assert st["history"][1]["participants"] == [w.key("alice"), w.key("bob")]
        assert st["finalAdapter"] == f"s3://hub-bkt/fedtune/{w.job['metadata']['uid']}/final/"
        final = s3world.bucket("hub").get_bytes(f"fedtune/{w.job['metadata']['uid']}/final/adapter_model.safetensors")
        assert len(final) > 1000
        assert condition(w, "Ready")["status"] == "True" and st["lastMetric"].startswith("acc=")
        assert {p.split("/")[0] for p in pods.started} == {w.ns("alice"), w.ns("bob"), w.hub}
        assert kube.get("parties", w.ns("alice"), "alice")["status"]["phase"] == "Ready"
        agg = [
            p
            for p in kube.list("pods", w.hub)
            if p["metadata"]["labels"]["app.kubernetes.io/component"] == "aggregator"
        ]
        assert agg[0]["metadata"]["ownerReferences"][0]["uid"] == w.job["metadata"]["uid"]
        reasons = {e.get("reason") for e in kube.list("events", w.hub)}
        assert {"RoundStarted", "RoundCompleted", "Succeeded"} <= reasons
        assert {o["metadata"]["namespace"] for o in children(w)} == {w.ns("alice"), w.ns("bob"), w.hub}
        assert not pods.errors, pods.errors
        kube.delete("fj", w.hub, "fj1")
        kube.wait_for(
            lambda: kube.get("fj", w.hub, "fj1") is None and not children(w),
            timeout=60,
            what="the job and its children in every namespace to be deleted",
        )


def test_invalid_spec_gets_a_condition_not_a_crash_loop(kube, s3world, tiny_model):
    with kube.run_kopf("fedtune.k8s.operator"):
        w = make_world(kube, s3world, tiny_model, minParties=5)
        kube.wait_for(lambda: condition(w, "InvalidSpec"), timeout=30, what="InvalidSpec")
        time.sleep(2)  # a crash loop would keep retrying and posting
        cond = condition(w, "InvalidSpec")
        assert cond["status"] == "True" and "minParties (5) is larger than the number of parties (2)" in cond["message"]
        assert status(w)["phase"] == "Failed" and condition(w, "Stalled")["status"] == "True"
        assert not job_pods(kube)
        assert sum(e.get("reason") == "InvalidSpec" for e in kube.list("events", w.hub)) == 1
        # the spec is corrected (GitOps: a new commit): the job starts over and runs
        kube.patch("fj", w.hub, "fj1", {"spec": {"minParties": 2}})
        kube.wait_for(lambda: status(w).get("phase") == "Running", timeout=30, what="Running after the fix")
        assert condition(w, "InvalidSpec") is None
        kube.wait_for(lambda: len(job_pods(kube)) == 3, timeout=30, what="pods after the fix")


def test_party_without_consent_blocks_the_job_with_a_clear_condition(kube, s3world, tiny_model):
    with kube.run_kopf("fedtune.k8s.operator"):
        w = make_world(kube, s3world, tiny_model, consent=())
        kube.wait_for(lambda: condition(w, "PartiesReady"), timeout=30, what="PartiesReady")
        c = condition(w, "PartiesReady")
        assert c["status"] == "False" and c["reason"] == "ConsentDenied"
        assert f"does not consent to jobs from namespace {w.hub}" in c["message"]
        assert not job_pods(kube)
        for party in ("alice", "bob"):
            kube.patch("parties", w.ns(party), party, {"spec": {"consent": {"allowedNamespaces": [w.hub]}}})
        kube.wait_for(lambda: len(job_pods(kube)) == 3, timeout=30, what="pods once consent is given")


def test_no_node_fits_sets_unschedulable_instead_of_pending_pods(kube, s3world, tiny_model):
    with kube.run_kopf("fedtune.k8s.operator"):
        w = make_world(kube, s3world, tiny_model, gpus=2)
        kube.wait_for(lambda: condition(w, "Unschedulable"), timeout=30, what="Unschedulable")
        c = condition(w, "Unschedulable")
        assert c["status"] == "True" and "nvidia.com/gpu" in c["message"] and f"cpu-{kube.test_id}" in c["message"]
        assert not job_pods(kube)
        # the parties were fine: a PartiesReady=False from before they were Ready must not linger
        kube.wait_for(lambda: (condition(w, "PartiesReady") or {"status": "True"})["status"] == "True", timeout=10)


def test_spec_changes_allowed_and_refused_while_running(kube, s3world, tiny_model):
    with pods_of(kube), kube.run_kopf("fedtune.k8s.operator"):
        w = make_world(kube, s3world, tiny_model, rounds=2)
        kube.wait_for(lambda: status(w).get("phase") == "Running", timeout=60, what="Running")
        kube.patch("fj", w.hub, "fj1", {"spec": {"peft": {"config": {"r": 16}}}})
        kube.wait_for(
            lambda: (condition(w, "SpecChangeRejected") or {}).get("status") == "True",
            timeout=30,
            what="SpecChangeRejected",
        )
        assert "peft.config.r cannot change while the job runs" in condition(w, "SpecChangeRejected")["message"]
        kube.patch("fj", w.hub, "fj1", {"spec": {"peft": {"config": {"r": 4}}, "rounds": 3}})
        kube.wait_for(lambda: ended(w), timeout=240, what="the end")
        st = status(w)
    assert st["phase"] == "Succeeded" and [h["round"] for h in st["history"]] == [0, 1, 2, 3]
    assert condition(w, "SpecChangeRejected")["status"] == "False"


def test_party_with_wrong_credentials_reports_storage_error(kube, s3world, tiny_model):
    from fedtune.storage.s3 import S3Credentials

    with kube.run_kopf("fedtune.k8s.operator"):
        w = make_world(kube, s3world, tiny_model)
        kube.wait_for(
            lambda: (kube.get("parties", w.ns("alice"), "alice").get("status") or {}).get("phase") == "Ready",
            timeout=30,
            what="alice Ready",
        )
        wrong = S3Credentials(s3world.creds("bob").access_key_id, "not-the-secret-key-0123456789abcdefghijkl")
        carol = w.ns("carol")
        kube.create(s3_secret(carol, "s3", wrong))
        kube.create(
            {
                "apiVersion": "fedtune.io/v1alpha1",
                "kind": "Party",
                "metadata": {"name": "carol", "namespace": carol},
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
            lambda: (kube.get("parties", carol, "carol").get("status") or {}).get("phase") == "Error",
            timeout=30,
            what="carol Error",
        )
        conds = {c["type"]: c for c in kube.get("parties", carol, "carol")["status"]["conditions"]}
        assert conds["StorageReady"]["status"] == "False"
        assert (
            "carol-bkt" in conds["StorageReady"]["message"] and "secret access key" in conds["StorageReady"]["message"]
        )
        assert "not-the-secret" not in conds["StorageReady"]["message"]  # never echo a secret


def test_an_evaluator_party_scores_every_global_adapter_on_its_held_out_set(kube, s3world, tiny_model):
    with pods_of(kube) as pods, kube.run_kopf("fedtune.k8s.operator"):
        w = make_world(kube, s3world, tiny_model, evaluator="carol")
        kube.wait_for(lambda: ended(w), timeout=240, what="the job to end")
        st = status(w)
        assert st["phase"] == "Succeeded", st
        assert [h.get("heldOutSamples") for h in st["history"]] == [16, 16, 16]
        assert all(h["participants"] == [w.key("alice"), w.key("bob")] for h in st["history"][1:])
        referee = next(p for p in st["parties"] if p["name"] == w.key("carol"))
        assert referee["role"] == "evaluator" and referee.get("numSamples") is None
        assert w.ns("carol") in {p.split("/")[0] for p in pods.started}
        assert "HeldOutEvaluated" in {e.get("reason") for e in kube.list("events", w.hub)}
        kube.delete("fj", w.hub, "fj1")
        kube.wait_for(
            lambda: kube.get("fj", w.hub, "fj1") is None and not children(w),
            timeout=60,
            what="the job's children, the evaluator's namespace included, to be deleted",
        )


def test_a_two_gpu_party_runs_its_pod_command_as_two_ranks(kube, s3world, tiny_model):
    # The pod executor runs the container command as it is: torchrun starts two ranks, which train
    # on the CPU with gloo (no GPU here) exactly as they would on the node's two GPUs.
    with pods_of(kube), kube.run_kopf("fedtune.k8s.operator"):
        w = make_world(kube, s3world, tiny_model, parties=("alice",), gpus=2, node_gpus=2, rounds=1, minParties=1)
        kube.wait_for(lambda: ended(w), timeout=240, what="the job to end")
        st = status(w)
        (pod,) = kube.list("pods", w.ns("alice"))
    assert st["phase"] == "Succeeded", st
    command = pod["spec"]["containers"][0]["command"]
    assert command[:3] == ["python", "-m", "torch.distributed.run"] and "--nproc-per-node=2" in command
    log = "".join(p.read_text() for p in (kube.workdir / "pods").glob(f"{w.ns('alice')}--*.log"))
    assert "alice/rank0 INFO rank 0 of 2" in log and "alice/rank1 INFO rank 1 of 2" in log
    assert "alice/rank1 INFO [" in log and "rank 1: ticket train-r1-a0 from rank 0" in log
    assert "rank 1: exit ticket: stopping" in log


def test_garbage_in_a_pod_mailbox_secret_is_an_event_and_the_job_goes_on(kube, s3world, tiny_model):
    with pods_of(kube) as pods, kube.run_kopf("fedtune.k8s.operator"):
        w = make_world(kube, s3world, tiny_model)
        bob = trainer_names(w.hub, "fj1", w.key("bob"))
        kube.wait_for(lambda: f"{bob.namespace}/{bob.pod}" in pods.started, timeout=60, what="bob's pod")
        # Held still before it answers its init ticket, bob writes nothing over the garbage below, and
        # the job waits for it (rounds of the tiny model take a fraction of a second).
        pods.signal(bob.namespace, bob.pod, signal.SIGSTOP)
        try:
            # A pod may patch its own mailbox Secret with anything the API server takes.
            garbage = base64.b64encode(b"\xff\xfe\x00 not a receipt").decode()
            kube.patch("secrets", bob.namespace, bob.secret, {"data": {"receipt.json": garbage}})
            note = f"ignoring the receipt of pod {bob.namespace}/{bob.pod}: not UTF-8 text (byte 0: invalid start byte)"

            def rejections() -> list[dict]:
                return [e for e in kube.list("events", w.hub) if e.get("reason") == "ReceiptRejected"]

            kube.wait_for(rejections, timeout=30, what="a ReceiptRejected event")
            time.sleep(2)  # more reconciles (one each 0.5 s at least) find the same bytes
            assert status(w)["phase"] == "Running"
        finally:
            pods.signal(bob.namespace, bob.pod, signal.SIGCONT)
        # bob takes the garbage for no receipt, answers its ticket and writes its receipt over it
        kube.wait_for(lambda: ended(w), timeout=240, what="the job to end")
        st = status(w)
    assert st["phase"] == "Succeeded", st
    assert [e["message"] for e in rejections()] == [note]


@pytest.mark.chaos
def test_an_s3_endpoint_gone_mid_round_pauses_the_job_and_blames_no_party(kube, s3world, tiny_model):
    server = s3world.server  # the session's SeaweedFS: every bucket of the job is there
    with pods_of(kube) as pods, kube.run_kopf("fedtune.k8s.operator"):
        # maxRoundRetries 0, maxPartyFailures 1: a single retry counted or failure blamed would end the job
        w = make_world(kube, s3world, tiny_model, rounds=6, maxRoundRetries=0, maxPartyFailures=1)
        kube.wait_for(lambda: status(w).get("currentRound", 0) >= 2, timeout=180, what="round 2")
        assert not ended(w)
        os.killpg(server.pid, signal.SIGKILL)
        try:

            def unavailable() -> dict | None:
                c = condition(w, "StorageUnavailable")
                return c if c and c["status"] == "True" else None

            down = kube.wait_for(unavailable, timeout=30, what="StorageUnavailable True")
            assert down["reason"] == "StorageUnreachable" and f"S3 endpoint {s3world.endpoint} (" in down["message"]
            time.sleep(10)  # longer than the pods' transfer retries: they fail on the storage meanwhile
            st = status(w)
            assert st["phase"] == "Running" and condition(w, "Ready")["reason"] == "StorageUnreachable"
            assert all(p["state"] != "Dropped" and p.get("failures", 0) == 0 for p in st["parties"]), st
        finally:
            server.restart()  # on its data directory and ports: the URLs handed out stay valid
        kube.wait_for(lambda: ended(w), timeout=240, what="the job to end")
        st = status(w)
        assert not pods.errors, pods.errors
    assert st["phase"] == "Succeeded", st
    assert [h["round"] for h in st["history"]] == list(range(7))  # no round lost or repeated
    assert all(p["state"] != "Dropped" and p.get("failures", 0) == 0 for p in st["parties"]), st
    back = condition(w, "StorageUnavailable")
    assert (back["status"], back["reason"]) == ("False", "StorageAnswers")
    reasons = [e.get("reason") for e in kube.list("events", w.hub)]
    # One outage, said once each way (a cleared status field stays cleared across passes).
    assert reasons.count("StorageUnavailable") == 1 and reasons.count("StorageAvailable") == 1, reasons
    assert "QuorumLost" not in reasons
    assert "storageUnavailableSince" not in st
    assert "PartyFailed" not in reasons and "PartyDropped" not in reasons


def test_offsite_tuning_parties_train_an_s3_emulator_and_never_the_full_model(kube, s3world, tmp_path):
    """peft.method offsite through the operator: the emulator lies in the coordinator's bucket (s3://) and the
    full model's source exists nowhere the parties could read it, so the job can only succeed if every party
    loads the emulator; final/ holds the last global and what plugging it back needs."""
    import json
    import subprocess
    import sys

    from fedtune.api.job import DataSchema, ModelSpec, PeftSpec, TrainingSpec
    from fedtune.api.protocol import TrainerConfig
    from tiny_models import make_tiny_model

    full = make_tiny_model(tmp_path / "full", "sequence-classification", layers=4)
    offsite = {"method": "offsite", "config": {"adapterLayers": 1, "dropRatio": 0.5}}
    cfg = TrainerConfig(
        model=ModelSpec(source=str(full), task="sequence-classification"),
        peft=PeftSpec(**offsite),
        data=DataSchema(labels=["negative", "positive"], max_length=16),
        training=TrainingSpec(),
        deepspeed={},
    )
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_wire()))
    emulator = tmp_path / "emulator"
    argv = [sys.executable, "-m", "fedtune_trainer", "emulator", "--config", str(tmp_path / "config.json")]
    built = subprocess.run([*argv, "--output", str(emulator)], capture_output=True, text=True, check=False)
    assert built.returncode == 0 and "3 of 4 layers" in built.stdout, built.stderr
    hub = s3world.bucket("hub")
    key = f"emulators/{kube.test_id}"
    for f in emulator.rglob("*"):
        if f.is_file():
            hub.put_bytes(f"{key}/{f.relative_to(emulator)}", f.read_bytes())
    model = {
        "source": f"file://{tmp_path}/owner-only/full-model",  # not on any machine: the owner's, not the parties'
        "emulator": f"s3://hub-bkt/{key}",
        "task": "sequence-classification",
    }
    with pods_of(kube) as pods, kube.run_kopf("fedtune.k8s.operator"):
        w = make_world(kube, s3world, full, peft=offsite, model_spec=model)
        kube.wait_for(lambda: ended(w), timeout=240, what="the job to end")
        st = status(w)
        assert st["phase"] == "Succeeded", st
        assert all(h["metrics"].get("evalAccuracy") is not None for h in st["history"])
        prefix = f"fedtune/{w.job['metadata']['uid']}/"
        names = {k.removeprefix(prefix + "final/") for k in hub.list(prefix + "final/")}
        assert {"offsite.safetensors", "offsite.json"} <= names and "adapter_config.json" not in names
        assert hub.get_bytes(prefix + "final/offsite.safetensors") == hub.get_bytes(prefix + "global/2.safetensors")
        doc = json.loads(hub.get_bytes(prefix + "final/offsite.json"))
        assert doc["model"]["source"] == model["source"] and doc["offsite"] == {"adapterLayers": 1, "dropRatio": 0.5}
        assert not pods.errors, pods.errors


def test_full_fine_tuning_job_ends_with_a_transformers_model_in_final(kube, s3world, tiny_model):
    """peft.method full through the operator: final/ holds the last global as model.safetensors, and the config."""
    import json

    with pods_of(kube) as pods, kube.run_kopf("fedtune.k8s.operator"):
        w = make_world(kube, s3world, tiny_model, peft={"method": "full"})
        kube.wait_for(lambda: ended(w), timeout=240, what="the job to end")
        st = status(w)
        assert st["phase"] == "Succeeded", st
        prefix, hub = f"fedtune/{w.job['metadata']['uid']}/", s3world.bucket("hub")
        names = {k.removeprefix(prefix + "final/") for k in hub.list(prefix + "final/")}
        assert {"model.safetensors", "config.json", "tokenizer.json"} <= names
        assert "adapter_config.json" not in names
        assert hub.get_bytes(prefix + "final/model.safetensors") == hub.get_bytes(prefix + "global/2.safetensors")
        assert json.loads(hub.get_bytes(prefix + "final/config.json"))["id2label"] == {"0": "negative", "1": "positive"}
        assert not pods.errors, pods.errors
