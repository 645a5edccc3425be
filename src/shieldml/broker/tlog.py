"""A transparency log's pieces: RFC 9162 Merkle trees, proofs, C2SP checkpoints and signed notes.

Pure Python (``hashlib`` and ``cryptography``'s Ed25519): the broker's storage uses it to keep
its audit log as a tree, and owners, runners and receipt verifiers use it to check what a broker
answered without trusting its database.

Hashing (RFC 9162 section 2.1.1): a leaf is ``SHA-256(0x00 || data)``, an inner node
``SHA-256(0x01 || left || right)``, the empty tree ``SHA-256("")``; a tree of ``n > 1`` leaves
splits at the largest power of two below ``n``. Inclusion and consistency proofs are generated
and verified as RFC 9162 sections 2.1.3 and 2.1.4 say.

Checkpoints follow C2SP tlog-checkpoint (origin line, decimal tree size, base64 root hash, optional
extension lines), signed as C2SP signed notes with Ed25519: a blank line, then one line
``— <key name> <base64(key hash[4] || signature[64])>`` per signature, where the key hash is the
first four bytes of ``SHA-256(key name || 0x0A || 0x01 || public key[32])``. A verifier key is
written ``<name>+<hex key hash>+<base64(0x01 || public key)>``.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import hmac
import os
import re
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from shieldml.errors import AuditChainError, FormatError, KeyFileError

__all__ = [
    "EMPTY_ROOT",
    "Checkpoint",
    "Frontier",
    "NoteSigner",
    "NoteVerifier",
    "consistency_proof",
    "inclusion_proof",
    "leaf_hash",
    "node_hash",
    "open_checkpoint",
    "open_note",
    "split_note",
    "tree_hash",
    "verify_consistency",
    "verify_inclusion",
]

EMPTY_ROOT = hashlib.sha256(b"").digest()
HASH_SIZE = 32
ED25519 = 0x01  # the signed-note signature type of Ed25519
SIG_PREFIX = "\u2014 "  # an em dash and a space start every signature line
MAX_SIGNATURES = 16  # a note with more signature lines is refused (C2SP lets verifiers bound it)
MAX_PROOF = 64  # a proof in a tree of at most 2**63 leaves has at most 63 hashes (+1, see below)
MAX_TREE = (1 << 63) - 1
_KEY_NAME = re.compile(r"[\x21-\x2a\x2c-\x7e]+")  # printable ASCII, no space, no '+'


def leaf_hash(data: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def _split(n: int) -> int:
    """The largest power of two smaller than ``n`` (n >= 2)."""
    return 1 << ((n - 1).bit_length() - 1)


@dataclass(frozen=True)
class Frontier:
    """The right edge of a tree: the roots of its perfect subtrees, one per set bit of ``size``,
    largest (leftmost) first. Enough to append a leaf and compute the root in O(log n), and its
    reverse is the inclusion proof of the next leaf appended (RFC 9162 PATH of the last leaf)."""

    size: int = 0
    hashes: tuple[bytes, ...] = ()

    def __post_init__(self) -> None:
        if (
            not 0 <= self.size <= MAX_TREE
            or len(self.hashes) != self.size.bit_count()
            or any(len(h) != HASH_SIZE for h in self.hashes)
        ):
            raise FormatError(f"a tree frontier of size {self.size} has one hash per set bit")

    def append(self, leaf: bytes) -> Frontier:
        hashes = list(self.hashes)
        h, s = leaf, self.size
        while s & 1:
            h = node_hash(hashes.pop(), h)
            s >>= 1
        hashes.append(h)
        return Frontier(self.size + 1, tuple(hashes))

    def root(self) -> bytes:
        if not self.hashes:
            return EMPTY_ROOT
        h = self.hashes[-1]
        for x in reversed(self.hashes[:-1]):
            h = node_hash(x, h)
        return h

    def next_inclusion_proof(self) -> list[bytes]:
        """The inclusion proof of leaf ``size`` in the tree of ``size + 1`` leaves."""
        return list(reversed(self.hashes))

    @classmethod
    def of(cls, leaves: Iterable[bytes]) -> Frontier:
        f = cls()
        for leaf in leaves:
            f = f.append(leaf)
        return f


def tree_hash(leaves: Sequence[bytes]) -> bytes:
    """MTH of a list of leaf hashes (O(n), constant memory beyond the frontier)."""
    return Frontier.of(leaves).root()


def inclusion_proof(index: int, leaves: Sequence[bytes]) -> list[bytes]:
    """PATH(index, D[n]) over the leaf hashes ``leaves`` (RFC 9162 section 2.1.3.1)."""
    if not 0 <= index < len(leaves):
        raise ValueError(f"leaf {index} is not in a tree of {len(leaves)}")
    return _path(index, leaves, 0, len(leaves))


def _path(m: int, leaves: Sequence[bytes], lo: int, hi: int) -> list[bytes]:
    n = hi - lo
    if n == 1:
        return []
    k = _split(n)
    if m < k:
        return [*_path(m, leaves, lo, lo + k), tree_hash(leaves[lo + k : hi])]
    return [*_path(m - k, leaves, lo + k, hi), tree_hash(leaves[lo : lo + k])]


def consistency_proof(first: int, leaves: Sequence[bytes]) -> list[bytes]:
    """PROOF(first, D[n]) over the leaf hashes ``leaves`` (RFC 9162 section 2.1.4.1); empty for
    ``first`` 0 or ``n`` (nothing to prove)."""
    if not 0 <= first <= len(leaves):
        raise ValueError(f"no consistency proof from {first} to {len(leaves)}")
    if first == 0:
        return []
    return _subproof(first, leaves, 0, len(leaves), True)


def _subproof(m: int, leaves: Sequence[bytes], lo: int, hi: int, whole: bool) -> list[bytes]:
    n = hi - lo
    if m == n:
        return [] if whole else [tree_hash(leaves[lo:hi])]
    k = _split(n)
    if m <= k:
        return [*_subproof(m, leaves, lo, lo + k, whole), tree_hash(leaves[lo + k : hi])]
    return [*_subproof(m - k, leaves, lo + k, hi, False), tree_hash(leaves[lo : lo + k])]


def _check_proof(proof: Sequence[bytes]) -> None:
    if len(proof) > MAX_PROOF or any(
        not isinstance(p, bytes) or len(p) != HASH_SIZE for p in proof
    ):
        raise AuditChainError("a proof holds at most 64 hashes of 32 bytes")


def verify_inclusion(
    leaf: bytes, index: int, size: int, proof: Sequence[bytes], root: bytes
) -> None:
    """RFC 9162 section 2.1.3.2; raises :class:`AuditChainError` unless ``leaf`` (a leaf hash) is
    leaf ``index`` of the tree of ``size`` leaves whose root is ``root``."""
    _check_proof(proof)
    if not 0 <= index < size:
        raise AuditChainError(f"leaf {index}: not in a tree of {size} leaves")
    fn, sn, r = index, size - 1, leaf
    for p in proof:
        if sn == 0:
            raise AuditChainError(f"leaf {index}: inclusion proof too long")
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while fn and not fn & 1:
                    fn, sn = fn >> 1, sn >> 1
        else:
            r = node_hash(r, p)
        fn, sn = fn >> 1, sn >> 1
    if sn != 0 or not secrets.compare_digest(r, root):
        raise AuditChainError(
            f"leaf {index}: the inclusion proof does not lead to the root of the tree of {size}",
        )


def verify_consistency(
    first: int, second: int, first_root: bytes, second_root: bytes, proof: Sequence[bytes]
) -> None:
    """RFC 9162 section 2.1.4.2; raises :class:`AuditChainError` unless the tree of ``first``
    leaves with root ``first_root`` is a prefix of the tree of ``second`` with ``second_root``."""
    _check_proof(proof)
    where = f"trees of {first} and {second}"
    if not 0 <= first <= second:
        raise AuditChainError(f"{where}: the second tree is smaller: rewound")
    if first == 0:  # the empty tree is a prefix of every tree
        if proof or not secrets.compare_digest(first_root, EMPTY_ROOT):
            raise AuditChainError(f"{where}: not the empty tree's root")
        return
    if first == second:
        if proof or not secrets.compare_digest(first_root, second_root):
            raise AuditChainError(f"{where}: two different roots for the same size: a fork")
        return
    if not proof:
        raise AuditChainError(f"{where}: empty consistency proof")
    path = list(proof)
    if first & (first - 1) == 0:  # first is a power of two: its root is a node of the path
        path.insert(0, first_root)
    fn, sn = first - 1, second - 1
    while fn & 1:
        fn, sn = fn >> 1, sn >> 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            raise AuditChainError(f"{where}: consistency proof too long")
        if fn & 1 or fn == sn:
            fr, sr = node_hash(c, fr), node_hash(c, sr)
            if not fn & 1:
                while fn and not fn & 1:
                    fn, sn = fn >> 1, sn >> 1
        else:
            sr = node_hash(sr, c)
        fn, sn = fn >> 1, sn >> 1
    if (
        sn != 0
        or not secrets.compare_digest(fr, first_root)
        or not secrets.compare_digest(sr, second_root)
    ):
        raise AuditChainError(
            f"{where}: the consistency proof fails: the later tree does not extend the earlier one "
            "(records removed or rewritten)",
        )


# -- checkpoints --------------------------------------------------------------------------------
def _b64decode(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        raise FormatError(f"{what} is not base64") from None


@dataclass(frozen=True)
class Checkpoint:
    """A tree head as C2SP tlog-checkpoint writes it: ``origin``, ``size``, ``root``."""

    origin: str
    size: int
    root: bytes
    extensions: tuple[str, ...] = ()

    def body(self) -> str:
        lines = [
            self.origin,
            str(self.size),
            base64.b64encode(self.root).decode(),
            *self.extensions,
        ]
        return "".join(line + "\n" for line in lines)

    @classmethod
    def parse(cls, body: str) -> Checkpoint:
        """The checkpoint of a note's text (the part a signature covers)."""
        if not body.endswith("\n"):
            raise FormatError("a checkpoint ends with a newline")
        lines = body[:-1].split("\n")
        if len(lines) < 3:
            raise FormatError("a checkpoint has an origin, a tree size and a root hash line")
        origin, size, root, *ext = lines
        if not origin or any(not e for e in ext):
            raise FormatError("a checkpoint's origin and extension lines are not empty")
        if not re.fullmatch(r"0|[1-9][0-9]{0,18}", size) or int(size) > MAX_TREE:
            raise FormatError(f"checkpoint tree size {size[:32]!r} is not a decimal size")
        raw = _b64decode(root, "the checkpoint's root hash")
        if len(raw) != HASH_SIZE:
            raise FormatError("a checkpoint's root hash has 32 bytes")
        return cls(origin, int(size), raw, tuple(ext))


def _key_hash(name: str, public: bytes) -> bytes:
    return hashlib.sha256(name.encode() + b"\n" + bytes([ED25519]) + public).digest()[:4]


def _check_key_name(name: str) -> None:
    if not _KEY_NAME.fullmatch(name):
        raise FormatError(f"note key name {name[:64]!r}: printable ASCII without spaces or '+'")


class NoteVerifier:
    """An Ed25519 signed-note verifier key, from its string ``name+hash+base64(0x01||key)``."""

    def __init__(self, name: str, public: bytes) -> None:
        _check_key_name(name)
        if len(public) != 32:
            raise FormatError("an Ed25519 verifier key has 32 bytes")
        self.name = name
        self.public = public
        self.key_hash = _key_hash(name, public)
        self._key = Ed25519PublicKey.from_public_bytes(public)

    @classmethod
    def parse(cls, vkey: str) -> NoteVerifier:
        parts = vkey.strip().split("+", 2)
        if len(parts) != 3 or not re.fullmatch(r"[0-9a-f]{8}", parts[1]):
            raise FormatError("a verifier key reads <name>+<8 hex digits>+<base64 key>")
        name, hash_hex, key = parts
        raw = _b64decode(key, "the verifier key")
        if len(raw) != 33 or raw[0] != ED25519:
            raise FormatError("only Ed25519 verifier keys (type 0x01, 32 bytes) are supported")
        v = cls(name, raw[1:])
        if v.key_hash.hex() != hash_hex:
            raise FormatError(f"verifier key {name!r}: its key hash does not match the key")
        return v

    def vkey(self) -> str:
        return f"{self.name}+{self.key_hash.hex()}+{base64.b64encode(bytes([ED25519]) + self.public).decode()}"

    def verify(self, text: bytes, signature: bytes) -> bool:
        try:
            self._key.verify(signature, text)
        except InvalidSignature:
            return False
        return True


class NoteSigner:
    """The log's Ed25519 signing key. Its file (mode 0600) holds one line,
    ``PRIVATE+KEY+<name>+<hex key hash>+<base64(0x01 || 32-byte seed)>``."""

    def __init__(self, name: str, seed: bytes) -> None:
        _check_key_name(name)
        self.name = name
        self._key = Ed25519PrivateKey.from_private_bytes(seed)
        self.verifier = NoteVerifier(name, self._key.public_key().public_bytes_raw())

    def sign(self, body: str) -> str:
        """The signed note of ``body`` (which ends with a newline)."""
        if not body.endswith("\n") or "\n\n" in body:
            raise FormatError("a note's text ends with one newline and has no blank line")
        sig = self._key.sign(body.encode())
        line = base64.b64encode(self.verifier.key_hash + sig).decode()
        return f"{body}\n{SIG_PREFIX}{self.name} {line}\n"

    def derive_key(self, label: bytes) -> bytes:
        """A 32-byte secret for ``label``, derived from the signing key (HMAC-SHA256 of the
        label under the seed): whoever can sign for the log, and nobody else, has it."""
        return hmac.new(self._key.private_bytes_raw(), label, "sha256").digest()

    def to_text(self) -> str:
        seed = self._key.private_bytes_raw()
        return (
            f"PRIVATE+KEY+{self.name}+{self.verifier.key_hash.hex()}+"
            f"{base64.b64encode(bytes([ED25519]) + seed).decode()}\n"
        )

    @classmethod
    def parse(cls, text: str) -> NoteSigner:
        parts = text.strip().split("+", 4)
        if len(parts) != 5 or parts[:2] != ["PRIVATE", "KEY"]:
            raise FormatError("a signing key reads PRIVATE+KEY+<name>+<hash>+<base64 key>")
        raw = _b64decode(parts[4], "the signing key")
        if len(raw) != 33 or raw[0] != ED25519:
            raise FormatError("only Ed25519 signing keys (type 0x01) are supported")
        signer = cls(parts[2], raw[1:])
        if signer.verifier.key_hash.hex() != parts[3]:
            raise FormatError("the signing key's hash does not match the key")
        return signer

    @classmethod
    def load_or_create(cls, path: Path, name: str | None = None) -> NoteSigner:
        """The key in ``path``, created (mode 0600) when absent. Replicas sharing a state
        directory may start at once: the file appears complete or not at all (written aside,
        then linked into place, which fails if another process got there first)."""
        if not path.exists():
            signer = cls(name or f"shieldml-broker-{secrets.token_hex(8)}", secrets.token_bytes(32))
            tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                with os.fdopen(fd, "w") as f:
                    f.write(signer.to_text())
                    f.flush()
                    os.fsync(f.fileno())
                with contextlib.suppress(FileExistsError):  # another process was first: theirs
                    os.link(tmp, path)
            finally:
                tmp.unlink()
        try:
            return cls.parse(path.read_text())
        except (OSError, UnicodeDecodeError, FormatError) as e:
            raise KeyFileError(f"{path}: not a log signing key: {e}") from None


def open_note(note: str, verifiers: Sequence[NoteVerifier]) -> tuple[str, list[str]]:
    """The text of a signed note and the names of the ``verifiers`` whose signature on it
    verifies; raises :class:`AuditChainError` when none does. Signatures by other keys are
    skipped, as C2SP signed-note says."""
    text, sigs = split_note(note)
    good: list[str] = []
    for name, blob in sigs:
        for v in verifiers:
            if v.name == name and blob[:4] == v.key_hash and v.verify(text.encode(), blob[4:]):
                good.append(name)
    if not good:
        names = ", ".join(sorted({n for n, _ in sigs})) or "none"
        raise AuditChainError(
            f"checkpoint: no signature by a trusted log key verifies (signed by: {names}); a "
            "forged checkpoint or one of another log",
        )
    return text, sorted(set(good))


def split_note(note: str) -> tuple[str, list[tuple[str, bytes]]]:
    """A signed note's text and its signature lines ``(key name, key hash || signature)``,
    nothing verified."""
    if not isinstance(note, str) or not note.endswith("\n"):
        raise FormatError("a signed note ends with a newline")
    cut = note.rfind("\n\n")
    if cut < 0:
        raise FormatError("a signed note has a blank line before its signatures")
    text, block = note[: cut + 1], note[cut + 2 :]
    sigs: list[tuple[str, bytes]] = []
    lines = block[:-1].split("\n")
    if len(lines) > MAX_SIGNATURES:
        raise FormatError(f"a signed note with more than {MAX_SIGNATURES} signatures")
    for line in lines:
        if not line.startswith(SIG_PREFIX):
            raise FormatError("a signature line starts with an em dash and a space")
        name, sep, blob = line[len(SIG_PREFIX) :].partition(" ")
        if not sep or not name or " " in blob:
            raise FormatError("a signature line reads '— <key name> <base64>'")
        raw = _b64decode(blob, "a note signature")
        if len(raw) < 5:
            raise FormatError("a note signature holds a key hash and a signature")
        sigs.append((name, raw))
    return text, sigs


def open_checkpoint(note: str, verifiers: Sequence[NoteVerifier]) -> Checkpoint:
    """A signed checkpoint whose signature by one of ``verifiers`` verifies, parsed."""
    text, _ = open_note(note, verifiers)
    return Checkpoint.parse(text)
