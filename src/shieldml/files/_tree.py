"""Encrypting and decrypting single files or whole directory trees, as the CLI does."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shieldml.errors import InputReadError, OutputExistsError
from shieldml.files._api import decrypt_into, detect_format, encrypt_into, inspect_file
from shieldml.files._common import Format, ProgressCallback, StrPath
from shieldml.files._output import Outputs


@dataclass(frozen=True)
class Planned:
    """One file of a tree operation: where it comes from, where it goes, the path it is bound to."""

    src: str
    dst: str
    bind: str
    size: int


def _join(root: str, rel: str) -> str:
    return rel if root in ("", ".") else root.rstrip("/") + "/" + rel


def plan(src: StrPath, dst: StrPath, bind_root: str | None, *, default_root: str) -> list[Planned]:
    """Map ``src`` (a file or a directory tree) onto ``dst`` and bound paths.

    A file goes to ``dst`` (or into it, if ``dst`` is an existing directory) and is bound to
    ``bind_root`` or, by default, ``default_root``. A directory's files keep their relative paths
    under ``dst`` and are bound to ``<root>/<relative path>``.
    """
    s, d = os.fspath(src), os.fspath(dst)
    if not os.path.exists(s):
        raise InputReadError(f"{s}: no such file or directory")
    if os.path.isfile(s):
        if os.path.isdir(d):
            d = os.path.join(d, os.path.basename(s))
            default_root = d if default_root == os.fspath(dst) else default_root
        bind = bind_root if bind_root is not None else default_root
        return [Planned(s, d, bind, os.path.getsize(s))]
    if os.path.exists(d) and not os.path.isdir(d):
        raise OutputExistsError(f"{d}: exists and is not a directory, but {s} is a directory")
    root = bind_root if bind_root is not None else default_root
    out: list[Planned] = []
    for dirpath, dirnames, filenames in os.walk(s):
        dirnames.sort()
        for fn in sorted(filenames):
            full = os.path.join(dirpath, fn)
            if not os.path.isfile(full):
                continue
            rel = Path(os.path.relpath(full, s)).as_posix()
            out.append(Planned(full, os.path.join(d, rel), _join(root, rel), os.path.getsize(full)))
    return out


def encrypt_path(
    src: StrPath,
    dst: StrPath,
    key: bytes,
    *,
    bind: str | None = None,
    fmt: Format = Format.STREAM,
    gramine_version: int = 1,
    overwrite: bool = False,
    progress: ProgressCallback | None = None,
    planned: list[Planned] | None = None,
) -> list[Planned]:
    """Encrypt a file or a directory tree; bound paths default to the output paths as given.

    All or nothing: the outputs are renamed into place only once every file is written; on any
    error or interrupt none is left, nor a directory this call created (``overwrite``: files
    that existed keep their old contents).
    """
    items = planned if planned is not None else plan_encrypt(src, dst, bind)
    _refuse_existing(items, overwrite)
    with Outputs(overwrite=overwrite) as outputs:
        for it in items:
            encrypt_into(
                outputs,
                it.src,
                it.dst,
                key,
                bind=it.bind,
                fmt=fmt,
                gramine_version=gramine_version,
                progress=progress,
            )
    return items


def plan_encrypt(src: StrPath, dst: StrPath, bind: str | None) -> list[Planned]:
    return plan(src, dst, bind, default_root=os.fspath(dst))


def plan_decrypt(src: StrPath, dst: StrPath, bind: str | None) -> list[Planned]:
    """Like :func:`plan`, bound paths defaulting to the input paths; checks every input first."""
    items = plan(src, dst, bind, default_root=os.fspath(src))
    sized = []
    for it in items:
        detect_format(it.src)  # refuse a tree with unprotected files before decrypting any
        info = inspect_file(it.src)
        size = info.plaintext_size
        if size is None:
            size = info.plaintext_size_range[1] if info.plaintext_size_range else it.size
        sized.append(Planned(it.src, it.dst, it.bind, size))
    return sized


def decrypt_path(
    src: StrPath,
    dst: StrPath,
    key: bytes,
    *,
    bind: str | None = None,
    overwrite: bool = False,
    workers: int | None = 1,
    progress: ProgressCallback | None = None,
    planned: list[Planned] | None = None,
) -> list[Planned]:
    """Decrypt a file or a directory tree; bound paths default to the input paths as given.

    ``workers``: processes per file (``None``: :func:`~shieldml.files.auto_workers` per file).

    All or nothing, as :func:`encrypt_path`: no output appears unless every file verified and
    was written in full.
    """
    items = planned if planned is not None else plan_decrypt(src, dst, bind)
    _refuse_existing(items, overwrite)
    with Outputs(overwrite=overwrite) as outputs:
        for it in items:
            decrypt_into(
                outputs, it.src, it.dst, key, bind=it.bind, workers=workers, progress=progress
            )
    return items


def _refuse_existing(items: list[Planned], overwrite: bool) -> None:
    if overwrite:
        return
    existing = [it.dst for it in items if os.path.exists(it.dst)]
    if existing:
        more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
        raise OutputExistsError(
            f"{existing[0]}: already exists{more}", hint="pass --force to replace"
        )


def rekey_path(
    src: StrPath,
    old_key: bytes,
    new_key: bytes,
    *,
    bind: str | None = None,
    progress: ProgressCallback | None = None,
) -> list[Planned]:
    """Re-encrypt a protected file or tree in place under ``new_key`` (same format and binding).

    Each file is replaced atomically, only after all of it was authenticated under ``old_key``;
    a file that cannot be rewritten (say, no space for its new copy) is left as it was.
    """
    from shieldml.files._api import atomic_output, open_protected

    items = plan_decrypt(src, src, bind)
    for it in items:
        fmt = detect_format(it.src)
        with open_protected(it.src, old_key, bind=it.bind) as r:
            stored = getattr(r, "stored_path", it.bind)
            with atomic_output(it.src, overwrite=True) as out:
                _reencrypt(r, out, new_key, stored, fmt, progress)
    return items


def _reencrypt(
    r: Any, out: Any, key: bytes, bind: str, fmt: Format, progress: ProgressCallback | None
) -> None:
    """Write what the open reader ``r`` authenticates onto ``out``, encrypted under ``key`` for
    ``bind`` in ``fmt`` (a Gramine file keeps its Gramine version)."""
    from shieldml.files._api import CHUNK, ciphertext_size, create_writer
    from shieldml.files._gramine import GramineReader

    version = r.header.major_version if isinstance(r, GramineReader) else 1
    reserved = ciphertext_size(fmt, r.size)
    out.reserve(reserved)
    with create_writer(out, key, bind, fmt=fmt, gramine_version=version) as w:
        buf = bytearray(CHUNK)
        while n := r.readinto(buf):
            with memoryview(buf)[:n] as part:
                w.write(part)
            if progress:
                progress(n)
    if out.written_end < reserved:
        out.truncate(out.written_end)


def rebind_path(
    src: StrPath,
    dst: StrPath,
    key: bytes,
    *,
    to: str,
    bind: str | None = None,
    new_key: bytes | None = None,
    overwrite: bool = False,
    progress: ProgressCallback | None = None,
) -> list[Planned]:
    """Re-encrypt a protected file or tree for another bound path: ``to`` (a directory's files
    under ``to/<relative path>``), under ``new_key`` or the same key, in the same format (and
    Gramine version). ``dst`` may be ``src`` (in place).

    Every file is authenticated under ``key`` at its current bound path (``bind``, default:
    ``src`` as given) as it is read, once, and re-encrypted from exactly those bytes. All or
    nothing: no output appears (and, in place, no file changes) unless every file verified and
    was written in full. Returns the files with their *new* bound paths.
    """
    from shieldml.files._api import open_protected

    items = plan_decrypt(src, dst, bind)
    single = os.path.isfile(os.fspath(src))
    moved = [
        Planned(it.src, it.dst, to if single else _rebound(it, src, to), it.size) for it in items
    ]
    in_place = os.path.realpath(os.fspath(src)) == os.path.realpath(os.fspath(dst))
    _refuse_existing(moved, overwrite or in_place)
    out_key = key if new_key is None else new_key
    with Outputs(overwrite=True) as outputs:
        for old, new in zip(items, moved, strict=True):
            fmt = detect_format(old.src)
            with open_protected(old.src, key, bind=old.bind) as r, outputs.file(new.dst) as out:
                _reencrypt(r, out, out_key, new.bind, fmt, progress)
    return moved


def _rebound(item: Planned, src: StrPath, to: str) -> str:
    rel = Path(os.path.relpath(item.src, os.fspath(src))).as_posix()
    return _join(to.rstrip("/"), rel)
