"""s3:// model sources: every file under the prefix becomes a presigned GET URL for the pods."""

from __future__ import annotations

import uuid

import pytest
from fedtune.storage.model_files import ModelSourceError, model_file_urls
from fedtune_trainer import transfer


def test_every_file_under_the_prefix_gets_a_working_url(s3world):
    hub = s3world.bucket("hub")
    prefix = f"models-{uuid.uuid4().hex[:8]}/tiny"
    files = {"config.json": b"{}", "model.safetensors": b"weights", "tok/vocab.txt": b"a\nb\n"}
    for rel, data in files.items():
        hub.put_bytes(f"{prefix}/{rel}", data)
    hub.put_bytes(f"{prefix}-other/config.json", b"not this one")  # a sibling prefix is not included
    urls = model_file_urls(f"s3://hub-bkt/{prefix}/", {"coordinator": hub, "org/alice": s3world.bucket("alice")}, 60)
    assert sorted(urls) == sorted(files)
    assert {rel: transfer.get(url) for rel, url in urls.items()} == files


def test_unknown_bucket_or_empty_prefix_is_a_clear_error(s3world):
    buckets = {"coordinator": s3world.bucket("hub")}
    with pytest.raises(ModelSourceError, match="neither the coordinator's"):
        model_file_urls("s3://someone-elses-bucket/m", buckets, 60)
    with pytest.raises(ModelSourceError, match="no objects under that prefix"):
        model_file_urls(f"s3://hub-bkt/nothing-{uuid.uuid4().hex}", buckets, 60)


def test_local_mode_refuses_s3_model_sources(tmp_path):
    from pathlib import Path

    import yaml
    from fedtune.api.errors import SpecError
    from fedtune.documents import parse_documents
    from fedtune.local.runner import LocalRun

    docs = list(yaml.safe_load_all((Path(__file__).parent.parent / "examples" / "quickstart.yaml").read_text()))
    docs[0]["spec"]["model"]["source"] = "s3://models/minilm"
    with pytest.raises(SpecError, match="local mode's embedded S3 starts empty"):
        LocalRun(parse_documents(yaml.safe_dump_all(docs), "j"), tmp_path)
