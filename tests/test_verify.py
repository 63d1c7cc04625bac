"""Verification of untrusted update bytes before aggregation, in memory and as downloaded files."""

from __future__ import annotations

import gc
import hashlib
import os
import pickle

import pytest
import torch
from fedtune_trainer.tensorfile import Spec, TensorFile
from fedtune_trainer.verify import UpdateRejected, load_verified
from safetensors.torch import save

A = "base_model.model.layer.0.q.lora_A.weight"
B = "base_model.model.layer.0.q.lora_B.weight"
HEAD = "base_model.model.classifier.bias"


def reference() -> dict[str, torch.Tensor]:
    return {A: torch.zeros(8, 32), B: torch.zeros(16, 8), HEAD: torch.zeros(3)}


def blob(tensors: dict[str, torch.Tensor]) -> tuple[bytes, str]:
    data = save(tensors)
    return data, hashlib.sha256(data).hexdigest()


def check(load, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    data, sha = blob(tensors)
    return load(data, sha, reference(), source="update from alice")


def test_a_good_update_loads(load_update):
    good = {k: torch.randn(v.shape) for k, v in reference().items()}
    got = check(load_update, good)
    assert set(got) == set(good)
    assert all(torch.equal(got[k], good[k]) for k in good)


def test_tampered_bytes_fail_the_hash(load_update):
    data, sha = blob(reference())
    tampered = bytearray(data)
    tampered[-1] ^= 0x01
    with pytest.raises(UpdateRejected, match=f"update from alice: sha256 mismatch: expected {sha[:12]}"):
        load_update(bytes(tampered), sha, reference(), source="update from alice")


def with_value(value: float, count: int = 1) -> dict[str, torch.Tensor]:
    tensors = reference()
    tensors[B] = tensors[B].clone()
    tensors[B].view(-1)[:count] = value
    return tensors


@pytest.mark.parametrize(
    "tensors, message",
    [
        (with_value(float("nan"), 2), f"update from alice: tensor {B} holds 2 NaN value(s)"),
        (with_value(float("inf")), f"update from alice: tensor {B} holds 1 Inf value(s)"),
        (with_value(float("-inf")), f"tensor {B} holds 1 Inf value(s)"),
        (
            {**reference(), A: torch.zeros(4, 32)},
            f"update from alice: does not match the global adapter: tensor {A} has shape (4, 32), expected (8, 32)",
        ),
        (
            {**reference(), HEAD: torch.zeros(3, dtype=torch.float16)},
            f"tensor {HEAD} has dtype float16, expected float32",
        ),
        ({A: torch.zeros(8, 32), B: torch.zeros(16, 8)}, f"1 tensor(s) missing: {HEAD}"),
        (
            {**reference(), "extra.x": torch.zeros(1), "extra.y": torch.zeros(1)},
            "2 unexpected tensor(s): extra.x, extra.y",
        ),
        (
            {f"other.{i}": torch.zeros(1) for i in range(5)},
            r"3 tensor\(s\) missing: .*; 5 unexpected tensor\(s\): other.0, other.1, other.2 … and 2 more",
        ),
    ],
    ids=["nan", "inf", "-inf", "shape", "dtype", "missing", "extra", "foreign"],
)
def test_bad_contents_are_named(load_update, tensors, message):
    if not message.startswith("3 tensor"):
        message = message.replace("(", r"\(").replace(")", r"\)")
    with pytest.raises(UpdateRejected, match=message):
        check(load_update, tensors)


def test_empty_updates_are_refused(load_update):
    with pytest.raises(UpdateRejected, match="empty"):
        load_update(b"", None, None)
    data, sha = blob({})
    with pytest.raises(UpdateRejected, match="holds no tensors"):
        load_update(data, sha, None)


GARBAGE = [
    b"not a safetensors file",
    b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}",  # header length 8, header not JSON
    b"\x00" * 3,  # shorter than the length prefix
]


@pytest.mark.parametrize("garbage", GARBAGE)
def test_garbage_is_not_safetensors(load_update, garbage):
    with pytest.raises(UpdateRejected, match="update from bob: not a valid safetensors file"):
        load_update(garbage, hashlib.sha256(garbage).hexdigest(), reference(), source="update from bob")


class _Bomb:
    """Unpickling this would create a marker file: proof that pickle was executed."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_pickle_payload_is_refused_and_never_executed(load_update, tmp_path, protocol):
    marker = tmp_path / "pwned"
    payload = pickle.dumps({A: _Bomb(str(marker))}, protocol=protocol)
    # Sanity: the payload really is armed.
    pickle.loads(payload)
    assert marker.exists()
    os.remove(marker)

    with pytest.raises(UpdateRejected, match="not a valid safetensors file"):
        load_update(payload, hashlib.sha256(payload).hexdigest(), reference(), source="update from mallory")
    assert not marker.exists()


def test_torch_save_zip_is_refused(load_update, tmp_path):
    # torch.save's format is pickle inside a zip: it must not be accepted either.
    path = tmp_path / "update.pt"
    torch.save(reference(), path)
    data = path.read_bytes()
    with pytest.raises(UpdateRejected, match="not a valid safetensors file"):
        load_update(data, hashlib.sha256(data).hexdigest(), reference())


def test_without_reference_only_integrity_and_finiteness_are_checked(load_update):
    data, sha = blob({"anything": torch.ones(2)})
    assert set(load_update(data, sha, None)) == {"anything"}
    data, sha = blob({"anything": torch.tensor([1.0, float("nan")])})
    with pytest.raises(UpdateRejected, match="global adapter: tensor anything holds 1 NaN"):
        load_update(data, sha, None, source="global adapter")


def _mapped(path) -> bool:
    with open("/proc/self/maps") as maps:
        return any(line.rstrip().endswith(str(path)) for line in maps)


def test_a_tensor_file_knows_its_tensors_from_the_header_and_maps_the_file_only_while_a_tensor_lives(tmp_path):
    data, _ = blob({A: torch.randn(8, 32), HEAD: torch.arange(3, dtype=torch.int64)})
    path = tmp_path / "update.safetensors"
    path.write_bytes(data)
    tensors = TensorFile(path)
    assert tensors.specs == {A: Spec((8, 32), torch.float32), HEAD: Spec((3,), torch.int64)}
    assert set(tensors) == {A, HEAD} and len(tensors) == 2 and B not in tensors
    assert not _mapped(path)  # reading the header leaves nothing mapped
    value = tensors[A]
    assert torch.equal(value, load_verified(data, None, None)[A])
    del value
    gc.collect()
    assert not _mapped(path)  # so P open updates do not pile up in memory
    with pytest.raises(KeyError):
        tensors[B]


def test_rejection_is_a_value_error():
    assert issubclass(UpdateRejected, ValueError)
