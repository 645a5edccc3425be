"""The ``stream`` format: a shieldml header followed by a Tink AesGcmHkdfStreaming ciphertext.

Layout (all integers big-endian; see ``docs/formats/stream.md``)::

    offset  size  field
    0       8     magic "SHIELDML"
    8       1     version (1)
    9       4     ciphertext segment size (1 MiB)
    13      16    key id = HMAC-SHA256(key, "shieldml/v1 stream key id")[:16]
    29      ...   Tink AesGcmHkdfStreaming ciphertext (HKDF-SHA256, 32-byte derived key),
                  associated data = the 29 header bytes || UTF-8 bound path

Tink ciphertext::

    1 byte header length (40) || 32-byte HKDF salt || 7-byte nonce prefix || segments
    segment i = AES-256-GCM(derived key, nonce prefix || i (u32 BE) || last (u8), no AAD)
    segment 0 holds seg - 56 plaintext bytes, the others seg - 16; only the last may be shorter.
"""

from __future__ import annotations

import hmac
import io
import os
import secrets
import struct
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from shieldml.errors import FormatError, IntegrityError, UnsupportedVersionError, WrongKeyError
from shieldml.files._common import Format, MappedSource, Sink, check_key, key_id, write_all
from shieldml.files._reader import ProtectedFile

MAGIC = b"SHIELDML"
VERSION = 1
HEADER = struct.Struct(">8sBI16s")  # magic, version, segment size, key id
HEADER_SIZE = HEADER.size  # 29
SEGMENT_SIZE = 1 << 20
MIN_SEGMENT_SIZE = 1 << 12
MAX_SEGMENT_SIZE = 1 << 26
MAX_BOUND_PATH = 4096

TAG_SIZE = 16
SALT_SIZE = 32  # = derived key size in Tink's AesGcmHkdfStreaming
NONCE_PREFIX_SIZE = 7
TINK_HEADER_SIZE = 1 + SALT_SIZE + NONCE_PREFIX_SIZE  # 40
_NONCE_TAIL = struct.Struct(">IB")
MAX_SEGMENTS = 1 << 32


@dataclass(frozen=True)
class StreamHeader:
    """The shieldml header of a ``stream`` file (not authenticated on its own: it is in the AD)."""

    version: int
    segment_size: int
    key_id: bytes

    @classmethod
    def from_bytes(cls, data: bytes, name: str = "<stream>") -> StreamHeader:
        if len(data) < HEADER_SIZE or data[:8] != MAGIC:
            raise FormatError(f"{name}: not a shieldml stream file")
        _magic, version, seg, kid = HEADER.unpack_from(data)
        if version != VERSION:
            raise UnsupportedVersionError(
                f"{name}: stream format version {version} is not supported"
            )
        if not MIN_SEGMENT_SIZE <= seg <= MAX_SEGMENT_SIZE:
            raise FormatError(f"{name}: segment size {seg} out of range")
        return cls(version, seg, kid)

    def to_bytes(self) -> bytes:
        return HEADER.pack(MAGIC, self.version, self.segment_size, self.key_id)


def _bound_path_bytes(bind: str) -> bytes:
    if not isinstance(bind, str):
        raise TypeError("bound path must be a str")
    raw = bind.encode("utf-8")
    if len(raw) > MAX_BOUND_PATH or "\0" in bind:
        raise ValueError(f"bound path too long or contains NUL: {bind!r}")
    return raw


def derive_segment_key(key: bytes, salt: bytes, header: bytes, bind: str) -> AESGCM:
    """Tink's per-file key: HKDF-SHA256(ikm=key, salt, info=associated data), 32 bytes."""
    info = header + _bound_path_bytes(bind)
    derived = HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=info).derive(key)
    return AESGCM(derived)


def ciphertext_size(plaintext_size: int, segment_size: int = SEGMENT_SIZE) -> int:
    """Size of the ``stream`` file :class:`StreamWriter` writes for ``plaintext_size`` bytes."""
    first = segment_size - TINK_HEADER_SIZE - TAG_SIZE
    rest = max(0, plaintext_size - first)
    count = 1 + -(-rest // (segment_size - TAG_SIZE))
    return HEADER_SIZE + TINK_HEADER_SIZE + plaintext_size + TAG_SIZE * count


class Geometry:
    """Where each segment lies, in the file and in the plaintext."""

    def __init__(self, segment_size: int, ciphertext_size: int) -> None:
        self.seg = segment_size
        self.first_plain = segment_size - TINK_HEADER_SIZE - TAG_SIZE
        self.plain = segment_size - TAG_SIZE
        self.count = -(-ciphertext_size // segment_size)  # ceil; ciphertext counts the Tink header
        self.last_ct = ciphertext_size - (self.count - 1) * segment_size
        if self.count == 1:
            self.last_ct -= TINK_HEADER_SIZE
        self.valid = self.last_ct >= TAG_SIZE and self.count <= MAX_SEGMENTS
        self.size = ciphertext_size - TINK_HEADER_SIZE - TAG_SIZE * self.count

    def index(self, pos: int) -> int:
        if pos < self.first_plain:
            return 0
        return 1 + (pos - self.first_plain) // self.plain

    def plain_start(self, i: int) -> int:
        return 0 if i == 0 else self.first_plain + (i - 1) * self.plain

    def plain_len(self, i: int) -> int:
        if i == self.count - 1:
            return self.last_ct - TAG_SIZE
        return self.first_plain if i == 0 else self.plain

    def ct_start(self, i: int) -> int:
        """Offset of segment i from the start of the Tink ciphertext."""
        return TINK_HEADER_SIZE if i == 0 else i * self.seg


class StreamReader(ProtectedFile):
    """Random-access reader for ``stream`` files."""

    format = Format.STREAM

    def __init__(self, path: str | os.PathLike[str], key: bytes, bind: str) -> None:
        src = MappedSource(path)
        super().__init__(src)
        try:
            self._open(check_key(key, Format.STREAM), bind)
        except BaseException:
            src.close()
            raise

    def _open(self, key: bytes, bind: str) -> None:
        name = self._src.name
        raw = self._src.read(0, HEADER_SIZE + TINK_HEADER_SIZE)
        self.header = StreamHeader.from_bytes(raw, name)
        if not hmac.compare_digest(self.header.key_id, key_id(key)):
            raise WrongKeyError(name, expected=self.header.key_id.hex(), actual=key_id(key).hex())
        self.bound_path = bind
        ct_size = self._src.size - HEADER_SIZE
        self._geo = Geometry(self.header.segment_size, ct_size)
        if len(raw) < HEADER_SIZE + TINK_HEADER_SIZE or not self._geo.valid:
            raise IntegrityError(name, "truncated")
        tink = raw[HEADER_SIZE:]
        if tink[0] != TINK_HEADER_SIZE:
            raise IntegrityError(name, "stream header")
        self._prefix = tink[1 + SALT_SIZE :]
        self._aead = derive_segment_key(key, tink[1 : 1 + SALT_SIZE], raw[:HEADER_SIZE], bind)
        self._buf = bytearray(self._geo.plain)
        self._buf_index = -1
        self._ct: bytearray | None = None
        self._authenticated = False

    @property
    def size(self) -> int:
        return self._geo.size

    @property
    def segment_count(self) -> int:
        return self._geo.count

    def decrypt_segment(self, i: int, out: memoryview) -> int:
        """Authenticate and decrypt segment ``i`` into ``out``; return its plaintext length."""
        geo = self._geo
        n = geo.plain_len(i)
        last = i == geo.count - 1
        nonce = self._prefix + _NONCE_TAIL.pack(i, last)
        # The ciphertext is copied into private memory first: AES-GCM may read its input more
        # than once (GHASH, then the counter-mode pass), and a shared mapping of a host-writable
        # file could change in between, so the tag would vouch for other bytes than those decrypted.
        if self._ct is None:
            self._ct = bytearray(geo.seg)
        with memoryview(self._ct)[: n + TAG_SIZE] as ct:
            if self._src.readv(HEADER_SIZE + geo.ct_start(i), [ct]) != n + TAG_SIZE:
                out[:n] = bytes(n)
                raise IntegrityError(self.name, f"segment {i}", reason="truncated")
            try:
                self._aead.decrypt_into(nonce, ct, None, out[:n])
            except InvalidTag:
                out[:n] = bytes(n)  # never leave unauthenticated plaintext behind
                raise IntegrityError(self.name, f"segment {i}", hint=self._hint()) from None
        self._authenticated = True
        return n

    def _hint(self) -> str:
        # The bound path is part of every segment's key: once one segment authenticated, key and
        # path are right and only a change to the file is left.
        if self._authenticated:
            return "the file was modified (other segments authenticated under this key and path)"
        return (
            "wrong key, wrong --bind path, or modified: the key id matches this file, so most "
            "likely it was encrypted for another path (give the --bind used at encryption)"
        )

    def _read_at(self, pos: int, out: memoryview) -> int:
        geo = self._geo
        i = geo.index(pos)
        off = pos - geo.plain_start(i)
        n = geo.plain_len(i)
        if off == 0 and len(out) >= n:
            return self.decrypt_segment(i, out)
        if self._buf_index != i:
            self._buf_index = -1
            with memoryview(self._buf) as buf:
                self.decrypt_segment(i, buf)
            self._buf_index = i
        k = min(len(out), n - off)
        out[:k] = self._buf[off : off + k]
        return k


class StreamWriter(io.RawIOBase):
    """Streaming encryptor: writes a ``stream`` file to ``sink`` as data arrives.

    Memory use is one segment. The file is complete only after :meth:`close`; a writer that is
    abandoned leaves an unterminated ciphertext that every reader refuses.
    """

    def __init__(
        self, sink: Sink, key: bytes, bind: str, *, segment_size: int = SEGMENT_SIZE
    ) -> None:
        super().__init__()
        self._aborted = True  # until construction succeeds
        key = check_key(key, Format.STREAM)
        header = StreamHeader(VERSION, segment_size, key_id(key))
        StreamHeader.from_bytes(header.to_bytes())  # validates the segment size
        self._sink = sink
        hdr = header.to_bytes()
        salt = secrets.token_bytes(SALT_SIZE)
        self._prefix = secrets.token_bytes(NONCE_PREFIX_SIZE)
        self._aead = derive_segment_key(key, salt, hdr, bind)
        self._geo = Geometry(segment_size, TINK_HEADER_SIZE + TAG_SIZE)
        self._pending = bytearray(self._geo.plain)
        self._fill = 0
        self._index = 0
        self._out = bytearray(segment_size)
        write_all(self._sink, hdr + bytes([TINK_HEADER_SIZE]) + salt + self._prefix)
        self.bytes_written = 0
        self._aborted = False

    def writable(self) -> bool:
        return True

    def abort(self) -> None:
        """Close without writing the final segment, leaving an unterminated (invalid) file."""
        self._aborted = True
        self.close()

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None:
            self.abort()
        else:
            self.close()

    def __del__(self) -> None:
        # Garbage collection of an unclosed writer must never finalise a partial file.
        if not self.closed:
            self.abort()

    def _capacity(self) -> int:
        return self._geo.first_plain if self._index == 0 else self._geo.plain

    def _flush_segment(self, data: Any, last: bool) -> None:
        if self._index >= MAX_SEGMENTS:
            raise ValueError("file too large for the stream format")
        nonce = self._prefix + _NONCE_TAIL.pack(self._index, last)
        n = len(data)
        with memoryview(self._out) as out, out[: n + TAG_SIZE] as ct:
            self._aead.encrypt_into(nonce, data, None, ct)
            write_all(self._sink, ct)
        self._index += 1

    def write(self, data: Any) -> int:
        if self.closed:
            raise ValueError("write to closed file")
        with memoryview(data) as raw, raw.cast("B") as view:
            total = len(view)
            pos = 0
            while pos < total:
                cap = self._capacity()
                # Every view below is released by its `with`, also when the sink raises: a slice
                # left alive in a traceback would keep the caller's buffer (say a memory map of
                # the input) exported, and closing it would fail over the real error.
                if self._fill == cap:  # full and more data follows: not the last segment
                    with memoryview(self._pending) as pend, pend[:cap] as seg:
                        self._flush_segment(seg, last=False)
                    self._fill = 0
                    continue
                if self._fill == 0 and total - pos > cap:  # a whole segment straight from input
                    with view[pos : pos + cap] as seg:
                        self._flush_segment(seg, last=False)
                    pos += cap
                    continue
                k = min(cap - self._fill, total - pos)
                self._pending[self._fill : self._fill + k] = view[pos : pos + k]
                self._fill += k
                pos += k
        self.bytes_written += total
        return total

    def close(self) -> None:
        if self.closed:
            return
        try:
            if not self._aborted:  # a failed final write is not retried: closed either way
                with memoryview(self._pending) as pend, pend[: self._fill] as seg:
                    self._flush_segment(seg, last=True)
                self._sink.flush()
        finally:
            super().close()


def _read_full(src: Any, view: memoryview) -> int:
    """Fill ``view`` from the binary file ``src``; fewer bytes only at its end."""
    done = 0
    while done < len(view):
        with view[done:] as rest:
            n = src.readinto(rest)
        if not n:
            break
        done += n
    return done


def decrypt_sequential(
    src: Any,
    sink: Sink,
    key: bytes,
    bind: str,
    name: str,
    progress: Any = None,
) -> int:
    """Decrypt a ``stream`` file read start to end from ``src`` (a pipe, say) into ``sink``.

    Needs no seeking and holds two segments in memory: a segment is decrypted once the next one
    (or the end of the input) has been read, so that it is known whether it must be the final
    one. A segment reaches ``sink`` only after its tag verified; on a failure later on,
    ``sink`` holds an authenticated *prefix* of the plaintext and :class:`IntegrityError` is
    raised (truncation, extension, reordering and tampering all fail this way). Returns the
    number of plaintext bytes written.
    """
    key = check_key(key, Format.STREAM)
    head = bytearray(HEADER_SIZE + TINK_HEADER_SIZE)
    with memoryview(head) as hv:
        got = _read_full(src, hv)
    header = StreamHeader.from_bytes(bytes(head[:got]), name)
    if not hmac.compare_digest(header.key_id, key_id(key)):
        raise WrongKeyError(name, expected=header.key_id.hex(), actual=key_id(key).hex())
    if got < len(head):
        raise IntegrityError(name, "header", reason="truncated")
    if head[HEADER_SIZE] != TINK_HEADER_SIZE:
        raise IntegrityError(name, "stream header")
    salt = bytes(head[HEADER_SIZE + 1 : HEADER_SIZE + 1 + SALT_SIZE])
    prefix = bytes(head[HEADER_SIZE + 1 + SALT_SIZE :])
    aead = derive_segment_key(key, salt, bytes(head[:HEADER_SIZE]), bind)
    seg = header.segment_size
    cur, nxt, plain = bytearray(seg), bytearray(seg), bytearray(seg)
    cap = seg - TINK_HEADER_SIZE  # segment 0 shares the first ciphertext segment with the header
    with memoryview(cur) as cv, cv[:cap] as first:
        n = _read_full(src, first)
    index = 0
    total = 0
    while True:
        last = n < cap
        m = 0
        if not last:
            with memoryview(nxt) as nv:
                m = _read_full(src, nv)
            last = m == 0
        where = f"segment {index}"
        if n < TAG_SIZE:
            raise IntegrityError(name, where, reason="truncated")
        if index >= MAX_SEGMENTS:
            raise IntegrityError(name, where, reason="too many segments")
        nonce = prefix + _NONCE_TAIL.pack(index, last)
        k = n - TAG_SIZE
        with memoryview(cur) as cv, cv[:n] as ct, memoryview(plain) as pv, pv[:k] as out:
            try:
                aead.decrypt_into(nonce, ct, None, out)
            except InvalidTag:
                out[:] = bytes(k)  # never leave unauthenticated plaintext behind
                hint = (
                    "the input was truncated or modified after the part that authenticated"
                    if index
                    else "wrong key, wrong --bind path, or modified: the key id matches, so most "
                    "likely it was encrypted for another path (give the --bind used at encryption)"
                )
                raise IntegrityError(name, where, hint=hint) from None
            write_all(sink, out)
        total += k
        if progress:
            progress(k)
        if last:
            return total
        cur, nxt = nxt, cur
        n, cap = m, seg
        index += 1
