"""The broker's audit log as data: records, their hash chain, and its verification.

Pure Python (no database driver, no server): owners verify a log they fetched with
``shieldml audit verify``, the demo and the tests verify theirs, and the broker's storage writes
records with :func:`record_hash`. Each record hashes its predecessor's hash and its own canonical
content, so editing, deleting or reordering any record breaks every later hash; a remembered head
(a *checkpoint*) also catches removal of the newest records, which a chain alone cannot show.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shieldml.errors import AuditChainError, FormatError

__all__ = [
    "GENESIS",
    "AuditRecord",
    "ChainHead",
    "record_hash",
    "verify_chain",
    "verify_log",
]

GENESIS = "0" * 64


def record_hash(prev: str, seq: int, at: str, event: str, data: str) -> str:
    """Each audit record hashes its predecessor's hash and its own canonical content."""
    body = json.dumps(
        {"seq": seq, "at": at, "event": event, "data": data}, sort_keys=True, separators=(",", ":")
    )
    return hashlib.sha256(bytes.fromhex(prev) + body.encode()).hexdigest()


@dataclass(frozen=True)
class AuditRecord:
    seq: int
    at: str
    event: str
    data: dict[str, Any]
    prev_hash: str
    hash: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "at": self.at,
            "event": self.event,
            "data": self.data,
            "prev_hash": self.prev_hash,
            "hash": self.hash,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> AuditRecord:
        """A record as the broker's API returns it (``GET /v1/audit``)."""
        try:
            rec = cls(
                seq=d["seq"],
                at=d["at"],
                event=d["event"],
                data=d["data"],
                prev_hash=d["prev_hash"],
                hash=d["hash"],
            )
        except (KeyError, TypeError) as e:
            raise FormatError(f"audit record: missing or malformed field {e}") from None
        if not (
            isinstance(rec.seq, int)
            and isinstance(rec.at, str)
            and isinstance(rec.event, str)
            and isinstance(rec.data, dict)
            and isinstance(rec.prev_hash, str)
            and isinstance(rec.hash, str)
        ):
            raise FormatError(f"audit record {d.get('seq')!r}: a field has the wrong type")
        return rec


@dataclass(frozen=True)
class ChainHead:
    """The last record of a verified chain: what a checkpoint remembers."""

    seq: int
    hash: str

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ChainHead:
        seq, h = d.get("seq"), d.get("hash")
        if not isinstance(seq, int) or seq < 0 or not isinstance(h, str):
            raise FormatError("audit head: expected {'seq': <int >= 0>, 'hash': <hex>}")
        return cls(seq, h)

    def to_dict(self) -> dict[str, Any]:
        return {"seq": self.seq, "hash": self.hash}


def verify_chain(records: Iterable[AuditRecord], head: ChainHead | None = None) -> ChainHead:
    """Check contiguity from 1, every hash, and (if given) that the chain holds ``head``.

    Returns the head of the verified chain; raises :class:`AuditChainError` naming the first
    record that does not verify.
    """
    recs = list(records)
    prev, expected = GENESIS, 1
    for r in recs:
        if r.seq != expected:
            raise AuditChainError(
                f"record {expected} is missing (found {r.seq}): deleted or reordered", seq=expected
            )
        if r.prev_hash != prev:
            raise AuditChainError(f"record {r.seq} does not follow record {r.seq - 1}", seq=r.seq)
        data = json.dumps(r.data, sort_keys=True, separators=(",", ":"))
        if record_hash(prev, r.seq, r.at, r.event, data) != r.hash:
            raise AuditChainError(f"record {r.seq} was modified", seq=r.seq)
        prev, expected = r.hash, expected + 1
    if head is not None and head.seq > 0:
        if head.seq > len(recs):
            raise AuditChainError(
                f"the log has {len(recs)} records, fewer than the {head.seq} seen before: "
                "records were removed",
                seq=head.seq,
            )
        if recs[head.seq - 1].hash != head.hash:
            raise AuditChainError(
                f"the chain no longer contains record {head.seq} as last seen: "
                "records were removed or rewritten",
                seq=head.seq,
            )
    return ChainHead(len(recs), prev)


def verify_log(
    records: Iterable[Mapping[str, Any]],
    head: Mapping[str, Any],
    *,
    checkpoint: Path | None = None,
) -> ChainHead:
    """Verify a log as fetched from a broker, against its claimed head and a checkpoint file.

    The chain must hold the broker's ``head`` and (when ``checkpoint`` exists) still hold the
    head remembered there. On success the checkpoint is replaced atomically by the new head.
    """
    recs = [AuditRecord.from_dict(r) for r in records]
    claimed = ChainHead.from_dict(head)
    verified = verify_chain(recs, claimed)
    if checkpoint is not None:
        if checkpoint.exists():
            try:
                seen = ChainHead.from_dict(json.loads(checkpoint.read_text()))
            except (OSError, ValueError) as e:
                raise FormatError(f"{checkpoint}: not an audit checkpoint: {e}") from None
            verify_chain(recs, seen)
        _write_atomic(checkpoint, json.dumps(verified.to_dict()))
    return verified


def _write_atomic(path: Path, text: str) -> None:
    fd, name = tempfile.mkstemp(dir=path.parent or Path(), prefix=f".{path.name}.")
    tmp = Path(name)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    except BaseException:
        tmp.unlink()
        raise
