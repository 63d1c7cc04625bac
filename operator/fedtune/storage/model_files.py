"""s3:// model sources: the files under a prefix, each as a presigned GET URL for the pods."""

from __future__ import annotations

from collections.abc import Mapping

from fedtune.storage.s3 import Bucket


class ModelSourceError(ValueError):
    """The s3:// model source cannot be served to the pods."""


def model_file_urls(source: str, buckets: Mapping[str, Bucket], expires_s: int) -> dict[str, str]:
    """relative path -> GET URL for every object under `s3://bucket/prefix/`.

    The URLs are minted with the credentials of the bucket's owner (the coordinator, or the one
    party whose bucket it is), so pods read the model without credentials, like everything else.
    """
    bucket_name, _, prefix = source.removeprefix("s3://").partition("/")
    owner = next((b for b in buckets.values() if b.name == bucket_name), None)
    if owner is None:
        raise ModelSourceError(
            f"spec.model.source {source}: bucket {bucket_name!r} is neither the coordinator's (spec.storage.bucket) "
            "nor a party's; put the model files in the coordinator bucket"
        )
    prefix = prefix.rstrip("/") + "/" if prefix else ""
    keys = [k for k in owner.list(prefix) if not k.endswith("/")]
    if not keys:
        raise ModelSourceError(f"spec.model.source {source}: no objects under that prefix")
    return {k[len(prefix) :]: owner.presign_get(k, expires_s) for k in keys}
