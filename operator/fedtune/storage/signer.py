"""The control plane's Signer: presigned URLs minted with each owner's own credentials (local mode and operator)."""

from __future__ import annotations

from fedtune.api.protocol import Multipart
from fedtune.storage.s3 import Bucket


class BucketSigner:
    """Signer over a map owner -> Bucket (a party key, or 'coordinator')."""

    def __init__(self, buckets: dict[str, Bucket]):
        self.buckets = buckets

    def presign_get(self, owner: str, key: str, expires_s: int) -> str:
        return self.buckets[owner].presign_get(key, expires_s)

    def presign_put(self, owner: str, key: str, expires_s: int) -> str:
        return self.buckets[owner].presign_put(key, expires_s)

    def start_multipart(self, owner: str, key: str, parts: int, part_size: int, expires_s: int) -> Multipart:
        return self.buckets[owner].start_multipart(key, parts, part_size, expires_s)
