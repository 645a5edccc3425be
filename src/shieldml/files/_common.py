"""Shared pieces of the protected-file formats: format names, keys, the mapped ciphertext source."""

from __future__ import annotations

import enum
import errno
import hashlib
import hmac
import io
import mmap
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, TypeAlias

from shieldml.errors import KeyFileError, OutputExistsError

#: Called with the number of plaintext bytes just processed; used for progress bars.
ProgressCallback: TypeAlias = Callable[[int], None]
StrPath: TypeAlias = str | os.PathLike[str]


class Sink(Protocol):
    """Where a streaming writer puts ciphertext: a binary file or anything with these methods
    (``seek`` only for ``gramine-pf``)."""

    def write(self, data: Any, /) -> int | None: ...

    def seek(self, offset: int, whence: int = ..., /) -> int: ...

    def flush(self) -> None: ...


def write_all(sink: Sink, data: Any) -> None:
    """``sink.write(data)``, continued after a short count; a write of 0 bytes is an error.

    Buffered files never write short; a raw file (``buffering=0``) may. A ``None`` answer is
    taken as complete (sinks that discard, or count elsewhere, answer nothing).
    """
    n = sink.write(data)
    if n is None or (type(data) is bytes and n == len(data)):
        return
    with memoryview(data) as raw:
        total = raw.nbytes
        if n == total:
            return
        with raw.cast("B") as view:
            done = 0
            while True:
                if not n:
                    raise OSError(errno.EIO, "the system wrote 0 bytes (no progress)")
                done += n
                if done >= total:
                    return
                with view[done:] as rest:
                    n = sink.write(rest)


class Format(enum.StrEnum):
    """The protected-file formats shieldml reads and writes."""

    STREAM = "stream"
    GRAMINE_PF = "gramine-pf"

    @property
    def key_size(self) -> int:
        """Size in bytes of a raw key file for this format."""
        return 32 if self is Format.STREAM else 16


def generate_key(fmt: Format = Format.STREAM) -> bytes:
    """A fresh random key of the right size for ``fmt`` (32 bytes for stream, 16 for gramine-pf)."""
    return secrets.token_bytes(fmt.key_size)


def key_id(key: bytes) -> bytes:
    """The 16-byte public identifier of a stream key, stored in the file header.

    It is an HMAC of a fixed label under the key, so it reveals nothing about the key while letting
    a reader say "wrong key" before decrypting anything.
    """
    return hmac.new(key, b"shieldml/v1 stream key id", hashlib.sha256).digest()[:16]


def write_key_file(path: StrPath, key: bytes) -> None:
    """Write ``key`` as a raw key file with mode 0600; never overwrites an existing file."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        raise OutputExistsError(
            f"{os.fspath(path)}: already exists; refusing to overwrite a key",
            hint="choose another path or remove the old key deliberately",
        ) from None
    except OSError as e:
        raise KeyFileError(f"{os.fspath(path)}: cannot create key file: {e.strerror}") from e
    with os.fdopen(fd, "wb") as f:
        f.write(key)


class _FileKey(bytes):
    """Key bytes read by :func:`load_key`, remembering their file for error messages."""

    source: str


def key_source(key: object) -> str | None:
    """The key file ``key`` was read from by :func:`load_key`, if it was."""
    return getattr(key, "source", None) if isinstance(key, _FileKey) else None


def load_key(path: StrPath, fmt: Format | None = None) -> bytes:
    """Read a raw key file and check its size against ``fmt`` (or against any known format).

    The result is ``bytes`` that also remember ``path``, so that a reader refusing a key of the
    wrong format can name both the protected file and the key file.
    """
    name = os.fspath(path)
    try:
        with open(name, "rb") as f:
            if os.fstat(f.fileno()).st_size > 64:
                raise KeyFileError(f"{name}: too large for a key file (keys are 16 or 32 bytes)")
            raw = f.read()
    except OSError as e:
        raise KeyFileError(f"{name}: cannot read key file: {e.strerror}") from e
    key = _FileKey(check_key(raw, fmt, name))
    key.source = name
    return key


def check_key(key: bytes, fmt: Format | None, name: str = "key") -> bytes:
    """Return ``key`` if its size fits ``fmt``; raise :class:`KeyFileError` otherwise."""
    if not isinstance(key, bytes | bytearray | memoryview):
        raise TypeError("key must be bytes")
    key = bytes(key)
    sizes = {f.key_size: f for f in Format}
    if fmt is None:
        if len(key) not in sizes:
            raise KeyFileError(
                f"{name}: a key has 32 bytes (stream) or 16 bytes (gramine-pf), "
                f"this one has {len(key)}"
            )
        return key
    if len(key) != fmt.key_size:
        other = sizes.get(len(key))
        hint = f"this is a {other} key; pass --format {other}" if other else None
        raise KeyFileError(
            f"{name}: a {fmt} key has {fmt.key_size} bytes, this one has {len(key)}", hint=hint
        )
    return key


class MappedSource:
    """Read-only access to a file: ``read``/``readv`` copy into private memory, ``view`` maps.

    Ciphertext that AES-GCM authenticates and decrypts is always copied first (``read``/
    ``readv``): the host may rewrite a mapped file while it is read. ``view`` (a zero-copy slice of
    a sliding memory map, one window at a time so the resident set stays bounded) serves the
    plaintext an owner encrypts, and copies made before use (a gramine-pf node into scratch).
    """

    WINDOW = 32 << 20

    def __init__(self, path: StrPath) -> None:
        self.name = os.fspath(path)
        self._file = open(self.name, "rb")  # noqa: SIM115 - owned and closed by close()
        try:
            st = os.fstat(self._file.fileno())
        except OSError:
            self._file.close()
            raise
        self.size = st.st_size
        self._map: mmap.mmap | None = None
        self._start = 0
        self._end = 0

    def read(self, offset: int, length: int) -> bytes:
        """Copy ``length`` bytes at ``offset`` (short only at end of file)."""
        return os.pread(self._file.fileno(), length, offset)

    def readv(self, offset: int, buffers: list[memoryview]) -> int:
        """Fill ``buffers`` in order from ``offset`` with one system call; return bytes read."""
        return os.preadv(self._file.fileno(), buffers, offset)

    def view(self, offset: int, length: int) -> memoryview:
        """A zero-copy view of ``length`` bytes at ``offset``; the caller must not keep it."""
        end = offset + length
        if end > self.size:
            raise ValueError("view past end of file")
        if self._map is None or offset < self._start or end > self._end:
            self._remap(offset, length)
        assert self._map is not None
        return memoryview(self._map)[offset - self._start : end - self._start]

    def _remap(self, offset: int, length: int) -> None:
        self._unmap()
        start = offset - offset % mmap.ALLOCATIONGRANULARITY
        size = min(max(self.WINDOW, offset + length - start), self.size - start)
        self._map = mmap.mmap(self._file.fileno(), size, access=mmap.ACCESS_READ, offset=start)
        self._start, self._end = start, start + size

    def _unmap(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None

    def close(self) -> None:
        self._unmap()
        self._file.close()


def file_name(f: StrPath | io.IOBase) -> str:
    """A printable name for a path or an open file."""
    if isinstance(f, io.IOBase):
        return str(getattr(f, "name", "<stream>"))
    return os.fspath(f)


def as_path(p: StrPath) -> Path:
    return Path(os.fspath(p))
