"""The broker's audit log as data: records, their hash chain and Merkle tree, and verification.

Pure Python (no database driver, no server): owners verify a log they fetched with
``shieldml audit verify``, the demo and the tests verify theirs, and the broker's storage writes
records with :func:`record_hash` and :func:`record_leaf`.

Two structures cover the same records. Each record hashes its predecessor's hash and its own
canonical content (the *chain*, kept for existing callers); and record ``seq`` is leaf ``seq - 1``
of an RFC 9162 Merkle tree whose heads the broker signs as C2SP checkpoints
(:mod:`shieldml.broker.tlog`) with a key kept outside its database. A chain can be recomputed by
whoever can write the database; a signed checkpoint cannot, and a checkpoint saved (published)
earlier must stay a prefix of every later one: :func:`verify_tree` checks a fetched log against
the latest checkpoint and a saved one.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shieldml.broker import tlog
from shieldml.errors import AuditChainError, FormatError

__all__ = [
    "GENESIS",
    "AuditProof",
    "AuditRecord",
    "ChainHead",
    "VerifiedTree",
    "canonical_data",
    "record_bytes",
    "record_hash",
    "record_leaf",
    "verify_chain",
    "verify_log",
    "verify_tree",
    "write_atomic",
]

GENESIS = "0" * 64


def canonical_data(data: Mapping[str, Any]) -> str:
    """A record's ``data`` as stored and hashed: canonical JSON (sorted keys, no spaces)."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"))


def record_bytes(seq: int, at: str, event: str, data: str) -> bytes:
    """The bytes a record commits to: ``canonical_json({"seq", "at", "event", "data"})`` with
    ``data`` its canonical JSON text. The chain hashes them after the previous hash; the Merkle
    tree's leaf is ``SHA-256(0x00 || these bytes)``."""
    body = json.dumps(
        {"seq": seq, "at": at, "event": event, "data": data}, sort_keys=True, separators=(",", ":")
    )
    return body.encode()


def record_hash(prev: str, seq: int, at: str, event: str, data: str) -> str:
    """Each audit record hashes its predecessor's hash and its own canonical content."""
    return hashlib.sha256(bytes.fromhex(prev) + record_bytes(seq, at, event, data)).digest().hex()


def record_leaf(seq: int, at: str, event: str, data: str) -> bytes:
    """The record's Merkle leaf hash (leaf index ``seq - 1``)."""
    return tlog.leaf_hash(record_bytes(seq, at, event, data))


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

    def leaf(self) -> bytes:
        return record_leaf(self.seq, self.at, self.event, canonical_data(self.data))

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
        data = canonical_data(r.data)
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
        write_atomic(checkpoint, json.dumps(verified.to_dict()))
    return verified


@dataclass(frozen=True)
class AuditProof:
    """One record, its inclusion proof and the signed checkpoint the proof leads to: what a
    release answer carries for its own record, and a receipt for each broker's release."""

    seq: int
    at: str
    event: str
    data: dict[str, Any]
    tree_size: int
    inclusion: tuple[bytes, ...]
    checkpoint: str  # the signed note

    def leaf(self) -> bytes:
        return record_leaf(self.seq, self.at, self.event, canonical_data(self.data))

    def to_dict(self) -> dict[str, Any]:
        return {
            "record": {"seq": self.seq, "at": self.at, "event": self.event, "data": self.data},
            "leaf_index": self.seq - 1,
            "tree_size": self.tree_size,
            "inclusion": [base64.b64encode(h).decode() for h in self.inclusion],
            "checkpoint": self.checkpoint,
        }

    @classmethod
    def from_dict(cls, d: Any) -> AuditProof:
        try:
            rec = d["record"]
            proof = cls(
                seq=rec["seq"],
                at=rec["at"],
                event=rec["event"],
                data=rec["data"],
                tree_size=d["tree_size"],
                inclusion=tuple(base64.b64decode(h, validate=True) for h in d["inclusion"]),
                checkpoint=d["checkpoint"],
            )
            index = d["leaf_index"]
        except (KeyError, TypeError, ValueError) as e:
            raise FormatError(f"audit proof: missing or malformed field {e}") from None
        if not (
            _is_int(proof.seq)
            and proof.seq >= 1
            and isinstance(proof.at, str)
            and isinstance(proof.event, str)
            and isinstance(proof.data, dict)
            and _is_int(proof.tree_size)
            and isinstance(proof.checkpoint, str)
            and index == proof.seq - 1
        ):
            raise FormatError("audit proof: a field has the wrong type or value")
        return proof

    def verify(self, verifiers: Sequence[tlog.NoteVerifier] | None = None) -> tlog.Checkpoint:
        """The checkpoint, once the record is shown to be in it. With ``verifiers``, one of them
        must have signed it (else :class:`AuditChainError`); without, only the proof is checked
        (the answer is self-consistent; who signed it is not)."""
        if verifiers is None:
            cp = tlog.Checkpoint.parse(tlog.split_note(self.checkpoint)[0])
        else:
            cp = tlog.open_checkpoint(self.checkpoint, verifiers)
        if cp.size != self.tree_size:
            raise AuditChainError(
                f"the proof is for a tree of {self.tree_size}, its checkpoint of {cp.size}",
                seq=self.seq,
            )
        try:
            tlog.verify_inclusion(self.leaf(), self.seq - 1, cp.size, self.inclusion, cp.root)
        except AuditChainError as e:
            raise AuditChainError(
                f"record {self.seq} is not in the signed tree of {cp.size}: {e.message}",
                seq=self.seq,
            ) from None
        return cp


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class VerifiedTree:
    """What :func:`verify_tree` established: the log's records up to ``checkpoint.size`` are the
    tree the checkpoint signs (and extend ``saved``, when one was given)."""

    records: int
    checkpoint: tlog.Checkpoint
    signed_by: list[str]
    saved: tlog.Checkpoint | None = None


def verify_tree(
    records: Iterable[AuditRecord],
    checkpoint: str,
    verifiers: Sequence[tlog.NoteVerifier],
    *,
    saved: str | None = None,
    consistency: Sequence[bytes] | None = None,
) -> VerifiedTree:
    """Verify a whole log against its latest signed ``checkpoint`` and, optionally, a checkpoint
    ``saved`` earlier (a signed note, from a file, a receipt or wherever it was published).

    Checks the chain (contiguous from 1, every hash), a signature of one of ``verifiers`` on each
    checkpoint, that the first ``size`` records hash to the signed root, and that the saved tree
    is a prefix of the latest one: by ``consistency`` (the broker's RFC 9162 proof, when given)
    and by recomputing its root from the records. Raises :class:`AuditChainError`.
    """
    recs = list(records)
    verify_chain(recs)
    text, signed_by = tlog.open_note(checkpoint, verifiers)
    cp = tlog.Checkpoint.parse(text)
    if cp.size > len(recs):
        raise AuditChainError(
            f"the signed checkpoint covers {cp.size} records, the log holds {len(recs)}: "
            "records were removed",
            seq=len(recs) + 1,
        )
    leaves = [r.leaf() for r in recs]
    if tlog.tree_hash(leaves[: cp.size]) != cp.root:
        raise AuditChainError(
            f"records 1 to {cp.size} do not hash to the root the broker signed: records were "
            "rewritten (or the checkpoint is of another log)"
        )
    old: tlog.Checkpoint | None = None
    if saved is not None:
        old = tlog.open_checkpoint(saved, verifiers)
        if old.origin != cp.origin:
            raise AuditChainError(
                f"the saved checkpoint is of log {old.origin!r}, the broker's of {cp.origin!r}"
            )
        if old.size > cp.size:
            raise AuditChainError(
                f"the saved checkpoint covers {old.size} records, the broker's latest only "
                f"{cp.size}: the log was rewound (records removed)",
                seq=cp.size + 1,
            )
        if consistency is not None:
            tlog.verify_consistency(old.size, cp.size, old.root, cp.root, consistency)
        if tlog.tree_hash(leaves[: old.size]) != old.root:
            raise AuditChainError(
                f"records 1 to {old.size} no longer hash to the saved checkpoint's root: "
                "records it covered were removed or rewritten"
            )
    return VerifiedTree(len(recs), cp, signed_by, old)


def check_policy_history(records: Iterable[AuditRecord]) -> None:
    """Each release must have applied the policy its key's last ``policy_set`` record set.

    The broker's rows are MAC'd, so an edited policy row refuses the release; what a MAC cannot
    tell is an *older* row of the same key put back (an earlier, laxer policy). Release records
    name the SHA-256 of the policy they were decided on (``policy_sha256``): one that differs
    from the last ``policy_set`` before it, or names a policy removed since, is an
    :class:`AuditChainError` at that record. Keys with no ``policy_set`` in the log (set before
    the log began) are not judged.
    """
    current: dict[str, str | None] = {}
    for r in records:
        name = r.data.get("name")
        if r.event == "policy_set" and isinstance(name, str):
            current[name] = str(r.data.get("sha256"))
        elif r.event in ("policy_removed", "key_removed") and isinstance(name, str):
            current[name] = None
        elif r.event == "release":
            applied = r.data.get("policy_sha256")
            if not isinstance(applied, dict):
                continue
            for key, digest in applied.items():
                if key in current and current[key] != digest:
                    want = current[key] or "none (removed)"
                    raise AuditChainError(
                        f"release of key {key!r} applied policy sha256 {digest}, but the last "
                        f"policy set for it is {want}: an older policy row was put back",
                        seq=r.seq,
                    )


def write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` by ``text`` all or nothing (a checkpoint file)."""
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
