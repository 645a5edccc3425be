"""The random-access read-only file object shared by both formats."""

from __future__ import annotations

import abc
import io
import os
from typing import Any

from shieldml.files._common import Format, MappedSource


class ProtectedFile(io.RawIOBase, abc.ABC):
    """A decrypted, authenticated, read-only view of a protected file.

    Supports ``read``, ``readinto``, ``seek``, ``tell``, iteration and ``size``; every byte handed
    out has been authenticated first. Any authentication failure raises
    :class:`~shieldml.errors.IntegrityError` naming the file and the segment or node, and leaves no
    unauthenticated plaintext in the caller's buffer.
    """

    format: Format
    #: The path the file is bound to (the path the program opens inside the TEE).
    bound_path: str

    def __init__(self, source: MappedSource) -> None:
        super().__init__()
        self._src = source
        self._pos = 0

    # -- the part each format provides -------------------------------------------------------
    @property
    @abc.abstractmethod
    def size(self) -> int:
        """Plaintext size in bytes."""

    @abc.abstractmethod
    def _read_at(self, pos: int, out: memoryview) -> int:
        """Fill a prefix of ``out`` with authenticated plaintext from ``pos``; return its length."""

    # -- io.RawIOBase -----------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self._src.name

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        self._check_open()
        with memoryview(buffer) as raw, raw.cast("B") as view:
            n = max(0, min(len(view), self.size - self._pos))
            done = 0
            while done < n:
                done += self._read_at(self._pos + done, view[done:n])
        self._pos += n
        return n

    def readall(self) -> bytes:
        out = bytearray(max(0, self.size - self._pos))
        n = self.readinto(out)
        return bytes(out[:n])

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        self._check_open()
        if whence == os.SEEK_SET:
            pos = offset
        elif whence == os.SEEK_CUR:
            pos = self._pos + offset
        elif whence == os.SEEK_END:
            pos = self.size + offset
        else:
            raise ValueError(f"invalid whence {whence}")
        if pos < 0:
            raise ValueError("negative seek position")
        self._pos = pos
        return pos

    def tell(self) -> int:
        self._check_open()
        return self._pos

    def close(self) -> None:
        if not self.closed:
            self._src.close()
        super().close()

    def _check_open(self) -> None:
        if self.closed:
            raise ValueError("I/O operation on closed file")

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} format={self.format} size={self.size}>"
