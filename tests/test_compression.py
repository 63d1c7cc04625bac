"""Compressed updates (training.updateCompression): error bounds, sizes, verification, end to end."""

from __future__ import annotations

import hashlib
import struct

import pytest
import torch
from fedtune.documents import parse_documents
from fedtune_trainer.compression import METADATA_KEY, SCALE_SUFFIX, decode, encode, quantize_int8, read_metadata
from fedtune_trainer.verify import UpdateRejected, load_verified
from safetensors.torch import load, save

A = "base_model.model.layer.0.q.lora_A.weight"  # (r, in)
B = "base_model.model.layer.0.q.lora_B.weight"  # (out, r)
HEAD = "base_model.model.classifier.bias"
STEP = "base_model.model.counter"  # an integer tensor: never compressed


def adapter(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    rows = torch.logspace(-3, 1, 64).unsqueeze(1)  # rows of very different magnitudes
    return {
        A: torch.randn(8, 256, generator=g),
        B: torch.randn(64, 8, generator=g) * rows,
        HEAD: torch.randn(3, generator=g),
        STEP: torch.tensor([7, 9], dtype=torch.int64),
    }


def roundtrip(tensors: dict[str, torch.Tensor], mode: str) -> tuple[bytes, dict[str, torch.Tensor]]:
    data = encode(tensors, mode)
    dtypes = {k: v.dtype for k, v in tensors.items()}
    return data, decode(load(data), read_metadata(data), dtypes)


def test_none_is_the_plain_safetensors_file():
    tensors = adapter()
    data, back = roundtrip(tensors, "none")
    assert data == save(tensors) and read_metadata(data) == {}
    assert all(torch.equal(back[k], tensors[k]) for k in tensors)


def test_bf16_relative_error_and_dtypes():
    tensors = adapter()
    data, back = roundtrip(tensors, "bf16")
    assert read_metadata(data) == {METADATA_KEY: "bf16"}
    assert {k: v.dtype for k, v in back.items()} == {k: v.dtype for k, v in tensors.items()}
    for name in (A, B, HEAD):
        rel = ((back[name] - tensors[name]).abs() / tensors[name].abs().clamp_min(1e-30)).max()
        assert rel <= 2**-8 + 1e-7, (name, float(rel))  # 3.9e-3: bf16 keeps 8 significant bits
    assert torch.equal(back[STEP], tensors[STEP])


def test_int8_error_is_at_most_half_a_step_of_each_slice():
    tensors = adapter()
    data, back = roundtrip(tensors, "int8")
    assert read_metadata(data) == {METADATA_KEY: "int8"}
    stored = load(data)
    # one scale per LoRA rank component: rows of A, columns of B; one for the vector
    assert stored[A + SCALE_SUFFIX].shape == (8, 1) and stored[B + SCALE_SUFFIX].shape == (1, 8)
    assert stored[HEAD + SCALE_SUFFIX].shape == () and stored[A].dtype == torch.int8
    assert stored[STEP].dtype == torch.int64 and STEP + SCALE_SUFFIX not in stored
    err_a = (back[A] - tensors[A]).abs().amax(dim=1)
    assert (err_a <= tensors[A].abs().amax(dim=1) / 127 / 2 + 1e-6).all()
    err_b = (back[B] - tensors[B]).abs().amax(dim=0)
    assert (err_b <= tensors[B].abs().amax(dim=0) / 127 / 2 + 1e-6).all()
    assert (back[HEAD] - tensors[HEAD]).abs().max() <= tensors[HEAD].abs().max() / 254 + 1e-6
    assert back[A].dtype == torch.float32 and torch.equal(back[STEP], tensors[STEP])


def test_int8_keeps_zeros_exact_and_decodes_to_bf16_references():
    q, scale = quantize_int8(torch.zeros(4, 16))
    assert torch.equal(q, torch.zeros(4, 16, dtype=torch.int8)) and torch.equal(scale, torch.zeros(4, 1))
    tensors = {A: torch.randn(4, 16).to(torch.bfloat16), "scalar": torch.tensor(-2.5), "empty": torch.zeros(0, 3)}
    _, back = roundtrip(tensors, "int8")
    assert back[A].dtype == torch.bfloat16
    assert float(back["scalar"]) == -2.5 and back["empty"].shape == (0, 3)


def test_sizes():
    big = {f"m{i}.lora_A.weight": torch.randn(16, 4096) for i in range(4)}
    big |= {f"m{i}.lora_B.weight": torch.randn(4096, 16) for i in range(4)}
    fp32 = len(encode(big, "none"))
    assert 0.49 < len(encode(big, "bf16")) / fp32 < 0.51
    values = sum(t.numel() for t in big.values())
    scales = 4 * 16 * len(big)  # one float32 per rank component
    int8 = len(encode(big, "int8"))
    assert values + scales <= int8 < 1.01 * (values + scales) + 4096  # + the safetensors header
    assert 0.25 < int8 / fp32 < 0.26


@pytest.fixture
def verify(load_update):
    """Verification as the aggregator runs it, in memory and from a downloaded file (conftest.load_update)."""

    def run(data: bytes, reference: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return load_update(data, hashlib.sha256(data).hexdigest(), reference, source="update from alice")

    return run


def test_verification_sees_decoded_tensors(verify):
    ref = adapter(1)
    for mode in ("bf16", "int8"):
        got = verify(encode(adapter(), mode), ref)
        assert {k: v.dtype for k, v in got.items()} == {k: v.dtype for k, v in ref.items()}


def test_updates_decode_alike_in_memory_and_from_a_file(load_update):
    ref = adapter(1)
    for mode in ("bf16", "int8"):
        data = encode(adapter(), mode)
        got = load_update(data, None, ref)
        want = load_verified(data, None, ref)
        assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)


def with_scale(name: str, scale: torch.Tensor) -> bytes:
    """An int8 update whose scale for `name` was replaced (a party sending crafted bytes)."""
    stored = load(encode(adapter(), "int8"))
    stored[name + SCALE_SUFFIX] = scale
    return save(stored, metadata={METADATA_KEY: "int8"})


def test_nan_scale_or_values_after_decoding_are_rejected(verify):
    with pytest.raises(UpdateRejected, match=f"update from alice: tensor {A} holds 2048 NaN"):
        verify(with_scale(A, torch.full((8, 1), float("nan"))), adapter())
    with pytest.raises(UpdateRejected, match=f"tensor {HEAD} holds 3 Inf"):  # 127 x 1e38 overflows float32
        verify(with_scale(HEAD, torch.tensor(1e38)), adapter())
    bad = adapter()
    bad[HEAD] = torch.tensor([1.0, float("nan"), 2.0])
    with pytest.raises(UpdateRejected, match=f"tensor {HEAD} holds 1 NaN"):
        verify(encode(bad, "bf16"), adapter())


@pytest.mark.parametrize(
    "change, message",
    [
        ({"scale_shape": torch.ones(3, 1)}, "int8 scale of .*lora_A.weight has shape \\(3, 1\\), which does not fit"),
        ({"scale_dtype": torch.ones(8, 1, dtype=torch.float64)}, "int8 scale of .* has dtype float64, not float32"),
        ({"orphan": torch.ones(())}, "int8 scale base_model.model.ghost.__scale__ has no quantised tensor"),
        ({"metadata": "zstd"}, "unknown compression 'zstd'"),
    ],
)
def test_malformed_encodings_are_rejected_with_a_reason(verify, change, message):
    stored = load(encode(adapter(), "int8"))
    meta = {METADATA_KEY: change.get("metadata", "int8")}
    if "scale_shape" in change:
        stored[A + SCALE_SUFFIX] = change["scale_shape"]
    if "scale_dtype" in change:
        stored[A + SCALE_SUFFIX] = change["scale_dtype"]
    if "orphan" in change:
        stored["base_model.model.ghost" + SCALE_SUFFIX] = change["orphan"]
    with pytest.raises(UpdateRejected, match="update from alice: cannot decode the compressed update: " + message):
        verify(save(stored, metadata=meta), adapter())


def test_scale_on_a_float_tensor_and_wrong_shapes_keep_verify_messages(verify):
    stored = load(encode(adapter(), "int8"))
    stored[A] = stored[A].float()  # a scale beside a float tensor is not int8 coding
    with pytest.raises(UpdateRejected, match="has an int8 scale but dtype float32"):
        verify(save(stored, metadata={METADATA_KEY: "int8"}), adapter())
    ref = adapter()
    ref[A] = torch.zeros(4, 256)
    with pytest.raises(UpdateRejected, match=f"does not match the global adapter: tensor {A} has shape \\(8, 256\\)"):
        verify(encode(adapter(), "int8"), ref)


def test_encode_refuses_unknown_modes_and_reserved_names():
    with pytest.raises(ValueError, match="unknown update compression 'fp8'"):
        encode(adapter(), "fp8")
    with pytest.raises(ValueError, match="reserves"):
        encode({"x" + SCALE_SUFFIX: torch.ones(2)}, "int8")


def test_unreadable_header_is_a_decode_error():
    from fedtune_trainer.compression import CompressionError

    with pytest.raises(CompressionError):
        read_metadata(struct.pack("<Q", 5) + b"{nope")


def test_spec_field_defaults_and_validates():
    from fedtune.api.job import TrainingSpec

    assert TrainingSpec().update_compression == "none"
    assert TrainingSpec.model_validate({"updateCompression": "int8"}).update_compression == "int8"
    with pytest.raises(ValueError):
        TrainingSpec.model_validate({"updateCompression": "fp4"})


@pytest.mark.slow
def test_int8_job_runs_end_to_end_and_moves_fewer_bytes(tmp_path):
    """Two parties, two rounds on the tiny model: int8 succeeds and uploads fewer bytes than none."""
    import io

    import yaml
    from fedtune.local.runner import LocalRun
    from tiny_models import make_tiny_model
    from toy_data import toy_jsonl

    model = make_tiny_model(tmp_path / "bert", "sequence-classification")
    data = tmp_path / "toy.jsonl"
    data.write_bytes(toy_jsonl(200))
    ups = {}
    for mode in ("none", "int8"):
        docs = _job(model, data, mode)
        st = LocalRun(
            parse_documents(yaml.safe_dump_all(docs), "j"), tmp_path / mode, out=io.StringIO(), threads=1
        ).run()
        assert st.phase == "Succeeded", st.message
        assert all(not h.rejected for h in st.history)
        ups[mode] = [h.bytes_up for h in st.history[1:]]
        assert st.history[-1].metrics.eval_loss is not None
    # bytes_up = the parties' updates + the (uncompressed) global the aggregator uploads
    assert all(i < n for i, n in zip(ups["int8"], ups["none"])), ups


def _job(model, data, compression: str) -> list[dict]:
    parties = ("alice", "bob")
    job = {
        "apiVersion": "fedtune.io/v1alpha1",
        "kind": "FederatedJob",
        "metadata": {"name": f"c-{compression}"},
        "spec": {
            "model": {"source": f"file://{model}", "task": "sequence-classification"},
            "peft": {"method": "lora", "config": {"r": 4, "target_modules": ["query", "value"]}},
            "data": {"labels": ["negative", "positive"], "maxLength": 16},
            "training": {"localEpochs": 1, "batchSize": 8, "learningRate": 0.01, "updateCompression": compression},
            "rounds": 2,
            "minParties": 2,
            "roundTimeoutSeconds": 120,
            "parties": [{"name": p} for p in parties],
        },
    }
    docs = [job] + [
        {
            "apiVersion": "fedtune.io/v1alpha1",
            "kind": "Party",
            "metadata": {"name": p},
            "spec": {"storage": {"bucket": f"{p}-data"}},
        }
        for p in parties
    ]
    dataset = {
        "source": f"file://{data}",
        "labels": ["negative", "positive"],
        "partition": {"method": "iid"},
        "samplesPerParty": 40,
        "evalFraction": 0.25,
        "seed": 1,
    }
    docs.append({"apiVersion": "fedtune.io/v1alpha1", "kind": "Dataset", "metadata": {"name": "toy"}, "spec": dataset})
    return docs
