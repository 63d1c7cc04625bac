"""The CRDs in crds/ are generated from the API models, structural, and accept what users write.

Pure tests: no API server. Structural rules are checked by a small validator below (the subset of
apiextensions.k8s.io/v1 rules the generator could break), the CRD objects themselves against the
Kubernetes OpenAPI schemas shipped in kubernetes-validate, and documents with jsonschema.
"""

from __future__ import annotations

import copy
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from fedtune.api.job import FederatedJob
from fedtune.api.party import Party, PartyStatus
from fedtune.api.status import Condition, FederatedJobStatus, Metrics, PartyState, RoundRecord
from fedtune.cli import main
from fedtune.k8s.crd import RESOURCES, CrdError, all_crds, build_crd, rendered_crds, structural_schema
from pydantic import BaseModel, Field

ROOT = Path(__file__).resolve().parents[1]
CRD_DIR = ROOT / "crds"
EXAMPLES = sorted((ROOT / "examples").rglob("*.yaml"))
LOCAL_ONLY_KINDS = {"Dataset"}  # read by `fedtune run` only; never applied to a cluster
# Kinds of other projects' APIs beside the examples (Argo CD, Flux): no offline schema; tests/test_gitops.py
# checks those documents.
OTHER_APIS = ("argoproj.io/", "source.toolkit.fluxcd.io/", "kustomize.toolkit.fluxcd.io/")

# JSONSchemaProps keys a structural schema may use here. Kubernetes also allows allOf/anyOf/oneOf/not
# under extra rules; the generator never needs them, so any of them is a bug.
ALLOWED_KEYS = {
    "description", "type", "format", "enum", "default", "nullable", "pattern", "minimum", "maximum",
    "exclusiveMinimum", "exclusiveMaximum", "minLength", "maxLength", "minItems", "maxItems", "multipleOf",
    "properties", "required", "items", "additionalProperties",
    "x-kubernetes-preserve-unknown-fields", "x-kubernetes-int-or-string",
}  # fmt: skip
TYPES = {"object", "array", "string", "integer", "number", "boolean"}


def openapi_schema(kind: str) -> dict[str, Any]:
    return build_crd(kind)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def as_jsonschema(node: dict[str, Any]) -> dict[str, Any]:
    """OpenAPI v3 (Kubernetes dialect) -> draft-4 JSON schema, validating as the API server would.

    Objects with properties refuse unknown fields, as `kubectl apply` does under its default strict
    field validation (the server alone would prune them silently).
    """
    out = {k: v for k, v in node.items() if not k.startswith("x-kubernetes-") and k != "nullable"}
    if node.get("nullable"):
        out["type"] = [node["type"], "null"]
        if "enum" in out:
            out["enum"] = [*out["enum"], None]
    if "properties" in node:
        out["properties"] = {k: as_jsonschema(v) for k, v in node["properties"].items()}
        if not node.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    if isinstance(node.get("additionalProperties"), dict):
        out["additionalProperties"] = as_jsonschema(node["additionalProperties"])
    if "items" in node:
        out["items"] = as_jsonschema(node["items"])
    return out


def schema_errors(kind: str, doc: dict[str, Any]) -> list[str]:
    validator = jsonschema.Draft4Validator(as_jsonschema(openapi_schema(kind)))
    return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in validator.iter_errors(doc)]


def structural_errors(node: dict[str, Any], path: str) -> list[str]:
    """Violations of the structural-schema rules (and of 'every property is documented') under `node`."""
    errors = [f"{path}: {k} is not allowed" for k in sorted(set(node) - ALLOWED_KEYS)]
    free = node.get("x-kubernetes-preserve-unknown-fields") or node.get("x-kubernetes-int-or-string")
    if node.get("type") not in TYPES and not (free and "type" not in node):
        errors.append(f"{path}: needs a type, got {node.get('type')!r}")
    if "x-kubernetes-preserve-unknown-fields" in node and node["x-kubernetes-preserve-unknown-fields"] is not True:
        errors.append(f"{path}: x-kubernetes-preserve-unknown-fields may only be true")
    errors += [f"{path}: {k} must be a boolean" for k in ("nullable", "exclusiveMinimum", "exclusiveMaximum")
               if k in node and not isinstance(node[k], bool)]  # fmt: skip
    extra = node.get("additionalProperties")
    if extra is not None and not isinstance(extra, dict):
        errors.append(f"{path}: additionalProperties must be a schema (false is forbidden), got {extra!r}")
    if extra is not None and "properties" in node:
        errors.append(f"{path}: properties and additionalProperties are mutually exclusive")
    if "default" in node and not errors:  # a default is checked against a node that is itself sound
        errors += [f"{path}: default: {e}" for e in _default_errors(node)]
    props = node.get("properties", {})
    errors += [f"{path}: required {r!r} is not a property" for r in node.get("required", []) if r not in props]
    for name, child in props.items():
        if not str(child.get("description", "")).strip():
            errors.append(f"{path}.{name}: has no description")
        errors += structural_errors(child, f"{path}.{name}")
    if "items" in node:
        errors += structural_errors(node["items"], f"{path}[]")
    if isinstance(extra, dict):
        errors += structural_errors(extra, f"{path}.*")
    return errors


def _default_errors(node: dict[str, Any]) -> list[str]:
    schema = as_jsonschema({k: v for k, v in node.items() if k != "default"})
    return [e.message for e in jsonschema.Draft4Validator(schema).iter_errors(node["default"])]


def example_documents() -> list[Any]:
    params = []
    for path in EXAMPLES:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                params.append(pytest.param(doc, id=f"{path.name}:{doc.get('kind')}/{doc['metadata']['name']}"))
    return params


# -- (a) the committed YAML is what the models generate ------------------------------------------


def test_committed_crds_match_models():
    expected = rendered_crds()
    committed = {p.name: p.read_text(encoding="utf-8") for p in CRD_DIR.glob("*.yaml")}
    stale = sorted(n for n in expected.keys() | committed.keys() if expected.get(n) != committed.get(n))
    assert not stale, f"crds/{', crds/'.join(stale)} out of date with the API models: run `fedtune crds` and commit"


def test_cli_check_reports_a_stale_file(tmp_path, capsys):
    assert main(["crds", "--output-dir", str(tmp_path)]) == 0
    assert main(["crds", "--output-dir", str(tmp_path), "--check"]) == 0
    target = tmp_path / "fedtune.io_parties.yaml"
    target.write_text(target.read_text().replace("shortNames", "shortNamez"))
    assert main(["crds", "--output-dir", str(tmp_path), "--check"]) == 1
    out, err = capsys.readouterr()
    assert "-    shortNamez:" in out and "run `fedtune crds" in err


# -- (b) structural, documented, consistent ------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(RESOURCES))
def test_schema_is_structural_and_documented(kind):
    root = openapi_schema(kind)
    assert root["properties"]["metadata"] == {"type": "object"}
    assert root["required"] == ["spec"]
    root = copy.deepcopy(root)
    del root["properties"]["metadata"]  # the one property that may (must) go undocumented
    assert structural_errors(root, kind) == []


@pytest.mark.parametrize(
    "mutation, error",
    [
        ({"additionalProperties": False}, "false is forbidden"),
        ({"anyOf": [{"type": "string"}, {"type": "null"}]}, "anyOf is not allowed"),
        ({"$ref": "#/$defs/X"}, "$ref is not allowed"),
        ({"type": None}, "needs a type"),
        ({"description": ""}, "has no description"),
        ({"default": "many"}, "default: 'many' is not of type 'integer'"),
    ],
)
def test_structural_validator_is_not_vacuous(mutation, error):
    root = copy.deepcopy(openapi_schema("FederatedJob"))
    root["properties"]["spec"]["properties"]["rounds"].update(mutation)
    assert any(error in e for e in structural_errors(root["properties"]["spec"], "spec")), mutation


@pytest.mark.parametrize("kind", sorted(RESOURCES))
def test_crd_object_is_valid_kubernetes(kind):
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    crd = build_crd(kind)
    # strict: an unknown or misspelt key anywhere in the CRD (names, versions, JSONSchemaProps) fails
    kubernetes_validate.validate(crd, kubernetes_validate.latest_version(), strict=True)
    version = crd["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}} and crd["spec"]["scope"] == "Namespaced"
    assert crd["spec"]["names"]["categories"] == ["fedtune"]


@pytest.mark.parametrize("kind", sorted(RESOURCES))
def test_printer_columns_point_at_fields_of_their_type(kind):
    root = openapi_schema(kind)
    for col in build_crd(kind)["spec"]["versions"][0]["additionalPrinterColumns"]:
        if col["jsonPath"] == ".metadata.creationTimestamp":
            assert col["type"] == "date"
            continue
        node = root
        for part in col["jsonPath"].lstrip(".").split("."):
            node = node["properties"][part]
        assert node["type"] == col["type"], col


def test_every_model_field_has_a_description():
    """`kubectl explain` shows what the models say: a field needs description= or a documented model type."""
    missing = []
    for model in (FederatedJob, Party):
        defs = model.model_json_schema(by_alias=True)["$defs"]
        for def_name, schema in defs.items():
            if def_name == "ObjectMeta":  # replaced by the API server's own metadata schema
                continue
            for field, prop in schema.get("properties", {}).items():
                refs = [prop.get("$ref")] + [v.get("$ref") for v in prop.get("anyOf", [])]
                documented = [defs[r.rsplit("/", 1)[-1]].get("description") for r in refs if r]
                if not prop.get("description") and not any(documented):
                    missing.append(f"{def_name}.{field}")
    assert not missing, f"add description= to {', '.join(sorted(set(missing)))} in fedtune/api"


def test_generator_refuses_what_kubernetes_cannot_express():
    class Union(BaseModel):
        value: int | str

    class UniqueItems(BaseModel):
        tags: set[str]

    with pytest.raises(CrdError, match="union of 2 types"):
        structural_schema(Union)
    with pytest.raises(CrdError, match="uniqueItems"):
        structural_schema(UniqueItems)


def test_generator_humanises_missing_descriptions_and_keeps_scalar_defaults_only():
    class Toy(BaseModel):
        train_batch_size: int = Field(8, alias="trainBatchSize")
        labels: list[str] = Field(default_factory=lambda: ["a"], description="Labels.")
        note: str | None = None

    props = structural_schema(Toy)["properties"]
    assert props["trainBatchSize"] == {"description": "Train batch size.", "type": "integer", "default": 8}
    assert "default" not in props["labels"]
    assert props["note"] == {"description": "Note.", "type": "string", "nullable": True}


# -- (c) documents: examples and the operator's own status are accepted, mistakes are not ---------


@pytest.mark.parametrize("doc", example_documents())
def test_example_documents_validate(doc):
    if doc["kind"] in LOCAL_ONLY_KINDS:
        pytest.skip(f"{doc['kind']} is a local-mode document, not a custom resource")
    if doc["apiVersion"].startswith(OTHER_APIS):
        pytest.skip(f"{doc['apiVersion']} {doc['kind']}: another project's API, checked in tests/test_gitops.py")
    if doc["kind"] not in RESOURCES:  # built-in kinds beside them (a credentials Secret): the real schemas
        kubernetes_validate = pytest.importorskip("kubernetes_validate")
        kubernetes_validate.validate(doc, "1.30", strict=True)
        return
    assert schema_errors(doc["kind"], doc) == []


def test_status_the_operator_writes_is_kept():
    """A schema that lacked a status field would make the server prune it from every status patch."""
    now = datetime(2025, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)
    docs = {d["kind"]: d for d in yaml.safe_load_all((ROOT / "examples" / "quickstart.yaml").read_text())}
    job = FederatedJob.model_validate(docs["FederatedJob"])
    job.status = FederatedJobStatus(
        observed_generation=1, phase="Running", current_round=2, stage="training", round_started_at=now,
        round_deadline=now, parties_ready="1/2", last_metric="accuracy 0.81",
        conditions=[Condition(type="Running", status="True", reason="RoundStarted", last_transition_time=now)],
        parties=[PartyState(name="default/alice", state="Submitted", num_samples=192, update_sha256="ab",
                            metrics=Metrics(train_loss=0.4, eval_accuracy=0.8), train_seconds=1.5)],
        history=[RoundRecord(round=1, participants=["default/alice"], rejected={"default/bob": "NaN weights"},
                             metrics=Metrics(eval_accuracy=0.81), lora_residual=0.01, finished_at=now)],
    )  # fmt: skip
    assert schema_errors("FederatedJob", job.to_wire()) == []
    # with every default spelt out too, as `model_dump` writes it
    assert schema_errors("FederatedJob", job.model_dump(mode="json", by_alias=True)) == []
    party = Party.model_validate(docs["Party"])
    party.status = PartyStatus(phase="Ready", conditions=[Condition(type="Ready", status="True", reason="Ok")])
    assert schema_errors("Party", party.model_dump(mode="json", by_alias=True)) == []


def _set(doc: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    doc = copy.deepcopy(doc)
    *parents, leaf = path.split(".")
    node = doc
    for p in parents:
        node = node.setdefault(p, {})
    if value is _DELETE:
        del node[leaf]
    else:
        node[leaf] = value
    return doc


_DELETE = object()
_JOB = {"apiVersion": "fedtune.io/v1alpha1", "kind": "FederatedJob", "metadata": {"name": "j"},
        "spec": {"model": {"source": "pkg://m", "task": "causal-lm"}, "parties": [{"name": "a"}]}}  # fmt: skip
_PARTY = {"apiVersion": "fedtune.io/v1alpha1", "kind": "Party", "metadata": {"name": "a"},
          "spec": {"storage": {"bucket": "a-data"}}}  # fmt: skip


BAD_DOCUMENTS = [
    (_JOB, "spec.model.task", "translation", "is not one of"),
    (_JOB, "spec.rounds", "3", "is not of type 'integer'"),
    (_JOB, "spec.parties", [], "should be non-empty"),
    (_JOB, "spec.training.learningRate", 0, "less than or equal to the minimum"),
    (_JOB, "spec.model.source", _DELETE, "'source' is a required property"),
    (_JOB, "spec.roundz", 3, "'roundz' was unexpected"),
    (_JOB, "spec", _DELETE, "'spec' is a required property"),
    (_PARTY, "spec.storage.bucket", "Bad_Bucket", "does not match"),
    (_PARTY, "spec.compute.gpusPerPod", 17, "greater than the maximum"),
    (_PARTY, "spec.compute.nodeSelector", {"zone": 1}, "is not of type 'string'"),
]


@pytest.mark.parametrize(
    "doc, path, value, error", BAD_DOCUMENTS, ids=[f"{d['kind']}:{p}" for d, p, _, _ in BAD_DOCUMENTS]
)
def test_schema_rejects_bad_documents(doc, path, value, error):
    assert schema_errors(doc["kind"], doc) == []  # the base document is valid
    errors = schema_errors(doc["kind"], _set(doc, path, value))
    assert any(error in e for e in errors), errors


def test_all_crds_are_keyed_by_file_name():
    assert sorted(all_crds()) == ["fedtune.io_federatedjobs.yaml", "fedtune.io_parties.yaml"]
    with pytest.raises(ValueError, match="known kinds"):
        build_crd("Dataset")
