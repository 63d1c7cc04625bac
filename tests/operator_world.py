"""The world of an operator test (helper module, not a test module): a coordinator namespace, one per
party, their Parties, credentials and data in the real SeaweedFS, a node and a FederatedJob, made
through the session's real API server (tests/kube.py); and what the tests read back.

Fixtures (registered in conftest.py): `tiny_model`, a tiny random BERT classifier per test module;
`fast_operator`, the operator's settings made quick (resync and pod backoff 0.5 s, no metrics
server): `pytestmark = pytest.mark.usefixtures("fast_operator")` for a whole module.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

import pytest
from fedtune.k8s.settings import OperatorSettings
from kube import KubeTest, secret_doc
from pod_executor import PodExecutor
from tiny_models import make_tiny_model
from toy_data import toy_jsonl

FAST_SETTINGS = OperatorSettings(resync_seconds=0.5, metrics_port=0, pod_backoff_seconds=0.5, max_pod_restarts=3)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "bert", "sequence-classification")


@pytest.fixture
def fast_operator(monkeypatch):
    import fedtune.k8s.operator as operator_module  # kopf: imported by the tests that run the operator only

    monkeypatch.setattr(operator_module, "SETTINGS", FAST_SETTINGS)


def s3_secret(ns: str, name: str, creds) -> dict:
    return secret_doc(ns, name, {"accessKeyId": creds.access_key_id, "secretAccessKey": creds.secret_access_key})


@dataclass
class World:
    """The namespaces of one test's job: `hub` (the job's), and one per party (`ns("alice")`)."""

    kube: KubeTest
    hub: str
    party_ns: dict[str, str] = field(default_factory=dict)
    job: dict = field(default_factory=dict)

    def ns(self, party: str) -> str:
        if party not in self.party_ns:
            self.party_ns[party] = self.kube.namespace(f"org-{party}")
        return self.party_ns[party]

    def key(self, party: str) -> str:
        """How the job's status names a party: "<namespace>/<name>"."""
        return f"{self.ns(party)}/{party}"


def make_world(
    kube: KubeTest,
    s3world,
    model,
    parties=("alice", "bob"),
    consent: tuple[str, ...] | None = None,
    gpus=0,
    node_gpus=0,
    s3_model=False,
    evaluator: str | None = None,
    model_spec: dict | None = None,
    **job,
) -> World:
    """Namespaces, a node (with `node_gpus` GPUs), credentials, data in each party's bucket, Parties and a FederatedJob.

    `consent`: the namespaces each Party admits jobs from (default: the hub's).
    `s3_model`: the model files go to the coordinator bucket and the job names them by s3:// URI.
    `evaluator`: one more Party, named as the job's spec.evaluator (its eval split is the held-out set).
    `model_spec`: spec.model as written, instead of one naming `model`.
    """
    world = World(kube, kube.namespace("hub"))
    prefix = f"op-{uuid.uuid4().hex[:8]}"
    source = f"file://{model}"
    if s3_model:
        for f in model.rglob("*"):
            if f.is_file():
                s3world.bucket("hub").put_bytes(f"{prefix}/model/{f.relative_to(model)}", f.read_bytes())
        source = f"s3://hub-bkt/{prefix}/model"
    kube.node(f"cpu-{kube.test_id}", gpus=node_gpus)
    kube.create(s3_secret(world.hub, "hub-s3", s3world.creds("hub")))
    for i, name in enumerate(parties + ((evaluator,) if evaluator else ())):
        ns = world.ns(name)
        s3world.bucket(name).put_bytes(f"{prefix}/train.jsonl", toy_jsonl(48, seed=i))
        s3world.bucket(name).put_bytes(f"{prefix}/eval.jsonl", toy_jsonl(16, seed=100 + i))
        kube.create(s3_secret(ns, "s3", s3world.creds(name)))
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
                    "consent": {"allowedNamespaces": list((world.hub,) if consent is None else consent)},
                },
            }
        )
    spec = {
        "model": model_spec or {"source": source, "task": "sequence-classification"},
        "peft": {"method": "lora", "config": {"r": 4, "target_modules": ["query", "value"]}},
        "data": {"labels": ["negative", "positive"], "maxLength": 16},
        "training": {"localEpochs": 1, "batchSize": 8, "learningRate": 0.01},
        "storage": {"endpoint": s3world.endpoint, "bucket": "hub-bkt", "credentialsSecret": {"name": "hub-s3"}},
        "rounds": 2,
        "minParties": len(parties),
        "roundTimeoutSeconds": 120,
        "parties": [{"name": p, "namespace": world.ns(p)} for p in parties],
    }
    if evaluator:
        spec["evaluator"] = {"name": evaluator, "namespace": world.ns(evaluator)}
    spec.update(job)
    world.job = kube.create(
        {
            "apiVersion": "fedtune.io/v1alpha1",
            "kind": "FederatedJob",
            "metadata": {"name": "fj1", "namespace": world.hub},
            "spec": spec,
        }
    )
    return world


def pods_of(kube: KubeTest) -> PodExecutor:
    """A pod executor for this test's namespaces only (other tests' leftovers are not its business)."""
    return PodExecutor(kube, kube.workdir / "pods", namespaces=kube.namespaces)


def status(w: World) -> dict:
    return (w.kube.get("fj", w.hub, "fj1") or {}).get("status") or {}


def condition(w: World, ctype: str) -> dict | None:
    return next((c for c in status(w).get("conditions", []) if c["type"] == ctype), None)


def job_pods(kube: KubeTest, namespaces: tuple[str, ...] | list[str] | None = None) -> list[dict]:
    """The pods in `namespaces` (default: every namespace of the test)."""
    return [p for ns in (kube.namespaces if namespaces is None else namespaces) for p in kube.list("pods", ns)]


def children(w: World) -> list[dict]:
    """Every object the operator made for job fj1, in every namespace of the test."""
    out = []
    for res in (
        "pods",
        "secrets",
        "serviceaccounts",
        "rbac.authorization.k8s.io/v1/roles",
        "rbac.authorization.k8s.io/v1/rolebindings",
    ):
        for ns in w.kube.namespaces:
            out += w.kube.list(res, ns, labels="fedtune.io/job=fj1")
    return out


def ended(w: World) -> bool:
    return status(w).get("phase") in ("Succeeded", "Failed")
