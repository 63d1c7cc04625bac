"""Secure aggregation end to end: `fedtune run` with real parties, aggregator and SeaweedFS.

The same seeded job with and without `privacy.secureAggregation` trains the same updates, so the
global adapters must agree within the quantisation error; what the parties upload must be masked
integers, not adapters; and the aggregator's log must say it unmasked a sum.
"""

from __future__ import annotations

import numpy as np
import pytest
import yaml
from fedtune.local.runner import LocalRun
from fedtune.rounds.intents import COORDINATOR
from fedtune.storage import layout
from safetensors.numpy import load
from safetensors.torch import load_file as load_torch
from test_local_run import job_yaml, run_local, tiny_seq_cls, toy_data  # noqa: F401 (fixtures)

PARTIES = ("alice", "bob", "carol")


def secure(text: str, threshold: int | None = 2, **privacy) -> str:
    docs = list(yaml.safe_load_all(text))
    docs[0]["spec"]["privacy"] = {"secureAggregation": {"threshold": threshold}, **privacy}
    return yaml.safe_dump_all(docs)


@pytest.fixture(scope="module")
def runs(tiny_seq_cls, toy_data, tmp_path_factory):  # noqa: F811
    plain_text = job_yaml(tiny_seq_cls, toy_data, parties=PARTIES, rounds=2)
    base = tmp_path_factory.mktemp("secure")
    plain = run_local(plain_text, base / "plain")
    uploads: dict[str, bytes] = {}
    finalize = LocalRun._finalize

    def keep_uploads(self, st):  # what each party uploaded in round 2, read while the S3 server still runs
        for owner, bucket in self.buckets.items():
            if st.stage in ("evaluating", "done") and owner != COORDINATOR and owner not in uploads:
                uploads[owner] = bucket.get_bytes(layout.update_key(self.job.metadata.uid, 2))
        return finalize(self, st)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(LocalRun, "_finalize", keep_uploads)
        masked = run_local(secure(plain_text), base / "secure")
    return base, plain, masked, uploads


def test_secure_aggregation_gives_fedavgs_adapter_within_quantisation_error(runs):
    base, (plain_st, plain_out), (st, out), _ = runs
    assert plain_st.phase == "Succeeded", plain_out
    assert st.phase == "Succeeded", out
    assert [h.participants for h in st.history[1:]] == [[f"default/{p}" for p in PARTIES]] * 2
    got = load_torch(base / "secure" / "final" / "adapter_model.safetensors")
    want = load_torch(base / "plain" / "final" / "adapter_model.safetensors")
    assert got.keys() == want.keys()
    worst = max(float((got[k].double() - want[k].double()).abs().max()) for k in want)
    # two rounds of rounding to 2**-24 per value (plus float32 casts): far below any training step
    assert worst < 1e-5, worst
    moved = max(float((want[k].double()).abs().max()) for k in want if "lora_B" in k)
    assert moved > 1e-3  # the adapters did train: agreeing is not trivial


def test_parties_upload_masked_integers_and_the_aggregator_unmasks_only_the_sum(runs):
    base, _, (st, out), uploads = runs
    assert sorted(uploads) == [f"default/{p}" for p in PARTIES]
    for raw in uploads.values():
        tensors = load(raw)
        assert list(tensors) == ["secure_aggregation.masked"]
        masked = tensors["secure_aggregation.masked"]
        assert masked.dtype == np.uint64
        # a one-time-padded vector: its top bits are as often set as not (a plain delta's are all 0 or all 1)
        top = (masked >> np.uint64(63)).astype(np.float64).mean()
        assert 0.4 < top < 0.6, top
    logs = "".join(p.read_text(errors="replace") for p in (base / "secure" / "logs").glob("*.log"))
    assert logs.count("secure aggregation: unmasked the sum of 3 update(s)") == 2, logs[-3000:]
    assert logs.count("secure aggregation: keys done") == 2 * len(PARTIES)


def test_local_dp_under_secure_aggregation_noises_each_update_before_masking_it(
    tiny_seq_cls,  # noqa: F811
    toy_data,  # noqa: F811
    tmp_path,
):
    dp = {"mode": "local", "clipNorm": 0.1, "noiseMultiplier": 1.0, "budget": {"epsilon": 50, "delta": 1e-5}}
    text = secure(job_yaml(tiny_seq_cls, toy_data, parties=PARTIES, rounds=1, strategy={"name": "fedadam"}), dp=dp)
    st, out = run_local(text, tmp_path / "run")
    assert st.phase == "Succeeded", out
    assert st.history[1].epsilon is not None and st.history[1].participants == [f"default/{p}" for p in PARTIES]
    logs = "".join(p.read_text(errors="replace") for p in (tmp_path / "run" / "logs").glob("*.log"))
    assert logs.count("clipped to 0.1, noise added") == len(PARTIES), logs[-3000:]
    assert "secure aggregation: unmasked the sum of 3 update(s)" in logs
