"""One API over both formats: detection, opening, writing, whole-file and whole-tree helpers."""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

from shieldml.errors import (
    FormatError,
    InputReadError,
    KeyFileError,
    NotProtectedError,
    OutputWriteError,
    ShieldError,
)
from shieldml.files import _gramine, _stream
from shieldml.files._common import (
    Format,
    MappedSource,
    ProgressCallback,
    Sink,
    StrPath,
    check_key,
    key_source,
)
from shieldml.files._output import OutputFile, Outputs, output_error
from shieldml.files._reader import ProtectedFile

CHUNK = 8 << 20
#: below this plaintext size one process decrypts (forking costs more than it saves)
AUTO_WORKERS_MIN = 64 << 20
#: each automatic worker gets at least this much of the file
AUTO_WORKERS_SHARE = 32 << 20
AUTO_WORKERS_MAX = 8
EXIT_SHIELD_ERROR = 3
EXIT_OUTPUT_ERROR = 4
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
    check_key_for_file(key, fmt, name)
    expected = name if bind is None else bind
    try:
        if fmt is Format.STREAM:
            return _stream.StreamReader(name, key, expected)
        return _gramine.GramineReader(name, key, expected)
    except OSError as e:
        raise InputReadError(f"{name}: cannot read: {e.strerror}") from e


def check_key_for_file(key: bytes, fmt: Format, name: str) -> None:
    """Refuse a key of the wrong size for the file ``name`` of format ``fmt``, naming both."""
    if not isinstance(key, bytes | bytearray | memoryview) or len(key) == fmt.key_size:
        return  # a non-bytes key is the caller's bug: check_key raises TypeError for it
    source = key_source(key)
    given = f"key file {source}" if source else "the key given"
    other = {f.key_size: f for f in Format if f is not fmt}.get(len(key))
    what = f"a {len(key)}-byte {other} key" if other else f"{len(key)} bytes long"
    raise KeyFileError(
        f"{name}: a {fmt} file needs a {fmt.key_size}-byte {fmt} key, but {given} is {what}",
        hint="use the key this file was encrypted with (a key's size tells its format)",
    )


@contextlib.contextmanager
def create_writer(
    sink: Sink, key: bytes, bind: str, *, fmt: Format = Format.STREAM, gramine_version: int = 1
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
def atomic_output(dst: StrPath, *, overwrite: bool = False) -> Iterator[OutputFile]:
    """A temporary file beside ``dst``, renamed over it only if the block succeeds.

    Every write is complete or raises :class:`~shieldml.errors.OutputWriteError` (``dst: no
    space left on device`` for ENOSPC); on any exception the temporary and the directories
    created for it are removed.
    """
    with Outputs(overwrite=overwrite) as outputs, outputs.file(dst) as f:
        yield f


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
    """Encrypt ``src`` into ``dst`` atomically. ``bind`` defaults to ``dst`` as given.

    Space for the whole output is reserved before encrypting. On any error or interrupt
    nothing is left at ``dst``, nor a directory created for it; an output that cannot be
    written raises :class:`~shieldml.errors.OutputWriteError`.
    """
    with Outputs(overwrite=overwrite) as outputs:
        encrypt_into(
            outputs,
            src,
            dst,
            key,
            bind=bind,
            fmt=fmt,
            gramine_version=gramine_version,
            progress=progress,
        )


def ciphertext_size(fmt: Format, plaintext_size: int) -> int:
    """The exact size of the protected file shieldml writes for ``plaintext_size`` bytes."""
    if fmt is Format.STREAM:
        return _stream.ciphertext_size(plaintext_size)
    return _gramine.ciphertext_size(plaintext_size)


def encrypt_into(
    outputs: Outputs,
    src: StrPath,
    dst: StrPath,
    key: bytes,
    *,
    bind: str | None = None,
    fmt: Format = Format.STREAM,
    gramine_version: int = 1,
    progress: ProgressCallback | None = None,
) -> None:
    """:func:`encrypt_file` as one of the ``outputs`` of a larger operation."""
    key = check_key(key, fmt)
    bind = os.fspath(dst) if bind is None else bind
    source = _open_source(src)
    try:
        with outputs.file(dst) as out:
            reserved = ciphertext_size(fmt, source.size)
            out.reserve(reserved)
            with create_writer(out, key, bind, fmt=fmt, gramine_version=gramine_version) as w:
                for off in range(0, source.size, CHUNK):
                    n = min(CHUNK, source.size - off)
                    with source.view(off, n) as chunk:
                        w.write(chunk)
                    if progress:
                        progress(n)
            if out.written_end < reserved:  # never a reserved tail of zeros
                out.truncate(out.written_end)
    finally:
        source.close()


def _open_source(src: StrPath) -> MappedSource:
    try:
        return MappedSource(src)
    except OSError as e:
        raise InputReadError(f"{os.fspath(src)}: cannot read: {e.strerror}") from e


def busy_cores(loadavg: str | None = None) -> float:
    """How many cores other work keeps busy now: the kernel's count of runnable threads (the
    fourth field of ``/proc/loadavg``, ``running/total``), less the one asking. Where that file
    is missing or unreadable, the one-minute load average, which lags: right after other work
    (the previous decryption, say) it still counts that work as running."""
    try:
        if loadavg is None:
            with open("/proc/loadavg", encoding="ascii") as f:
                loadavg = f.read()
        return float(max(0, int(loadavg.split()[3].split("/")[0]) - 1))
    except (OSError, ValueError, IndexError):
        try:
            return os.getloadavg()[0]
        except OSError:
            return 0.0


def auto_workers(size: int, *, cpus: int | None = None, load: float | None = None) -> int:
    """How many processes to decrypt ``size`` bytes with: one per core that is idle now.

    ``cpus`` defaults to the cores this process may run on, ``load`` to :func:`busy_cores` (the
    cores other work keeps busy). One for files under :data:`AUTO_WORKERS_MIN`, never more than
    one per :data:`AUTO_WORKERS_SHARE` of the file, at most :data:`AUTO_WORKERS_MAX`.
    """
    if size < AUTO_WORKERS_MIN:
        return 1
    if cpus is None:
        affinity = getattr(os, "sched_getaffinity", None)
        cpus = len(affinity(0)) if affinity is not None else (os.cpu_count() or 1)
    if load is None:
        load = busy_cores()
    idle = int(cpus - load + 0.5)
    return max(1, min(cpus, idle, size // AUTO_WORKERS_SHARE, AUTO_WORKERS_MAX))


def decrypt_file(
    src: StrPath,
    dst: StrPath,
    key: bytes,
    *,
    bind: str | None = None,
    overwrite: bool = False,
    workers: int | None = 1,
    progress: ProgressCallback | None = None,
) -> None:
    """Decrypt ``src`` into ``dst`` atomically; ``dst`` appears only if all of it verifies.

    Space for the whole plaintext is reserved first (``posix_fallocate`` where the filesystem
    supports it). An output that cannot be written raises
    :class:`~shieldml.errors.OutputWriteError` (``dst: no space left on device``) and, as on
    every error or interrupt, nothing is left at ``dst``, nor a directory created for it.

    ``workers > 1`` decrypts disjoint ranges in that many processes, each writing its part of the
    output in place; ``workers=None`` picks the number with :func:`auto_workers`. Every range
    is authenticated before its plaintext is written, in every process.
    """
    with Outputs(overwrite=overwrite) as outputs:
        decrypt_into(outputs, src, dst, key, bind=bind, workers=workers, progress=progress)


def decrypt_into(
    outputs: Outputs,
    src: StrPath,
    dst: StrPath,
    key: bytes,
    *,
    bind: str | None = None,
    workers: int | None = 1,
    progress: ProgressCallback | None = None,
) -> None:
    """:func:`decrypt_file` as one of the ``outputs`` of a larger operation."""
    with open_protected(src, key, bind=bind) as reader, outputs.file(dst) as out:
        size = reader.size
        out.reserve(size)
        if workers is None:
            workers = auto_workers(size)
        if workers <= 1 or size < 2 * CHUNK:
            _copy_range(reader, out, 0, size, progress)
        else:
            expected = os.fspath(src) if bind is None else bind
            _parallel_decrypt(reader, key, expected, out, workers, progress)


def _copy_range(
    reader: ProtectedFile, out: OutputFile, start: int, end: int, progress: ProgressCallback | None
) -> None:
    buf = bytearray(CHUNK)
    with memoryview(buf) as view:
        reader.seek(start)
        pos = start
        while pos < end:
            with view[: min(CHUNK, end - pos)] as part:
                n = reader.readinto(part)
                if n <= 0:
                    raise FormatError(f"{reader.name}: ended early at byte {pos}")
                with part[:n] as plain:
                    out.pwrite(plain, pos)
            pos += n
            if progress:
                progress(n)


def _worker(
    src: str,
    key: bytes,
    bind: str,
    out: OutputFile,
    start: int,
    end: int,
    counter: Any,
    failed_errno: Any,
) -> None:
    """One decryption process (forked, so it shares the output's descriptor); opens its own reader.

    It leaves Ctrl-C to the parent, which stops every worker and removes the output. A
    ShieldError ends it with EXIT_SHIELD_ERROR and no traceback, the parent then re-reads the file
    itself to raise the precise error; an output it cannot write ends it with EXIT_OUTPUT_ERROR
    and the errno in ``failed_errno``.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})

    def tick(n: int) -> None:
        with counter.get_lock():
            counter.value += n

    try:
        with open_protected(src, key, bind=bind) as reader:
            _copy_range(reader, out, start, end, tick)
    except OutputWriteError as e:
        failed_errno.value = e.errno or 0
        sys.exit(EXIT_OUTPUT_ERROR)
    except ShieldError:
        sys.exit(EXIT_SHIELD_ERROR)


def _parallel_decrypt(
    reader: ProtectedFile,
    key: bytes,
    bind: str,
    out: OutputFile,
    workers: int,
    progress: ProgressCallback | None,
) -> None:
    import multiprocessing.connection  # here: one process (the common case) never needs it

    size = reader.size
    bounds = [0] + [_align(reader, size * k // workers) for k in range(1, workers)] + [size]
    ctx = multiprocessing.get_context("fork")
    counter = ctx.Value("q", 0)
    failed_errno = ctx.Value("i", 0)
    procs = [
        ctx.Process(target=_worker, args=(reader.name, key, bind, out, a, b, counter, failed_errno))
        for a, b in itertools.pairwise(bounds)
        if b > a
    ]
    seen = 0
    try:
        # Ctrl-C is the parent's to handle: blocked while forking, ignored by every worker.
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            for p in procs:
                p.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        running = list(procs)
        while running:
            # wakes as soon as a worker ends (joining each in turn for 0.1 s noticed the last
            # one up to 0.1 s late per worker), else every 0.1 s for the progress bar
            multiprocessing.connection.wait([p.sentinel for p in running], 0.1)
            running = [p for p in running if p.is_alive()]
            if progress and counter.value > seen:
                progress(counter.value - seen)
                seen = counter.value
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
            if p.pid is not None:
                p.join()
    if progress and counter.value > seen:
        progress(counter.value - seen)
    if any(p.exitcode == EXIT_OUTPUT_ERROR for p in procs):
        code = failed_errno.value
        raise output_error(out.name, OSError(code, os.strerror(code) if code else "write failed"))
    if any(p.exitcode != 0 for p in procs):
        # A worker failed: verify in this process to raise the precise error (or succeed).
        _copy_range(reader, out, 0, size, None)


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
        if key is not None:
            check_key_for_file(key, fmt, name)
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
        check_key_for_file(key, fmt, name)
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


def _seekable(f: Any) -> bool:
    try:
        return bool(f.seekable())
    except (AttributeError, OSError, ValueError):
        return False


def encrypt_stream(
    src: Any,
    sink: Sink,
    key: bytes,
    *,
    bind: str,
    fmt: Format = Format.STREAM,
    gramine_version: int = 1,
    name: str = "<stdin>",
    progress: ProgressCallback | None = None,
) -> int:
    """Encrypt what the binary file ``src`` yields up to its end (a pipe, say) into ``sink``.

    The plaintext size need not be known. ``stream`` output is written start to end, so ``sink``
    may be a pipe; ``gramine-pf`` writes its metadata node (offset 0) last and needs a seekable
    ``sink`` (:class:`~shieldml.errors.ShieldError` otherwise, before anything is read). An error
    or interrupt leaves an unterminated file that every reader refuses. Returns the plaintext
    size.
    """
    key = check_key(key, fmt)
    if fmt is Format.GRAMINE_PF and not _seekable(sink):
        raise ShieldError(
            "gramine-pf output needs a seekable file: its metadata node at offset 0 is written"
            " last, after the whole tree",
            hint="write to a file, or use --format stream (written start to end)",
        )
    buf = bytearray(CHUNK)
    total = 0
    with (
        create_writer(sink, key, bind, fmt=fmt, gramine_version=gramine_version) as w,
        memoryview(buf) as view,
    ):
        while True:
            try:
                n = src.readinto(view)
            except OSError as e:
                raise InputReadError(f"{name}: cannot read: {e.strerror}") from e
            if not n:
                break
            with view[:n] as chunk:
                w.write(chunk)
            total += n
            if progress:
                progress(n)
    return total


def decrypt_stream(
    src: Any,
    sink: Sink,
    key: bytes,
    *,
    bind: str,
    name: str = "<stdin>",
    progress: ProgressCallback | None = None,
) -> int:
    """Decrypt a protected file read start to end from the binary file ``src`` into ``sink``.

    Only the ``stream`` format can be read this way; a ``gramine-pf`` file needs random access
    (each node's key sits in an MHT node, the size in the metadata node) and is refused with a
    :class:`~shieldml.errors.FormatError` before anything is written. Each segment reaches
    ``sink`` only once authenticated; a failure after the first segment leaves an authenticated
    prefix in ``sink`` and raises :class:`~shieldml.errors.IntegrityError`. Returns the plaintext
    size.
    """
    magic = bytearray(len(_stream.MAGIC))
    with memoryview(magic) as mv:
        got = _stream._read_full(src, mv)
    fmt = MAGICS.get(bytes(magic[:got]))
    if fmt is None:
        raise NotProtectedError(
            f"{name}: not a protected file (no shieldml stream or Gramine header)",
            hint="encrypt it first with `shieldml encrypt`",
        )
    if fmt is Format.GRAMINE_PF:
        raise FormatError(
            f"{name}: a gramine-pf file cannot be decrypted from a pipe: the format needs random"
            " access (the file size is in the metadata node, each node's key in an MHT node)",
            hint="give the file's path instead of -",
        )
    check_key_for_file(key, fmt, name)
    return _stream.decrypt_sequential(_Prefixed(bytes(magic), src), sink, key, bind, name, progress)


class _Prefixed:
    """``src`` with ``head`` (bytes already read from it) put back in front."""

    def __init__(self, head: bytes, src: Any) -> None:
        self._head = head
        self._src = src

    def readinto(self, view: memoryview) -> int:
        if self._head:
            k = min(len(view), len(self._head))
            view[:k] = self._head[:k]
            self._head = self._head[k:]
            return k
        return int(self._src.readinto(view) or 0)
