"""The ``gramine-pf`` format: byte-compatible with Gramine's encrypted (protected) files.

Spec: ``shared/docs/specs/gramine-formats.md`` §1 (Gramine ``common/src/protected_files``).
4096-byte nodes; node 0 is the metadata node, then a Merkle tree of MHT nodes each followed
physically by its 96 data nodes. Every node is AES-128-GCM with an all-zero IV, no AAD and a fresh
random key; keys and tags live in the parent node, the root's in the encrypted metadata, whose key
is derived from the wrap key with the SP800-108 CMAC KDF and a random nonce.
"""

from __future__ import annotations

import os
import secrets
import struct
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import algorithms
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.cmac import CMAC

from shieldml.errors import FormatError, IntegrityError, UnsupportedVersionError
from shieldml.files._common import Format, MappedSource, Sink, check_key, write_all
from shieldml.files._output import OutputFile
from shieldml.files._reader import ProtectedFile

if TYPE_CHECKING:  # the writer's threads load it when they start: a reader never does
    from concurrent.futures import Future, ThreadPoolExecutor

try:  # the optional accelerator (setup.py); the pure-Python path below is the reference
    from shieldml.files import _pfnative as _native
except ImportError:  # not built here (no compiler or OpenSSL headers at install time)
    _native = None  # type: ignore[assignment]  # None = no helper; the stub types the module
if os.environ.get("SHIELDML_NO_NATIVE"):
    _native = None  # type: ignore[assignment]  # as above


def _encrypt_threads() -> int:
    affinity = getattr(os, "sched_getaffinity", None)
    cpus = len(affinity(0)) if affinity is not None else (os.cpu_count() or 1)
    return max(1, min(4, cpus))


def native_accelerator() -> bool:
    """Whether full runs of gramine-pf data nodes are decrypted by the C helper."""
    return _native is not None


# §1.1 constants
NODE_SIZE = 4096
KEY_SIZE = 16
MAC_SIZE = 16
NONCE_SIZE = 32
FILE_ID = b"GRAFS_PF"
PATH_MAX_SIZE = 772  # including the terminating NUL
MD_USER_DATA_SIZE = 3072
DATA_SLOTS = 96
CHILD_SLOTS = 32
HAS_PENDING_WRITE = 0x01
METADATA_KEY_LABEL = b"SGX-PROTECTED-FS-METADATA-KEY"
ZERO_IV = bytes(12)
VERSIONS = (1, 2)

# §1.2 metadata node: plaintext part, then the encrypted metadata_decrypted_t (3884 bytes)
PLAIN_V1 = struct.Struct("<8sBB32s16s")  # file_id, major, minor, nonce, mac -> 58 bytes
ENC_SIZE = PATH_MAX_SIZE + 8 + KEY_SIZE + MAC_SIZE + MD_USER_DATA_SIZE  # 3884
ENC_FIXED = struct.Struct(f"<{PATH_MAX_SIZE}sQ16s16s")  # path, size, root key, root mac
KDF_INPUT = struct.Struct("<I64s32sI")  # counter=1, label, nonce, output bits=0x80 -> 104 bytes

MAX_TREE_DEPTH = 8  # 32-ary tree: 8 levels cover far beyond any u64-addressable file


def gramine_norm_path(path: str) -> str:
    """Gramine's ``get_norm_path`` (common/src/path_utils.c), not ``os.path.normpath``.

    Drops empty and ``.`` components, resolves ``..`` against the previous component, keeps
    leading ``..`` of relative paths, collapses ``/..`` to ``/``, keeps one leading ``/`` for an
    absolute path (``//x`` gives ``/x``) and never ends in ``/``.
    """
    absolute = path.startswith("/")
    up = 0
    parts: list[str] = []
    for tok in path.split("/"):
        if tok == "..":
            if parts:
                parts.pop()
            elif not absolute:
                up += 1
        elif tok not in ("", "."):
            parts.append(tok)
    body = "/".join([".."] * up + parts)
    return "/" + body if absolute else body


def _path_bytes(path: str) -> bytes:
    raw = gramine_norm_path(path).encode("utf-8")
    if b"\0" in raw or len(raw) >= PATH_MAX_SIZE:
        raise ValueError(f"path cannot be stored in a Gramine protected file: {path!r}")
    return raw


def metadata_key(wrap_key: bytes, nonce: bytes) -> bytes:
    """§1.5: NIST SP800-108 counter KDF, one block, PRF = AES-128-CMAC under the wrap key."""
    c = CMAC(algorithms.AES(wrap_key))
    c.update(KDF_INPUT.pack(1, METADATA_KEY_LABEL, nonce, KEY_SIZE * 8))
    return c.finalize()


def node_count(size: int) -> int:
    """§1.4: number of 4096-byte nodes Gramine writes for ``size`` plaintext bytes."""
    if size <= MD_USER_DATA_SIZE:
        return 1
    ndata = -(-(size - MD_USER_DATA_SIZE) // NODE_SIZE)
    return _phys_data(ndata - 1) + 1


def ciphertext_size(size: int) -> int:
    """Size of the file :class:`GramineWriter` writes for ``size`` plaintext bytes."""
    return node_count(size) * NODE_SIZE


def _phys_data(d: int) -> int:
    return d + 2 + d // DATA_SLOTS


def _phys_mht(m: int) -> int:
    return 1 + m * (DATA_SLOTS + 1)


@dataclass(frozen=True)
class GramineHeader:
    """The plaintext part of the metadata node (§1.2)."""

    major_version: int
    minor_version: int
    nonce: bytes
    mac: bytes
    feature_flags: int

    @property
    def size(self) -> int:
        return PLAIN_V1.size + (1 if self.major_version == 2 else 0)

    @classmethod
    def from_bytes(cls, node: bytes, name: str = "<file>") -> GramineHeader:
        if len(node) < NODE_SIZE or node[:8] != FILE_ID:
            raise FormatError(f"{name}: not a Gramine protected file")
        _fid, major, minor, nonce, mac = PLAIN_V1.unpack_from(node)
        if major not in VERSIONS:
            raise UnsupportedVersionError(
                f"{name}: Gramine protected-file major version {major} is not supported (1 or 2)"
            )
        flags = node[PLAIN_V1.size] if major == 2 else 0
        return cls(major, minor, nonce, mac, flags)

    def to_bytes(self) -> bytes:
        raw = PLAIN_V1.pack(FILE_ID, self.major_version, self.minor_version, self.nonce, self.mac)
        return raw + (bytes([self.feature_flags]) if self.major_version == 2 else b"")


def _split_slot(node: bytes | bytearray, offset: int) -> tuple[bytes, bytes]:
    return bytes(node[offset : offset + KEY_SIZE]), bytes(node[offset + KEY_SIZE : offset + 32])


class GramineReader(ProtectedFile):
    """Random-access reader for Gramine protected files (format versions 1 and 2).

    ``bind`` is the path the file must be bound to, compared exactly as Gramine compares it after
    :func:`gramine_norm_path`; ``None`` skips the check (as ``gramine-sgx-pf-crypt decrypt``
    without ``--verify``) and :attr:`bound_path` then reports the stored path.
    """

    format = Format.GRAMINE_PF
    MHT_CACHE = 256

    def __init__(self, path: str | os.PathLike[str], key: bytes, bind: str | None) -> None:
        src = MappedSource(path)
        super().__init__(src)
        try:
            self._open(check_key(key, Format.GRAMINE_PF), bind)
        except BaseException:
            src.close()
            raise

    def _open(self, key: bytes, bind: str | None) -> None:
        name = self._src.name
        # §1.6 step 1-4: whole nodes, magic, version, no pending write
        if self._src.size == 0:
            raise FormatError(f"{name}: empty file, not a Gramine protected file")
        node0 = self._src.read(0, NODE_SIZE)
        self.header = hdr = GramineHeader.from_bytes(node0, name)
        if self._src.size % NODE_SIZE:
            raise IntegrityError(
                name, "file size is not a whole number of nodes", reason="truncated"
            )
        if hdr.feature_flags & HAS_PENDING_WRITE:
            raise IntegrityError(
                name,
                "metadata node",
                reason="has an unfinished write",
                hint="Gramine must recover it from its .gramine.recovery file first",
            )
        # step 5: metadata key, decrypt
        enc = node0[hdr.size : hdr.size + ENC_SIZE]
        try:
            meta = AESGCM(metadata_key(key, hdr.nonce)).decrypt(ZERO_IV, enc + hdr.mac, None)
        except InvalidTag:
            raise IntegrityError(
                name, "metadata node", hint="wrong key, or the file was modified"
            ) from None
        stored, size, root_key, root_mac = ENC_FIXED.unpack_from(meta)
        nul = stored.find(b"\0")
        if nul < 0:
            raise FormatError(f"{name}: stored path is not NUL-terminated")
        try:
            self.stored_path = stored[:nul].decode("utf-8")
        except UnicodeDecodeError as e:
            raise FormatError(f"{name}: stored path is not UTF-8") from e
        # step 6: path binding, exactly as Gramine compares it
        if bind is not None and stored[:nul] != _path_bytes(bind):
            raise IntegrityError(
                name,
                "metadata node",
                reason=f"is bound to path {self.stored_path!r}, not {gramine_norm_path(bind)!r}",
                hint="a protected file only opens at the path it was encrypted for (--bind)",
            )
        self.bound_path = self.stored_path
        self._size: int = size
        self._inline = meta[ENC_FIXED.size : ENC_FIXED.size + min(size, MD_USER_DATA_SIZE)]
        if node_count(size) > self._src.size // NODE_SIZE:
            raise IntegrityError(name, f"{node_count(size)} nodes expected", reason="truncated")
        self._root = (root_key, root_mac)
        self._mht: OrderedDict[int, bytes] = OrderedDict()
        self._scratch = bytearray(NODE_SIZE + MAC_SIZE)
        self._node = bytearray(NODE_SIZE)
        self._node_index = -1
        self._run_bufs: list[bytearray] = []
        self._run_views: list[memoryview] = []
        self._run_ct: bytearray | None = None
        # step 7: the root MHT node is checked at open
        if size > MD_USER_DATA_SIZE:
            self._mht_node(0)

    @property
    def size(self) -> int:
        return self._size

    def _decrypt_node(self, phys: int, key: bytes, mac: bytes, out: memoryview, what: str) -> None:
        scratch = self._scratch
        with self._src.view(phys * NODE_SIZE, NODE_SIZE) as ct:
            scratch[:NODE_SIZE] = ct
        scratch[NODE_SIZE:] = mac
        try:
            AESGCM(key).decrypt_into(ZERO_IV, scratch, None, out)
        except InvalidTag:
            out[:] = bytes(len(out))
            raise IntegrityError(self.name, what) from None

    def _mht_node(self, m: int, depth: int = 0) -> bytes:
        cached = self._mht.get(m)
        if cached is not None:
            self._mht.move_to_end(m)
            return cached
        if depth > MAX_TREE_DEPTH:
            raise FormatError(f"{self.name}: Merkle tree deeper than {MAX_TREE_DEPTH}")
        if m == 0:
            key, mac = self._root
        else:
            parent = self._mht_node((m - 1) // CHILD_SLOTS, depth + 1)
            key, mac = _split_slot(parent, DATA_SLOTS * 32 + ((m - 1) % CHILD_SLOTS) * 32)
        out = bytearray(NODE_SIZE)
        with memoryview(out) as view:
            self._decrypt_node(_phys_mht(m), key, mac, view, f"MHT node {m}")
        node = bytes(out)
        self._mht[m] = node
        if len(self._mht) > self.MHT_CACHE:
            self._mht.popitem(last=False)
        return node

    def _data_node(self, d: int, out: memoryview) -> None:
        mht = self._mht_node(d // DATA_SLOTS)
        key, mac = _split_slot(mht, (d % DATA_SLOTS) * 32)
        self._decrypt_node(_phys_data(d), key, mac, out, f"data node {d}")

    def _read_at(self, pos: int, out: memoryview) -> int:
        if pos < MD_USER_DATA_SIZE:
            k = min(len(out), len(self._inline) - pos)
            out[:k] = self._inline[pos : pos + k]
            return k
        rel = pos - MD_USER_DATA_SIZE
        d, off = divmod(rel, NODE_SIZE)
        avail = min(NODE_SIZE, self._size - MD_USER_DATA_SIZE - d * NODE_SIZE)
        if off == 0 and avail == NODE_SIZE and len(out) >= NODE_SIZE:
            return self._read_run(d, out)
        if self._node_index != d:
            self._node_index = -1
            with memoryview(self._node) as node:
                self._data_node(d, node)
            self._node_index = d
        k = min(len(out), avail - off)
        out[:k] = self._node[off : off + k]
        return k

    def _read_run(self, d: int, out: memoryview) -> int:
        """Decrypt whole data nodes from ``d`` on, within one MHT node, straight into ``out``.

        This is the hot path (one AES-GCM key per 4 KiB node). With the C helper, one call
        decrypts the whole run from a zero-copy view of the ciphertext. Without it, one ``preadv``
        places each node's ciphertext in its own buffer, whose tail then takes the tag, so each
        node costs one key set-up and one ``decrypt_into`` with no further copies.
        """
        full_nodes = (self._size - MD_USER_DATA_SIZE) // NODE_SIZE
        m = d // DATA_SLOTS
        n = min(full_nodes, (m + 1) * DATA_SLOTS, d + len(out) // NODE_SIZE) - d
        mht = self._mht_node(m)
        if _native is not None:
            # from private memory, never a shared mapping of the host's file (see StreamReader)
            if self._run_ct is None:
                self._run_ct = bytearray(DATA_SLOTS * NODE_SIZE)
            with memoryview(self._run_ct)[: n * NODE_SIZE] as ct:
                if self._src.readv(_phys_data(d) * NODE_SIZE, [ct]) != n * NODE_SIZE:
                    bad = 0  # the file is shorter than its metadata says
                else:
                    bad = _native.decrypt_nodes(mht, d % DATA_SLOTS, ct, out, n)
            if bad >= 0:
                out[: n * NODE_SIZE] = bytes(n * NODE_SIZE)
                self._read_run_checked(d, n)
                raise IntegrityError(self.name, f"data node {d + bad}")  # pragma: no cover
            return n * NODE_SIZE
        return self._read_run_python(d, n, mht, out)

    def _read_run_checked(self, d: int, n: int) -> None:
        """After the helper refused a run: the pure-Python path names the exact failure."""
        scratch = bytearray(n * NODE_SIZE)
        with memoryview(scratch) as view:
            self._read_run_python(d, n, self._mht_node(d // DATA_SLOTS), view)

    def _read_run_python(self, d: int, n: int, mht: bytes, out: memoryview) -> int:
        if not self._run_bufs:
            self._run_bufs = [bytearray(NODE_SIZE + MAC_SIZE) for _ in range(DATA_SLOTS)]
            self._run_views = [memoryview(b)[:NODE_SIZE] for b in self._run_bufs]
        bufs = self._run_bufs[:n]
        got = self._src.readv(_phys_data(d) * NODE_SIZE, self._run_views[:n])
        if got != n * NODE_SIZE:
            raise IntegrityError(self.name, f"data node {d}", reason="truncated")
        new, iv = AESGCM, ZERO_IV
        slot = (d % DATA_SLOTS) * 32
        o = 0
        for j, buf in enumerate(bufs):
            buf[NODE_SIZE:] = mht[slot + KEY_SIZE : slot + 32]
            try:
                new(mht[slot : slot + KEY_SIZE]).decrypt_into(iv, buf, None, out[o : o + NODE_SIZE])
            except InvalidTag:
                out[: n * NODE_SIZE] = bytes(n * NODE_SIZE)
                raise IntegrityError(self.name, f"data node {d + j}") from None
            slot += 32
            o += NODE_SIZE
        return n * NODE_SIZE


class GramineWriter:
    """Writes a Gramine protected file in one pass to a seekable ``sink``.

    Data nodes are written as they fill; each MHT node is written as soon as its data nodes and
    child MHT nodes are done, so memory holds only the MHT nodes still open. The metadata node is
    written last, by :meth:`close`; an aborted writer leaves node 0 zero, which Gramine refuses.
    """

    def __init__(
        self, sink: Sink, key: bytes, bind: str, *, version: int = 1, threads: int | None = None
    ) -> None:
        self._aborted = True
        #: threads encrypting runs of data nodes with the C helper (None: one per core, up to 4)
        self._threads = _encrypt_threads() if threads is None else max(1, threads)
        self._pool: ThreadPoolExecutor | None = None
        if version not in VERSIONS:
            raise ValueError(f"Gramine format version must be 1 or 2, not {version}")
        self._key = check_key(key, Format.GRAMINE_PF)
        self._path = _path_bytes(bind)
        self._version = version
        self._sink = sink
        #: shieldml's own output files write each node with one complete ``pwrite``
        self._pwrite = sink.pwrite if isinstance(sink, OutputFile) else None
        self._inline = bytearray()
        self._data = bytearray(NODE_SIZE)
        self._fill = 0
        self._ndata = 0  # data nodes written
        self._open: dict[int, bytearray] = {}  # MHT nodes not yet written
        self._children_done: dict[int, int] = {}
        self.size = 0
        self.closed = False
        write_all(self._sink, bytes(NODE_SIZE))  # metadata placeholder
        self._aborted = False

    def _put(self, phys: int, data: bytes | bytearray) -> None:
        if self._pwrite is not None:  # one complete positional write per node
            self._pwrite(data, phys * NODE_SIZE)
            return
        self._sink.seek(phys * NODE_SIZE)
        write_all(self._sink, data)

    def _encrypt(self, plain: Any) -> tuple[bytes, bytes, bytes]:
        key = secrets.token_bytes(KEY_SIZE)
        ct = AESGCM(key).encrypt(ZERO_IV, plain, None)
        return key, ct[:NODE_SIZE], ct[NODE_SIZE:]

    def _mht(self, m: int) -> bytearray:
        node = self._open.get(m)
        if node is None:
            node = self._open[m] = bytearray(NODE_SIZE)
            self._children_done[m] = 0
        return node

    def _flush_data(self) -> None:
        d = self._ndata
        key, ct, mac = self._encrypt(bytes(self._data))
        self._put(_phys_data(d), ct)
        m, slot = divmod(d, DATA_SLOTS)
        self._mht(m)[slot * 32 : slot * 32 + 32] = key + mac
        self._ndata += 1
        self._data[:] = bytes(NODE_SIZE)
        self._fill = 0
        if slot == DATA_SLOTS - 1:
            self._maybe_finish(m)

    def _maybe_finish(self, m: int) -> None:
        data_done = self._ndata >= (m + 1) * DATA_SLOTS
        if data_done and self._children_done[m] == CHILD_SLOTS:
            self._finish(m)

    def _finish(self, m: int) -> None:
        node = self._open.pop(m)
        del self._children_done[m]
        key, ct, mac = self._encrypt(bytes(node))
        self._put(_phys_mht(m), ct)
        if m == 0:
            self._root = key + mac
            return
        parent, slot = divmod(m - 1, CHILD_SLOTS)
        off = DATA_SLOTS * 32 + slot * 32
        self._mht(parent)[off : off + 32] = key + mac
        self._children_done[parent] += 1
        if not self.closed:
            self._maybe_finish(parent)

    def _runs(self, view: memoryview, pos: int, total: int) -> int:
        """Encrypt the whole data nodes of ``view[pos:total]`` with the C helper, a run of nodes
        (up to one MHT node's 96) per call, runs on threads; return the new position.

        Each run's ciphertext is written by the thread that encrypted it (one positional write);
        the MHT bookkeeping (and any MHT node that completes) follows in order, here.
        """
        assert _native is not None and self._fill == 0
        # (first data node, nodes, offset in view, the MHT node taking their keys and tags)
        runs: list[tuple[int, int, int, bytearray]] = []
        d = self._ndata
        while total - pos >= NODE_SIZE:
            n = min((total - pos) // NODE_SIZE, DATA_SLOTS - d % DATA_SLOTS)
            runs.append((d, n, pos, self._mht(d // DATA_SLOTS)))
            d += n
            pos += n * NODE_SIZE
        if not runs:
            return pos

        def encrypt(run: tuple[int, int, int, bytearray]) -> None:
            first, n, at, mht = run
            out = bytearray(n * NODE_SIZE)
            keys = secrets.token_bytes(n * KEY_SIZE)
            with view[at : at + n * NODE_SIZE] as plain:
                _native.encrypt_nodes(keys, plain, out, mht, first % DATA_SLOTS, n)
            self._put(_phys_data(first), out)

        jobs: list[Future[None]] = []
        todo = runs
        if self._threads > 1 and len(runs) > 1 and self._pwrite is not None:
            from concurrent.futures import ThreadPoolExecutor, wait

            if self._pool is None:
                self._pool = ThreadPoolExecutor(self._threads, "shieldml-pf-encrypt")
            try:
                for run in runs:
                    jobs.append(self._pool.submit(encrypt, run))
                todo = []
            except RuntimeError:  # no thread could start (an enclave's thread limit): go on alone
                self._threads = 1
                todo = runs[len(jobs) :]
            finally:
                # every run has finished (and written) before anything is raised: no thread may
                # still write to the output once the caller cleans up after an error
                wait(jobs)
        for run in todo:
            encrypt(run)
        for job in jobs:
            job.result()
        for first, n, _, _ in runs:
            self._ndata = first + n
            if (first + n) % DATA_SLOTS == 0:
                self._maybe_finish((first + n) // DATA_SLOTS - 1)
        return pos

    def _stop_pool(self) -> None:
        if self._pool is not None:  # waits for runs still encrypting (an interrupted write)
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def write(self, data: Any) -> int:
        if self.closed:
            raise ValueError("write to closed file")
        with memoryview(data) as raw, raw.cast("B") as view:
            total = len(view)
            pos = 0
            if self.size < MD_USER_DATA_SIZE:
                k = min(MD_USER_DATA_SIZE - self.size, total)
                self._inline += view[:k]
                pos = k
            if _native is not None and 0 < self._fill < NODE_SIZE and pos < total:
                k = min(NODE_SIZE - self._fill, total - pos)  # complete the node begun before
                self._data[self._fill : self._fill + k] = view[pos : pos + k]
                self._fill += k
                pos += k
            if self._fill == NODE_SIZE and pos < total:
                self._flush_data()
            if _native is not None and self._fill == 0:
                pos = self._runs(view, pos, total)
            while pos < total:
                if self._fill == NODE_SIZE:
                    self._flush_data()
                k = min(NODE_SIZE - self._fill, total - pos)
                self._data[self._fill : self._fill + k] = view[pos : pos + k]
                self._fill += k
                pos += k
        self.size += total
        return total

    def abort(self) -> None:
        self._aborted = True
        self.closed = True
        self._stop_pool()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._stop_pool()
        if self._fill:
            self._flush_data()
        self._root = bytes(32)
        for m in sorted(self._open, reverse=True):  # children before parents
            self._finish(m)
        nonce = secrets.token_bytes(NONCE_SIZE)
        meta = ENC_FIXED.pack(self._path, self.size, self._root[:16], self._root[16:])
        meta += bytes(self._inline).ljust(MD_USER_DATA_SIZE, b"\0")
        enc = AESGCM(metadata_key(self._key, nonce)).encrypt(ZERO_IV, meta, None)
        hdr = GramineHeader(self._version, 0, nonce, enc[ENC_SIZE:], 0)
        node0 = (hdr.to_bytes() + enc[:ENC_SIZE]).ljust(NODE_SIZE, b"\0")
        self._put(0, node0)
        self._sink.seek(0, os.SEEK_END)
        self._sink.flush()

    def __enter__(self) -> GramineWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None:
            self.abort()
        else:
            self.close()
