"""Shared fixtures: a real SeaweedFS S3 server (no mocks of S3 anywhere), a real Kubernetes API
server for the session (`kube`, `kube_session`: tests/kube.py), and the operator tests' `tiny_model`
and `fast_operator` (tests/operator_world.py)."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from fedtune.api.party import StorageSpec
from fedtune.storage.s3 import Bucket, S3Credentials
from fedtune.storage.seaweed import Identity, SeaweedServer
from kube import kube_fixture, kube_session  # noqa: F401  (fixtures: `kube`, `kube_session`)
from operator_world import fast_operator, tiny_model  # noqa: F401  (fixtures)

S3WORLD_NAMES = ("alice", "bob", "carol", "hub")


@dataclass
class S3World:
    """One running SeaweedFS shared by the whole test session.

    Identities `alice`, `bob`, `carol` and `hub`. Identity NAME may read, write, list and
    create only `NAME-bkt` (created at start with NAME's own credentials) and `NAME-absent`
    (granted but never created: tests of missing buckets rely on it staying absent).

    - `.server`         the SeaweedServer; `.endpoint` its http://127.0.0.1:<port> S3 URL
    - `.creds(NAME)`    NAME's S3Credentials
    - `.storage(NAME)`  StorageSpec(endpoint, bucket=NAME-bkt)
    - `.bucket(NAME)`   Bucket for NAME-bkt with NAME's credentials

    The buckets are shared by every test: write under a key prefix unique to your test
    (e.g. uuid4().hex) and never delete buckets.
    """

    server: SeaweedServer
    _creds: dict[str, S3Credentials] = field(default_factory=dict)

    @property
    def endpoint(self) -> str:
        return self.server.endpoint

    def creds(self, name: str) -> S3Credentials:
        """Credentials of identity `name`."""
        return self._creds[name]

    def storage(self, name: str) -> StorageSpec:
        """StorageSpec of `name`'s bucket."""
        return self.server.storage(f"{name}-bkt")

    def bucket(self, name: str) -> Bucket:
        """`name`'s bucket, accessed with `name`'s credentials."""
        return Bucket(self.storage(name), self.creds(name))


@pytest.fixture(scope="session")
def s3world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3World]:
    """Session-wide SeaweedFS with alice/bob/carol/hub and their buckets (see S3World)."""
    creds = {name: S3Credentials.generate() for name in S3WORLD_NAMES}
    identities = [Identity(n, c, [f"{n}-bkt", f"{n}-absent"]) for n, c in creds.items()]
    server = SeaweedServer(tmp_path_factory.mktemp("s3world"), identities)
    server.start()
    try:
        world = S3World(server, creds)
        for name in S3WORLD_NAMES:
            world.bucket(name).ensure(create=True)
        yield world
    finally:
        server.stop()


@pytest.fixture
def fresh_s3(tmp_path: Path) -> Iterator[Callable[[list[Identity]], SeaweedServer]]:
    """Factory `make(identities) -> SeaweedServer` (started) for tests needing their own server.

    Each call starts another server in its own directory under tmp_path (~3 s); all are
    stopped at teardown. Buckets are not created: use Bucket(...).ensure().
    """
    servers: list[SeaweedServer] = []

    def make(identities: list[Identity]) -> SeaweedServer:
        server = SeaweedServer(tmp_path / f"weed-{len(servers)}", identities)
        servers.append(server)
        server.start()
        return server

    yield make
    for server in servers:
        server.stop()


@pytest.fixture(params=["in memory", "from a file"])
def load_update(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[..., dict]:
    """`verify.load_verified`, or the same bytes written to disk and opened with `verify.open_verified`
    (the aggregator's way, a TensorFile read back into a dict), so every check is tested both ways."""
    from fedtune_trainer.verify import load_verified, open_verified

    if request.param == "in memory":
        return load_verified

    def from_file(data: bytes, expected_sha256: str | None, reference: dict | None, **kw) -> dict:
        path = tmp_path / f"update-{uuid.uuid4().hex}.safetensors"
        path.write_bytes(data)
        return dict(open_verified(path, hashlib.sha256(data).hexdigest(), expected_sha256, reference, **kw))

    return from_file
