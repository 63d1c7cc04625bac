"""What every secret of secure aggregation is bound to (job, round, attempt), its errors and encodings."""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass

_DOMAIN = b"fedtune-secagg/v1"


class SecAggError(ValueError):
    """Secure aggregation cannot go on as asked; the message names the party or round and the fix."""


class ShareRejected(SecAggError):
    """A share that fails authentication or its commitment: tampered, replayed, or for another round."""

    def __init__(self, message: str, party: str | None = None):
        super().__init__(message)
        self.party = party


@dataclass(frozen=True)
class Context:
    """One job, round and attempt: keys, seeds, ciphertexts and commitments of one never serve another."""

    job: str
    round: int
    attempt: int

    def __post_init__(self):
        if not isinstance(self.job, str) or not self.job:
            raise SecAggError(f"secure aggregation context: job must be a non-empty string, not {self.job!r}")
        for name in ("round", "attempt"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**63:
                raise SecAggError(f"secure aggregation context: {name} must be a non-negative integer, not {value!r}")

    def info(self) -> bytes:
        """Canonical bytes of this context: domain, job, round and attempt, each unambiguously framed."""
        return (
            _frame(_DOMAIN)
            + _frame(self.job.encode())
            + self.round.to_bytes(8, "big")
            + self.attempt.to_bytes(8, "big")
        )

    def describe(self) -> str:
        return f"job {self.job} round {self.round} attempt {self.attempt}"


def _frame(data: bytes) -> bytes:
    return len(data).to_bytes(4, "big") + data


def label(ctx: Context, purpose: bytes, *names: str) -> bytes:
    """ctx.info() + purpose + party names, length-prefixed so that no two different tuples collide."""
    return ctx.info() + _frame(purpose) + b"".join(_frame(n.encode()) for n in names)


def canonical_json(obj: dict) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def unb64(text: object, what: str, length: int | None = None) -> bytes:
    """Strict base64 decoding; SecAggError naming `what` if it is not base64 (of `length` bytes)."""
    if not isinstance(text, str):
        raise SecAggError(f"{what} must be a base64 string, not {type(text).__name__}")
    try:
        data = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as e:
        raise SecAggError(f"{what} is not valid base64 ({e})") from None
    if length is not None and len(data) != length:
        raise SecAggError(f"{what} decodes to {len(data)} bytes, expected {length}")
    return data


def check_name(name: object, what: str = "party name") -> str:
    if not isinstance(name, str) or not name:
        raise SecAggError(f"{what} must be a non-empty string, not {name!r}")
    return name
