"""Output files that never lie: every byte is written or an error is raised, and a failed or
interrupted operation leaves nothing behind (no partial file, no directory it created).

Every write is a loop over ``pwrite`` that continues after a short count (the kernel writes what
fits, then fails the next call with ENOSPC) and treats a write of 0 bytes as an error. Space is
reserved up front with ``posix_fallocate`` where the filesystem supports it, so a full disk is
usually found before any decryption work is done. Any ``OSError`` on the output side becomes an
:class:`~shieldml.errors.OutputWriteError` naming the output as the caller named it.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from shieldml.errors import OutputExistsError, OutputWriteError

#: What ``posix_fallocate`` answers where the filesystem cannot reserve space; the output is then
#: only sized, and a full disk shows up as ENOSPC from a write instead.
NO_FALLOCATE = frozenset({errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL, errno.ENOSYS})
_ZERO_WRITE = "the system wrote 0 bytes (no progress)"


def output_error(path: str, e: OSError) -> OutputWriteError:
    """The :class:`OutputWriteError` for ``e`` raised while writing the output ``path``."""
    if e.errno == errno.ENOSPC:
        text = "no space left on device"
    else:
        text = e.strerror or str(e) or type(e).__name__
    return OutputWriteError(path, e.errno, text)


def pwrite_all(fd: int, data: Any, offset: int) -> int:
    """Write all of ``data`` (a bytes-like object) at ``offset``; return its length.

    Loops over short writes; raises ``OSError`` (EIO) if a write makes no progress.
    """
    n = os.pwrite(fd, data, offset)
    if type(data) is bytes and n == len(data):  # the common case, without a memoryview
        return n
    with memoryview(data) as raw:
        total = raw.nbytes
        if n == total:
            return total
        with raw.cast("B") as view:
            done = 0
            while True:
                if n <= 0:
                    raise OSError(errno.EIO, _ZERO_WRITE)
                done += n
                if done >= total:
                    return total
                with view[done:] as rest:
                    n = os.pwrite(fd, rest, offset + done)


def reserve(fd: int, size: int) -> bool:
    """Make the file ``size`` bytes long, with the space allocated where the filesystem can.

    Returns whether space was reserved; where ``posix_fallocate`` is missing or the filesystem
    refuses it (:data:`NO_FALLOCATE`) the file is only extended, sparse. ENOSPC and other errors
    are raised as ``OSError``.
    """
    fallocate = getattr(os, "posix_fallocate", None)
    if size > 0 and fallocate is not None:
        try:
            fallocate(fd, 0, size)
        except OSError as e:
            if e.errno not in NO_FALLOCATE:
                raise
        else:
            if os.fstat(fd).st_size == size:
                return True
    os.ftruncate(fd, size)
    return False


class OutputFile(io.RawIOBase):
    """A new output file written with positional writes that are always complete.

    Unbuffered: :meth:`write` and :meth:`pwrite` return only when every byte reached the kernel,
    or raise :class:`OutputWriteError` naming :attr:`name`, the output as the caller named it
    (never the hidden temporary that is written). Seeking is free (no system call), so a writer
    that seeks before each node costs one ``pwrite`` per node.
    """

    def __init__(self, fd: int, name: str) -> None:
        super().__init__()
        self._fd = fd
        self._name = name
        self._pos = 0
        #: one past the last byte written through this object (writes by ``fileno()`` not seen)
        self.written_end = 0

    @property
    def name(self) -> str:
        return self._name

    def fileno(self) -> int:
        self._check_open()
        return self._fd

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def error(self, e: OSError) -> OutputWriteError:
        return output_error(self._name, e)

    def pwrite(self, data: Any, offset: int) -> int:
        """Write all of ``data`` at ``offset`` without moving the position."""
        self._check_open()
        try:
            n = pwrite_all(self._fd, data, offset)
        except OSError as e:
            raise self.error(e) from e
        if offset + n > self.written_end:
            self.written_end = offset + n
        return n

    def write(self, data: Any) -> int:
        self._check_open()
        try:
            n = pwrite_all(self._fd, data, self._pos)
        except OSError as e:
            raise self.error(e) from e
        self._pos += n
        if self._pos > self.written_end:
            self.written_end = self._pos
        return n

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        self._check_open()
        if whence == os.SEEK_SET:
            pos = offset
        elif whence == os.SEEK_CUR:
            pos = self._pos + offset
        elif whence == os.SEEK_END:
            pos = self._size() + offset
        else:
            raise ValueError(f"invalid whence {whence}")
        if pos < 0:
            raise ValueError("negative seek position")
        self._pos = pos
        return pos

    def tell(self) -> int:
        self._check_open()
        return self._pos

    def truncate(self, size: int | None = None) -> int:
        self._check_open()
        size = self._pos if size is None else size
        try:
            os.ftruncate(self._fd, size)
        except OSError as e:
            raise self.error(e) from e
        self.written_end = min(self.written_end, size)
        return size

    def reserve(self, size: int) -> bool:
        """Size the file to ``size`` bytes and allocate its space where the filesystem can."""
        self._check_open()
        try:
            return reserve(self._fd, size)
        except OSError as e:
            raise self.error(e) from e

    def sync(self) -> None:
        """``fsync``: the data is on the device, or an :class:`OutputWriteError` says why not."""
        self._check_open()
        try:
            os.fsync(self._fd)
        except OSError as e:
            raise self.error(e) from e

    def _size(self) -> int:
        try:
            return os.fstat(self._fd).st_size
        except OSError as e:
            raise self.error(e) from e

    def _check_open(self) -> None:
        if self.closed:
            raise ValueError("I/O operation on closed file")

    def close(self) -> None:
        if not self.closed:
            try:
                os.close(self._fd)
            finally:
                super().close()


def _make_dirs(path: Path) -> list[Path]:
    """``mkdir -p path``; return the directories it created, outermost first."""
    missing: list[Path] = []
    p = path
    while not p.is_dir():
        missing.append(p)
        if p.parent == p:
            break
        p = p.parent
    created: list[Path] = []
    try:
        for d in reversed(missing):
            try:
                d.mkdir()
            except FileExistsError:
                if not d.is_dir():
                    raise
                continue
            created.append(d)
    except BaseException:
        _remove_dirs(created)
        raise
    return created


def _remove_dirs(dirs: list[Path]) -> None:
    for d in reversed(dirs):  # innermost first; a directory someone else filled stays
        with contextlib.suppress(OSError):
            d.rmdir()


class Outputs:
    """The outputs of one operation: all of them appear, or none does.

    Each file is written to a hidden temporary beside its destination (``.NAME.*.partial``) and
    closed when done; :meth:`commit` renames them all into place. :meth:`discard`, or any
    exception out of the ``with`` block, removes every temporary, every output already renamed
    that did not exist before, and every directory created for them. Destinations that existed
    (with ``overwrite``) keep their old contents until :meth:`commit`.
    """

    def __init__(self, *, overwrite: bool = False) -> None:
        self.overwrite = overwrite
        self._staged: list[tuple[str, Path, bool]] = []  # temporary, destination, existed
        self._dirs: list[Path] = []
        self._renamed: list[tuple[Path, bool]] = []

    def __enter__(self) -> Outputs:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.discard()

    @contextlib.contextmanager
    def file(self, dst: str | os.PathLike[str]) -> Iterator[OutputFile]:
        """A new :class:`OutputFile` staged for ``dst``; synced and closed on a clean exit."""
        name = os.fspath(dst)
        final = Path(name)
        existed = final.exists()
        if existed and not self.overwrite:
            raise OutputExistsError(f"{name}: already exists", hint="pass --force to replace it")
        try:
            self._dirs += _make_dirs(final.parent)
            fd, tmp = tempfile.mkstemp(
                prefix=f".{final.name}.", suffix=".partial", dir=final.parent
            )
        except OSError as e:
            raise output_error(name, e) from e
        out = OutputFile(fd, name)
        try:
            yield out
            out.sync()
        except BaseException:
            out.close()
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        out.close()
        self._staged.append((tmp, final, existed))

    def commit(self) -> None:
        """Rename every staged file into place (or, on failure, leave none of them)."""
        try:
            while self._staged:
                tmp, final, existed = self._staged[0]
                try:
                    os.replace(tmp, final)
                except OSError as e:
                    raise output_error(os.fspath(final), e) from e
                self._staged.pop(0)
                self._renamed.append((final, existed))
        except BaseException:
            self.discard()
            raise
        self._dirs.clear()
        self._renamed.clear()

    def discard(self) -> None:
        """Remove every staged temporary, new output and created directory."""
        for tmp, _final, _existed in self._staged:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        for final, existed in self._renamed:
            if not existed:
                with contextlib.suppress(OSError):
                    final.unlink()
        self._staged.clear()
        self._renamed.clear()
        _remove_dirs(self._dirs)
        self._dirs.clear()
