"""Personalised adapters (spec.personalization): the split, its validation, and a local run under label skew."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from fedtune.api.errors import SpecError
from fedtune.api.job import FederatedJobSpec, PersonalizationSpec
from fedtune.local.runner import LocalRun
from fedtune.rounds.intents import COORDINATOR
from fedtune.storage import layout
from fedtune_trainer.personal import merge, personal_names, split
from pydantic import ValidationError
from safetensors.torch import load
from test_local_run import job_yaml, run_local, tiny_seq_cls, toy_data  # noqa: F401 (fixtures)

LORA = [f"base_model.model.bert.encoder.layer.{i}.attention.self.{m}.lora_{ab}.weight" for i in (0, 1)
        for m in ("query", "value") for ab in "AB"]  # fmt: skip
HEAD = ["base_model.model.classifier.weight", "base_model.model.classifier.bias"]
PARTIES = ("alice", "bob", "carol")


def _adapter() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {n: torch.randn(3, 2, generator=g) for n in LORA + HEAD}


def test_split_and_merge_round_trip():
    tensors = _adapter()
    names = personal_names(tensors, PersonalizationSpec(mode="head"))
    assert names == set(HEAD)
    shared, own = split(tensors, names)
    assert set(shared) == set(LORA) and set(own) == set(HEAD)
    back = merge(shared, own)
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], tensors[k]) for k in tensors)
    # a global adapter that carries a personal tensor is refused, never silently overwritten
    with pytest.raises(ValueError, match="personal part"):
        merge(tensors, own)


def test_keep_patterns_are_substrings_or_globs_and_must_work():
    tensors = _adapter()
    keep = PersonalizationSpec(mode="keep", keep=["*layer.1.*.value.lora_*", "classifier.bias"])
    assert personal_names(tensors, keep) == {LORA[6], LORA[7], HEAD[1]}
    with pytest.raises(ValueError, match=r"personalization.keep: pattern 'pooler' matches no adapter tensor"):
        personal_names(tensors, PersonalizationSpec(mode="keep", keep=["classifier", "pooler"]))
    with pytest.raises(ValueError, match="every adapter tensor would be personal"):
        personal_names(tensors, PersonalizationSpec(mode="keep", keep=["base_model"]))
    with pytest.raises(ValueError, match="LoRA pair split"):
        personal_names(tensors, PersonalizationSpec(mode="keep", keep=["lora_A"]))
    with pytest.raises(ValueError, match="personalization.mode head: the adapter holds no classification head"):
        personal_names({n: tensors[n] for n in LORA}, PersonalizationSpec(mode="head"))


def _spec(**extra) -> dict:
    spec = {"model": {"source": "/m", "task": "sequence-classification"}, "data": {"labels": ["a", "b"]},
            "parties": [{"name": "alice"}, {"name": "bob"}]}  # fmt: skip
    spec.update(extra)
    return spec


@pytest.mark.parametrize(
    "extra,field",
    [
        ({"personalization": {"mode": "keep"}}, "personalization.keep"),
        ({"personalization": {"mode": "keep", "keep": [" "]}}, "personalization.keep"),
        ({"personalization": {"keep": ["classifier"]}}, "personalization.keep"),
        (
            {"personalization": {"mode": "head"}, "model": {"source": "/m", "task": "causal-lm"}},
            "personalization.mode: head",
        ),
        ({"personalization": {}, "evaluator": {"name": "eve"}}, "spec.evaluator"),
    ],
)
def test_validation_names_the_field(extra, field):
    with pytest.raises(ValidationError) as info:
        FederatedJobSpec.model_validate(_spec(**extra))
    assert field in str(info.value)


def test_personalization_combines_with_secure_aggregation_and_robust_rules():
    ok = _spec(
        personalization={"mode": "keep", "keep": ["classifier"]},
        privacy={"secureAggregation": {}},
    )
    assert FederatedJobSpec.model_validate(ok).problems() == []
    robust = _spec(personalization={}, aggregator={"robust": {"rule": "median"}})
    assert FederatedJobSpec.model_validate(robust).problems() == []


def _skewed_job(model, data, rounds=3, personalization=None) -> str:
    docs = list(yaml.safe_load_all(job_yaml(model, data, parties=PARTIES, rounds=rounds, samples=80)))
    docs[0]["spec"]["personalization"] = personalization or {"mode": "head"}
    docs[-1]["spec"]["partition"] = {"method": "dirichlet", "alpha": 0.5}  # strong label skew
    return yaml.safe_dump_all(docs)


@pytest.fixture(scope="module")
def personal_run(tiny_seq_cls, toy_data, tmp_path_factory):  # noqa: F811
    """A 3-party run under Dirichlet 0.5; every object of every bucket, read while the S3 server still runs."""
    work = tmp_path_factory.mktemp("personal") / "run"
    seen: dict[str, dict[str, bytes]] = {}
    finalize = LocalRun._finalize

    def keep_objects(self, st):
        if st.stage in ("evaluating", "done"):
            prefix = f"fedtune/{self.job.metadata.uid}/"
            for owner, bucket in self.buckets.items():
                seen[owner] = {k: bucket.get_bytes(k) for k in bucket.list(prefix)}
        return finalize(self, st)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(LocalRun, "_finalize", keep_objects)
        st, out = run_local(_skewed_job(tiny_seq_cls, toy_data), work)
    return st, out, work, seen


def test_personal_parts_are_never_uploaded(personal_run):
    st, out, _, seen = personal_run
    assert st.phase == "Succeeded", out
    uid = next(iter(seen[COORDINATOR])).split("/")[1]
    assert sorted(seen) == sorted([COORDINATOR] + [f"default/{p}" for p in PARTIES])
    checked = 0
    for owner, objects in seen.items():
        for key, raw in objects.items():
            if key.endswith(".safetensors") and "personal" not in key:
                names = list(load(raw))  # updates (uncompressed), global adapters, the final adapter
                assert names and not [n for n in names if "classifier" in n], (owner, key)
                assert all("lora_" in n for n in names), (owner, key)
                checked += 1
            elif key.endswith(".json"):  # receipts and the job: the personal part travels in none of them
                assert b"classifier." not in raw, (owner, key)
        personal = sorted(k for k in objects if "personal" in k)
        if owner == COORDINATOR:
            assert personal == [], personal
            continue
        # each party's personal part: one per round it trained, and the final one, in its own bucket only
        assert layout.final_personal_key(uid) in personal and len(personal) == 4, personal
        assert set(load(objects[layout.final_personal_key(uid)])) == {
            "base_model.model.classifier.weight",
            "base_model.model.classifier.bias",
        }
        assert st.party(owner).personal_object == layout.final_personal_key(uid)
    # 3 rounds × 3 updates, globals 0..3 and final/adapter_model: all seen, none with a head
    assert checked >= 9 + 4 + 1, checked
    # the heads differ between parties: each trained its own
    finals = [load(seen[f"default/{p}"][layout.final_personal_key(uid)]) for p in PARTIES]
    assert not torch.equal(
        finals[0]["base_model.model.classifier.weight"], finals[1]["base_model.model.classifier.weight"]
    )


def test_per_party_global_and_personalised_accuracy_are_reported(personal_run):
    st, out, work, _ = personal_run
    assert st.phase == "Succeeded", out
    assert [h.round for h in st.history] == [0, 1, 2, 3]
    for p in st.parties:
        assert p.metrics.eval_accuracy is not None and p.metrics.global_eval_accuracy is not None, p
    # every round's global adapter, evaluated by each party both ways, is in the history
    for h in st.history:
        assert sorted(h.party_eval) == [f"default/{p}" for p in PARTIES], h
        assert h.metrics.global_eval_accuracy is not None
    metrics = json.loads((work / "final" / "metrics.json").read_text())
    parties = metrics["personalization"]["parties"]
    assert sorted(parties) == [f"default/{p}" for p in PARTIES]
    for scores in parties.values():
        assert 0 <= scores["globalEvalAccuracy"] <= 1 and 0 <= scores["personalEvalAccuracy"] <= 1
    assert "personal acc" in out and "personalised acc" in out
    print(report_lines(out))
    # under strong label skew the personal heads do better on their own data than the untrained one
    mean = lambda k: sum(s[k] for s in parties.values()) / len(parties)  # noqa: E731
    assert mean("personalEvalAccuracy") > mean("globalEvalAccuracy"), parties


def report_lines(out: str) -> str:
    start = out.index("per-party evaluation")
    return out[start : out.index("\n\n", start) if "\n\n" in out[start:] else None]


def test_a_pattern_matching_nothing_fails_at_init_naming_the_field(tiny_seq_cls, toy_data, tmp_path):  # noqa: F811
    text = _skewed_job(tiny_seq_cls, toy_data, rounds=1, personalization={"mode": "keep", "keep": ["pooler"]})
    docs = list(yaml.safe_load_all(text))
    docs[0]["spec"]["maxRoundRetries"] = 0
    docs[0]["spec"]["roundTimeoutSeconds"] = 30
    try:
        st, out = run_local(yaml.safe_dump_all(docs), tmp_path / "run")
    except SpecError as exc:  # either refusal names the field
        assert "personalization.keep" in str(exc)
        return
    assert st.phase == "Failed", out
    assert "personalization.keep: pattern 'pooler' matches no adapter tensor" in out + st.message


def test_a_party_assembles_its_personalised_model(personal_run, tiny_seq_cls):  # noqa: F811
    """The README's recipe: the final adapter (shared part) plus the party's personal part from its bucket."""
    import shutil

    from peft import PeftModel
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForSequenceClassification

    st, out, work, seen = personal_run
    uid = next(iter(seen[COORDINATOR])).split("/")[1]
    own = load(seen["default/bob"][layout.final_personal_key(uid)])
    mine = work.parent / "bob-model"
    shutil.copytree(work / "final", mine)
    save_file(load_file(mine / "adapter_model.safetensors") | own, mine / "adapter_model.safetensors")
    base = AutoModelForSequenceClassification.from_pretrained(tiny_seq_cls, num_labels=2)
    model = PeftModel.from_pretrained(base, mine)
    head = model.base_model.model.classifier.modules_to_save["default"]
    assert torch.equal(head.weight.detach(), own["base_model.model.classifier.weight"])
    assert model(input_ids=torch.tensor([[101, 2307, 102]])).logits.shape == (1, 2)


def test_a_restarted_party_reads_its_personal_part_back_from_its_bucket(monkeypatch):
    """In memory under the same sha256: no download; a fresh runtime (a restarted pod): from its bucket."""
    from datetime import UTC, datetime

    from fedtune.api.protocol import Download, TrainerConfig, TrainerReceipt, TrainerTicket
    from fedtune_trainer import party, transfer
    from fedtune_trainer.adapters import to_bytes

    tensors = _adapter()
    own = {k: v + 1 for k, v in split(tensors, set(HEAD))[1].items()}
    raw = to_bytes(own)
    fetched = []
    monkeypatch.setattr(transfer, "get", lambda url, sha=None: fetched.append(url) or raw)
    cfg = TrainerConfig.model_validate(
        {
            "model": _spec()["model"],
            "peft": {},
            "data": {"labels": ["a", "b"]},
            "training": {},
            "deepspeed": {},
            "personalization": {"mode": "head"},
        }  # fmt: skip
    )

    def ticket(personal_in):
        return TrainerTicket(kind="train", job="j", party="p", round=2, deadline=datetime.now(UTC), config=cfg,
                             personal_in=personal_in)  # fmt: skip

    def receipt():
        return TrainerReceipt(kind="train", job="j", party="p", round=2, ok=True)

    rt = party.PartyRuntime()
    rt.initial = tensors
    first = rt.own_part(ticket(None), receipt())  # round 1: the initial head
    assert set(first) == set(HEAD) and torch.equal(first[HEAD[0]], tensors[HEAD[0]]) and not fetched
    rt.personal["j"] = ("abc", own)
    assert rt.own_part(ticket(Download(url="http://s3/own", sha256="abc")), receipt()) is own and not fetched
    restarted = party.PartyRuntime()
    restarted.initial = tensors
    back = restarted.own_part(ticket(Download(url="http://s3/own", sha256="abc")), receipt())
    assert fetched == ["http://s3/own"] and all(torch.equal(back[k], own[k]) for k in own)
