"""Bad job files give errors naming the field and the fix; good ones parse."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from fedtune.api.errors import SpecError
from fedtune.cli import main
from fedtune.documents import load_documents, parse_documents

ROOT = Path(__file__).resolve().parent.parent
QUICKSTART = ROOT / "examples" / "quickstart.yaml"


def docs():
    return list(yaml.safe_load_all(QUICKSTART.read_text()))


def with_job(**changes):
    """The quickstart documents with the job's spec changed by dotted paths (value None deletes)."""
    d = copy.deepcopy(docs())
    for path, value in changes.items():
        node = d[0]["spec"]
        *parents, last = path.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        if value is None:
            node.pop(last, None)
        else:
            node[last] = value
    return yaml.safe_dump_all(d)


ZERO3 = {"enabled": True, "zeroStage": 3}
CASES = [
    ({"minParties": 4}, ["spec", "minParties (4) is larger than the number of parties (3)", "lower minParties"]),
    ({"rounds": 0}, ["spec.rounds", "at least 1"]),
    ({"peft.method": "lorax"}, ["unknown PEFT method 'lorax'", "lora"]),
    ({"peft.config": {"r": 8, "bogus_option": 1}}, ["peft rejects this lora config", "bogus_option"]),
    ({"peft.config": {"r": 0}}, ["config.r must be a positive integer"]),
    ({"peft.config": {"task_type": "CAUSAL_LM"}}, ["may not set task_type"]),
    ({"peft.method": "prompt_tuning", "peft.config": {}}, ["num_virtual_tokens"]),
    (
        {"peft.method": "p_tuning", "peft.config": {"num_virtual_tokens": 8}},
        ["p_tuning cannot be federated", "use prompt_tuning"],
    ),
    ({"strategy": {"name": "fedmagic"}}, ["unknown strategy 'fedmagic'", "fedavg"]),
    ({"strategy": {"name": "fedadam", "params": {"beta1": 1.5}}}, ["beta1 must be < 1.0"]),
    ({"strategy": {"name": "fedavg", "params": {"mu": 0.1}}}, ["has no parameter(s) mu", "accepts: none"]),
    ({"strategy": {"name": "fedprox", "params": {"mu": -1}}}, ["mu must be >= 0.0"]),
    (
        {"deepspeed": {"enabled": True, "trainBatchSize": 20}},
        ["deepspeed.trainBatchSize (20) must be a multiple", "16 x 1 = 16"],
    ),
    ({"deepspeed": {"enabled": True, "zeroStage": 2, "offloadParams": True}}, ["offloadParams needs", "zeroStage: 3"]),
    (
        {"peft.method": "prompt_tuning", "peft.config": {"num_virtual_tokens": 8}, "deepspeed": ZERO3},
        ["prompt_tuning with deepspeed.zeroStage 3 is not supported", "use zeroStage <= 2 or lora"],
    ),
    ({"model.quantization": {"bits": 4}, "deepspeed": ZERO3}, ["quantization trains on the plain PyTorch path"]),
    ({"model.quantization": {"bits": 8, "doubleQuant": True}}, ["doubleQuant applies to 4-bit quantisation only"]),
    ({"training.localSteps": 5}, ["either training.localEpochs or training.localSteps"]),
    ({"training.learningRate": 0}, ["spec.training.learningRate", "greater than 0"]),
    ({"data.labels": ["a"]}, ["data.labels must list at least two classes"]),
    ({"data.labels": ["a", "a"]}, ["spec.data.labels", "duplicate label(s) a"]),
    ({"model.source": "ftp://x"}, ["spec.model.source", "unsupported scheme"]),
    ({"model.task": "translation"}, ["spec.model.task"]),
    ({"roundsx": 3}, ["spec.roundsx", "unknown field"]),
    ({"parties": [{"name": "alice"}, {"name": "alice"}]}, ["party default/alice is listed twice"]),
    ({"parties": [{"name": "alice"}, {"name": "dave"}]}, ["names default/dave but no such Party"]),
    # quickstart: 3 parties, minParties 2
    (
        {"aggregator.robust": {"rule": "krum"}},
        ["aggregator.robust: krum with byzantine 1 needs more than 2*1+2 = 4 updates", "may have 2", "at least 5"],
    ),
    (
        {"aggregator.robust": {"rule": "multiKrum", "byzantine": 0, "multiKrumSelect": 4}},
        ["aggregator.robust: multiKrumSelect (4) is more than n - byzantine = 3", "at most 3"],
    ),
    (
        {"aggregator.robust": {"rule": "trimmedMean"}},
        ["aggregator.robust: trimmedMean with trimFraction 0.25 trims nothing of 2 updates", "raise minParties"],
    ),
    (
        {"aggregator.robust": {"rule": "median"}, "aggregator.loraMode": "exact"},
        ["rule median with loraMode exact is not supported", "use loraMode average, or rule krum"],
    ),
    (
        {"aggregator.robust": {"rule": "median", "trimFraction": 0.2}},
        ["spec.aggregator.robust", "trimFraction applies to rule trimmedMean only", "remove it or change the rule"],
    ),
    ({"aggregator.robust": {"rule": "mean", "byzantine": 1}}, ["byzantine applies to rules krum and multiKrum"]),
    ({"aggregator.robust": {"rule": "bulyan"}}, ["spec.aggregator.robust.rule", "'median'"]),
    ({"aggregator.robust": {"normBound": 0}}, ["spec.aggregator.robust.normBound", "greater than 0"]),
    ({"aggregator.robust": {"rule": "trimmedMean", "trimFraction": 0.5}}, ["trimFraction", "less than 0.5"]),
]


@pytest.mark.parametrize("changes,expected", CASES, ids=[",".join(c) for c, _ in CASES])
def test_bad_spec_names_field_and_fix(changes, expected):
    with pytest.raises(SpecError) as err:
        parse_documents(with_job(**changes), "job.yaml")
    text = str(err.value)
    for piece in expected:
        assert piece in text, f"{piece!r} not in:\n{text}"
    assert text.startswith("job.yaml")


def test_bad_party_and_dataset_documents():
    d = docs()
    d[1]["spec"]["storage"]["bucket"] = "Not_A_Bucket"
    d[4]["spec"]["partition"] = {"method": "dirichlet", "alpha": -1}
    with pytest.raises(SpecError) as err:
        parse_documents(yaml.safe_dump_all(d), "job.yaml")
    text = str(err.value)
    assert "document 2 (Party alice)" in text and "spec.storage.bucket" in text
    assert "document 5 (Dataset tweets)" in text and "alpha" in text


@pytest.mark.parametrize(
    "text,expected",
    [
        ("kind: [unclosed", "not valid YAML"),
        ("kind: Pod\nmetadata: {name: x}", "kind 'Pod' is not one of FederatedJob, Party, Dataset"),
        ("", "expected exactly one FederatedJob, found 0"),
    ],
)
def test_not_a_job_file(text, expected):
    with pytest.raises(SpecError, match=expected):
        parse_documents(text, "f.yaml")


def test_quickstart_parses_with_defaults():
    d = load_documents(QUICKSTART)
    spec = d.job.spec
    assert spec.rounds >= 3 and len(d.parties) == 3 and spec.peft.config["r"] == 8
    assert spec.strategy.resolved() == {}
    assert d.dataset.spec.partition.method == "dirichlet"
    assert spec.global_batch(0) == 16


@pytest.mark.parametrize(
    "robust, lora_mode",
    [
        ({"rule": "median", "normBound": 5.0}, "average"),
        ({"rule": "trimmedMean", "trimFraction": 0.34}, "average"),  # floor(0.34 * 3) = 1 per end
        ({"rule": "krum", "byzantine": 0}, "exact"),
        ({"rule": "multiKrum", "byzantine": 0, "multiKrumSelect": 2, "normBound": 1.0}, "exact"),
        ({"normBound": 1.0}, "exact"),
    ],
)
def test_robust_aggregation_parses_where_the_parties_allow_it(robust, lora_mode):
    changes = {"aggregator.robust": robust, "aggregator.loraMode": lora_mode, "minParties": 3}
    spec = parse_documents(with_job(**changes), "job.yaml").job.spec
    assert spec.aggregator.robust.to_wire() == {"rule": "mean", **robust}


def test_global_batch_checks_world_size():
    d = parse_documents(with_job(deepspeed={"enabled": True, "trainBatchSize": 16}), "j")
    assert d.job.spec.global_batch(0) == d.job.spec.global_batch(1) == 16
    with pytest.raises(ValueError, match=r"16 x 1 x 4 = 64"):
        d.job.spec.global_batch(4)
    # Each party of the file is checked as it is read: the quickstart's CPU parties run one rank each.
    with pytest.raises(SpecError, match=r"Party default/alice: deepspeed.trainBatchSize \(32\) .* = 16\)"):
        parse_documents(with_job(deepspeed={"enabled": True, "trainBatchSize": 32}), "j")


def test_cli_validate_reports_errors_without_traceback(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(with_job(minParties=9))
    assert main(["validate", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err and "minParties (9)" in err
    assert main(["validate", str(QUICKSTART)]) == 0
    assert main(["validate", str(tmp_path / "missing.yaml")]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_kubernetes_objects_beside_the_job_are_left_to_kubernetes():
    k8s = QUICKSTART.parent / "k8s"
    text = (k8s / "federatedjob.yaml").read_text() + "\n---\n" + (k8s / "party-hospital-a.yaml").read_text()
    assert "kind: Secret" in text  # the Party's credentials Secret travels in the same file
    d = parse_documents(text, "k8s.yaml", require_parties=False)
    assert list(d.parties) == ["hospital-a/hospital-a"] and d.job.metadata.name
    with pytest.raises(SpecError, match="kind 'Secret' is not one of"):  # only foreign apiVersions are skipped
        parse_documents(text.replace("apiVersion: v1\nkind: Secret", "apiVersion: fedtune.io/v1alpha1\nkind: Secret"))
