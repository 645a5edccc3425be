"""One API over both formats: detection, opening, writing, whole-file and whole-tree helpers."""

from __future__ import annotations

import contextlib
import itertools
import multiprocessing
import os
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, BinaryIO

from shieldml.errors import (
    FormatError,
    InputReadError,
    NotProtectedError,
    OutputExistsError,
    ShieldError,
)
from shieldml.files import _gramine, _stream
from shieldml.files._common import Format, MappedSource, ProgressCallback, StrPath, check_key
from shieldml.files._reader import ProtectedFile

CHUNK = 8 << 20
EXIT_SHIELD_ERROR = 3
MAGICS = {_stream.MAGIC: Format.STREAM, _gramine.FILE_ID: Format.GRAMINE_PF}


def detect_format(path: StrPath) -> Format:
    """The format of a protected file, from its magic; :class:`NotProtectedError` otherwise."""
    name = os.fspath(path)
    try:
        with open(name, "rb") as f:
            magic = f.read(8)
    except OSError as e:
        raise InputReadError(f"{name}: cannot read: {e.strerror}") from e
    fmt = MAGICS.get(magic)
    if fmt is None:
        raise NotProtectedError(
            f"{name}: not a protected file (no shieldml stream or Gramine header)",
            hint="encrypt it first with `shieldml encrypt`",
        )
    return fmt


def open_protected(path: StrPath, key: bytes, *, bind: str | None = None) -> ProtectedFile:
    """Open a protected file of either format for random-access reading.

    ``bind`` is the path the file was bound to at encryption. It defaults to ``path`` as given.
    For ``gramine-pf`` it is compared with the stored path after Gramine's normalisation; for
    ``stream`` it is part of the key derivation, so a wrong path fails authentication.
    """
    name = os.fspath(path)
    fmt = detect_format(name)
    expected = name if bind is None else bind
    try:
        if fmt is Format.STREAM:
            return _stream.StreamReader(name, key, expected)
        return _gramine.GramineReader(name, key, expected)
    except OSError as e:
        raise InputReadError(f"{name}: cannot read: {e.strerror}") from e


@contextlib.contextmanager
def create_writer(
    sink: BinaryIO, key: bytes, bind: str, *, fmt: Format = Format.STREAM, gramine_version: int = 1
) -> Iterator[Any]:
    """A streaming writer as a context manager: the file is finalised only on a clean exit.

    ``sink`` must be seekable for ``gramine-pf``. On an exception the output is left unfinished
    (and refused by every reader); whole-file helpers below also remove it.
    """
    writer: Any
    if fmt is Format.STREAM:
        writer = _stream.StreamWriter(sink, key, bind)
    else:
        writer = _gramine.GramineWriter(sink, key, bind, version=gramine_version)
    try:
        yield writer
    except BaseException:
        writer.abort()
        raise
    writer.close()


@contextlib.contextmanager
def atomic_output(dst: StrPath, *, overwrite: bool = False) -> Iterator[BinaryIO]:
    """A temporary file beside ``dst``, renamed over it only if the block succeeds."""
    final = Path(os.fspath(dst))
    if final.exists() and not overwrite:
        raise OutputExistsError(f"{final}: already exists", hint="pass --force to replace it")
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def encrypt_file(
    src: StrPath,
    dst: StrPath,
    key: bytes,
    *,
    bind: str | None = None,
    fmt: Format = Format.STREAM,
    gramine_version: int = 1,
    overwrite: bool = False,
    progress: ProgressCallback | None = None,
) -> None:
    """Encrypt ``src`` into ``dst`` atomically. ``bind`` defaults to ``dst`` as given."""
    key = check_key(key, fmt)
    bind = os.fspath(dst) if bind is None else bind
    source = _open_source(src)
    try:
        with (
            atomic_output(dst, overwrite=overwrite) as out,
            create_writer(out, key, bind, fmt=fmt, gramine_version=gramine_version) as w,
        ):
            for off in range(0, source.size, CHUNK):
                n = min(CHUNK, source.size - off)
                with source.view(off, n) as chunk:
                    w.write(chunk)
                if progress:
                    progress(n)
    finally:
        source.close()


def _open_source(src: StrPath) -> MappedSource:
    try:
        return MappedSource(src)
    except OSError as e:
        raise InputReadError(f"{os.fspath(src)}: cannot read: {e.strerror}") from e


def decrypt_file(
    src: StrPath,
    dst: StrPath,
    key: bytes,
    *,
    bind: str | None = None,
    overwrite: bool = False,
    workers: int = 1,
    progress: ProgressCallback | None = None,
) -> None:
    """Decrypt ``src`` into ``dst`` atomically; ``dst`` appears only if all of it verifies.

    ``workers > 1`` decrypts disjoint ranges in that many processes, each writing its part of the
    output in place.
    """
    with (
        open_protected(src, key, bind=bind) as reader,
        atomic_output(dst, overwrite=overwrite) as out,
    ):
        size = reader.size
        out.truncate(size)
        if workers <= 1 or size < 2 * CHUNK:
            _copy_range(reader, out.fileno(), 0, size, progress)
        else:
            expected = os.fspath(src) if bind is None else bind
            _parallel_decrypt(reader, key, expected, out.fileno(), workers, progress)


def _copy_range(
    reader: ProtectedFile, fd: int, start: int, end: int, progress: ProgressCallback | None
) -> None:
    buf = bytearray(CHUNK)
    with memoryview(buf) as view:
        reader.seek(start)
        pos = start
        while pos < end:
            n = reader.readinto(view[: min(CHUNK, end - pos)])
            if n <= 0:
                raise FormatError(f"{reader.name}: ended early at byte {pos}")
            os.pwrite(fd, view[:n], pos)
            pos += n
            if progress:
                progress(n)


def _worker(src: str, key: bytes, bind: str, fd: int, start: int, end: int, counter: Any) -> None:
    """One decryption process (forked, so it shares ``fd``); opens its own reader.

    A ShieldError ends it with EXIT_SHIELD_ERROR and no traceback; the parent then re-reads the
    file itself to raise the precise error.
    """

    def tick(n: int) -> None:
        with counter.get_lock():
            counter.value += n

    try:
        with open_protected(src, key, bind=bind) as reader:
            _copy_range(reader, fd, start, end, tick)
    except ShieldError:
        sys.exit(EXIT_SHIELD_ERROR)


def _parallel_decrypt(
    reader: ProtectedFile,
    key: bytes,
    bind: str,
    fd: int,
    workers: int,
    progress: ProgressCallback | None,
) -> None:
    size = reader.size
    bounds = [0] + [_align(reader, size * k // workers) for k in range(1, workers)] + [size]
    ctx = multiprocessing.get_context("fork")
    counter = ctx.Value("q", 0)
    procs = [
        ctx.Process(target=_worker, args=(reader.name, key, bind, fd, a, b, counter))
        for a, b in itertools.pairwise(bounds)
        if b > a
    ]
    for p in procs:
        p.start()
    seen = 0
    try:
        while any(p.is_alive() for p in procs):
            for p in procs:
                p.join(0.1)
            if progress and counter.value > seen:
                progress(counter.value - seen)
                seen = counter.value
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
            p.join()
    if progress and counter.value > seen:
        progress(counter.value - seen)
    if any(p.exitcode != 0 for p in procs):
        # A worker failed: verify in this process to raise the precise error (or succeed).
        _copy_range(reader, fd, 0, size, None)


def _align(reader: ProtectedFile, pos: int) -> int:
    """Round ``pos`` down to the start of a segment (stream) or an MHT node's data run (gramine)."""
    if isinstance(reader, _stream.StreamReader):
        geo = reader._geo
        return geo.plain_start(geo.index(pos))
    run = _gramine.NODE_SIZE * _gramine.DATA_SLOTS
    if pos < _gramine.MD_USER_DATA_SIZE:
        return 0
    return _gramine.MD_USER_DATA_SIZE + (pos - _gramine.MD_USER_DATA_SIZE) // run * run


@dataclass(frozen=True)
class FileInfo:
    """What ``shieldml inspect`` reports about a protected file."""

    path: str
    format: Format
    version: int
    ciphertext_size: int
    #: exact for stream files; for gramine-pf only known with the key
    plaintext_size: int | None
    #: for gramine-pf without the key: the range the node count allows
    plaintext_size_range: tuple[int, int] | None = None
    key_id: str | None = None
    header_size: int | None = None
    segment_size: int | None = None
    bound_path: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["format"] = str(self.format)
        return {k: v for k, v in d.items() if v is not None}


def inspect_file(path: StrPath, key: bytes | None = None) -> FileInfo:
    """Describe a protected file from its header (and, for gramine-pf, its metadata if ``key``)."""
    name = os.fspath(path)
    fmt = detect_format(name)
    src = _open_source(name)
    try:
        size = src.size
        head = src.read(0, _gramine.NODE_SIZE)
    finally:
        src.close()
    if fmt is Format.STREAM:
        hdr = _stream.StreamHeader.from_bytes(head, name)
        geo = _stream.Geometry(hdr.segment_size, size - _stream.HEADER_SIZE)
        return FileInfo(
            path=name,
            format=fmt,
            version=hdr.version,
            ciphertext_size=size,
            plaintext_size=geo.size if geo.valid else None,
            key_id=hdr.key_id.hex(),
            header_size=_stream.HEADER_SIZE,
            segment_size=hdr.segment_size,
        )
    ghdr = _gramine.GramineHeader.from_bytes(head, name)
    if key is not None:
        with _gramine.GramineReader(name, key, None) as r:
            exact, stored = r.size, r.stored_path
        return FileInfo(name, fmt, ghdr.major_version, size, exact, bound_path=stored)
    return FileInfo(name, fmt, ghdr.major_version, size, None, _gramine_size_range(size))


def _gramine_size_range(ciphertext_size: int) -> tuple[int, int]:
    nodes = ciphertext_size // _gramine.NODE_SIZE
    if nodes <= 1:
        return (0, _gramine.MD_USER_DATA_SIZE)
    # nodes - 1 = ndata + ceil(ndata / 96)  =>  ndata = (nodes - 1) - ceil((nodes - 1) / 97)
    ndata = nodes - 1 - -(-(nodes - 1) // (_gramine.DATA_SLOTS + 1))
    hi = _gramine.MD_USER_DATA_SIZE + ndata * _gramine.NODE_SIZE
    return (hi - _gramine.NODE_SIZE + 1, hi)
