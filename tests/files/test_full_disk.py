"""Outputs never lie: a full disk, a short write or Ctrl-C ends in one error line and leaves nothing.

The full-disk cases write onto a small tmpfs mounted for the test (root or CAP_SYS_ADMIN needed;
without them they are skipped, saying so). ``fallocate`` is run both ways: as the filesystem
offers it, and refused as by a filesystem without it (the space then runs out in a write).
"""

from __future__ import annotations

import errno
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from shieldml.cli import EXIT_ERROR, EXIT_INTEGRITY, EXIT_INTERRUPTED, main
from shieldml.errors import KeyFileError, OutputWriteError
from shieldml.files import (
    Format,
    decrypt_file,
    decrypt_path,
    encrypt_file,
    encrypt_path,
    generate_key,
    open_protected,
    write_key_file,
)
from shieldml.files._api import ciphertext_size
from shieldml.files._gramine import GramineWriter
from shieldml.files._output import reserve
from shieldml.files._stream import StreamWriter

FORMATS = [Format.STREAM, Format.GRAMINE_PF]
MB = 1_000_000


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    """``tmpfs("1m")``: a fresh tmpfs of that size, unmounted after the test."""
    mounted: list[Path] = []

    def mount(size: str) -> Path:
        where = tmp_path / f"tmpfs-{size}-{len(mounted)}"
        where.mkdir()
        cmd = ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(where)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        except FileNotFoundError:
            pytest.skip("cannot mount a small tmpfs: no `mount` command here")
        if proc.returncode != 0:
            pytest.skip(
                f"cannot mount a small tmpfs (needs root or CAP_SYS_ADMIN): "
                f"{proc.stderr.strip() or f'mount exited {proc.returncode}'}"
            )
        mounted.append(where)
        return where

    yield mount
    for where in reversed(mounted):
        subprocess.run(["umount", "-l", str(where)], capture_output=True, check=False)


@pytest.fixture(params=["fallocate", "no-fallocate"])
def space(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run once with posix_fallocate as the system has it, once refused with EOPNOTSUPP."""
    if request.param == "no-fallocate":

        def refuse(fd: int, offset: int, length: int) -> None:
            raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))

        monkeypatch.setattr(os, "posix_fallocate", refuse, raising=False)
    return str(request.param)


def cli(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, str, str]:
    rc = main([os.fspath(a) if isinstance(a, Path) else str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def keyfile(tmp_path: Path, fmt: Format) -> tuple[Path, bytes]:
    path = tmp_path / f"{fmt}.key"
    key = generate_key(fmt)
    write_key_file(path, key)
    return path, key


def everything_under(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))


def no_space(path: Path) -> str:
    return f"error: {path}: no space left on device\n"


# -- decrypt ------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_decrypt_onto_a_full_tmpfs_fails_and_leaves_nothing(
    tmp_path: Path, tmpfs: Callable[[str], Path], capsys: pytest.CaptureFixture[str], fmt: Format,
    space: str,
):  # fmt: skip
    # the issue: exit 0, "decrypted", and a 3 MB output whose tail is zeros
    k, key = keyfile(tmp_path, fmt)
    (tmp_path / "p").write_bytes(os.urandom(3 * MB))
    encrypt_file(tmp_path / "p", tmp_path / "c", key, fmt=fmt, bind="/c")
    mnt = tmpfs("1m")
    out = mnt / "new" / "dir" / "p"
    rc, stdout, err = cli(capsys, "decrypt", tmp_path / "c", out, "--key", k, "--bind", "/c")
    assert (rc, stdout, err) == (EXIT_ERROR, "", no_space(out))
    assert everything_under(mnt) == []  # no partial file, no directory the command created


@pytest.mark.parametrize("workers", [1, 2])
def test_decrypt_20mb_onto_17mib_fails_and_leaves_nothing(
    tmp_path: Path, tmpfs: Callable[[str], Path], capsys: pytest.CaptureFixture[str],
    workers: int, space: str,
):  # fmt: skip
    k, key = keyfile(tmp_path, Format.STREAM)
    (tmp_path / "p").write_bytes(os.urandom(20 * MB))
    encrypt_file(tmp_path / "p", tmp_path / "c", key, bind="/c")
    mnt = tmpfs("17m")
    out = mnt / "p"
    rc, stdout, err = cli(
        capsys, "decrypt", tmp_path / "c", out, "--key", k, "--bind", "/c",
        "--workers", str(workers),
    )  # fmt: skip
    assert (rc, stdout, err) == (EXIT_ERROR, "", no_space(out))
    assert everything_under(mnt) == []


def test_decrypt_that_fits_the_tmpfs_still_works(
    tmp_path: Path, tmpfs: Callable[[str], Path], space: str
):
    key = generate_key()
    data = os.urandom(600_000)
    (tmp_path / "p").write_bytes(data)
    encrypt_file(tmp_path / "p", tmp_path / "c", key, bind="/c")
    mnt = tmpfs("1m")
    decrypt_file(tmp_path / "c", mnt / "p", key, bind="/c")
    assert (mnt / "p").read_bytes() == data and everything_under(mnt) == ["p"]


# -- encrypt ------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_encrypt_onto_a_full_tmpfs_fails_with_one_line_and_leaves_nothing(
    tmp_path: Path, tmpfs: Callable[[str], Path], capsys: pytest.CaptureFixture[str], fmt: Format,
    space: str,
):  # fmt: skip
    # the issue: a raw OSError traceback, a chained BufferError, and an empty output directory
    k, _ = keyfile(tmp_path, fmt)
    (tmp_path / "p").write_bytes(os.urandom(3 * MB))
    mnt = tmpfs("1m")
    out = mnt / "enc" / "p.enc"
    rc, stdout, err = cli(capsys, "encrypt", tmp_path / "p", out, "--key", k, "--format", fmt)
    assert (rc, stdout, err) == (EXIT_ERROR, "", no_space(out))
    assert everything_under(mnt) == []


@pytest.mark.parametrize("fmt", FORMATS)
def test_encrypt_error_is_the_write_error_not_a_buffer_error(
    tmp_path: Path, tmpfs: Callable[[str], Path], fmt: Format, space: str
):
    (tmp_path / "p").write_bytes(os.urandom(3 * MB))
    mnt = tmpfs("1m")
    with pytest.raises(OutputWriteError) as info:
        encrypt_file(tmp_path / "p", mnt / "p.enc", generate_key(fmt), fmt=fmt)
    assert info.value.message == f"{mnt / 'p.enc'}: no space left on device"
    assert info.value.errno == errno.ENOSPC
    assert not isinstance(info.value.__context__, BufferError)
    assert everything_under(mnt) == []


# -- directories --------------------------------------------------------------------------------


def tree_of(root: Path, sizes: dict[str, int]) -> Path:
    for rel, size in sizes.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(os.urandom(size))
    return root


@pytest.mark.parametrize("fmt", FORMATS)
def test_directory_encrypt_onto_a_full_tmpfs_leaves_no_half_directory(
    tmp_path: Path, tmpfs: Callable[[str], Path], capsys: pytest.CaptureFixture[str], fmt: Format,
    space: str,
):  # fmt: skip
    k, _ = keyfile(tmp_path, fmt)
    src = tree_of(tmp_path / "plain", {"a": 300_000, "b/c": 300_000, "b/d/e": 600_000})
    mnt = tmpfs("1m")
    rc, stdout, err = cli(capsys, "encrypt", src, mnt / "enc", "--key", k, "--format", fmt)
    assert rc == EXIT_ERROR and stdout == ""
    assert re.fullmatch(rf"error: {re.escape(str(mnt))}/enc/\S+: no space left on device\n", err)
    assert everything_under(mnt) == []  # not the files that fitted, not enc/ nor enc/b/


def test_directory_decrypt_onto_a_full_tmpfs_leaves_no_half_directory(
    tmp_path: Path, tmpfs: Callable[[str], Path], capsys: pytest.CaptureFixture[str], space: str
):
    k, key = keyfile(tmp_path, Format.STREAM)
    src = tree_of(tmp_path / "plain", {"a": 300_000, "b/c": 300_000, "b/d/e": 600_000})
    encrypt_path(src, tmp_path / "enc", key, bind="/data")
    mnt = tmpfs("1m")
    (mnt / "mine").mkdir()  # a directory the command did not create stays, and so does its file
    (mnt / "mine" / "keep").write_bytes(b"keep")
    rc, _, err = cli(capsys, "decrypt", tmp_path / "enc", mnt / "mine" / "dec", "--key", k,
                     "--bind", "/data")  # fmt: skip
    assert rc == EXIT_ERROR and err.endswith(": no space left on device\n") and "\n" not in err[:-1]
    assert everything_under(mnt) == ["mine", "mine/keep"]
    with pytest.raises(OutputWriteError, match="no space left on device"):
        decrypt_path(tmp_path / "enc", mnt / "dec", key, bind="/data")
    assert everything_under(mnt) == ["mine", "mine/keep"]


def test_forced_directory_decrypt_that_fails_keeps_the_old_files(
    tmp_path: Path, tmpfs: Callable[[str], Path]
):
    key = generate_key()
    src = tree_of(tmp_path / "plain", {"a": 100_000, "b": 960_000})
    encrypt_path(src, tmp_path / "enc", key, bind="/data")
    mnt = tmpfs("1m")
    (mnt / "dec").mkdir()
    (mnt / "dec" / "a").write_bytes(b"old a")
    with pytest.raises(OutputWriteError):
        decrypt_path(tmp_path / "enc", mnt / "dec", key, bind="/data", overwrite=True)
    assert (
        everything_under(mnt) == ["dec", "dec/a"] and (mnt / "dec" / "a").read_bytes() == b"old a"
    )


@pytest.mark.parametrize("fmt", FORMATS)
def test_rekey_on_a_full_tmpfs_keeps_the_file_under_the_old_key(
    tmp_path: Path, tmpfs: Callable[[str], Path], fmt: Format, space: str
):
    from shieldml.files import rekey_path

    old, new = generate_key(fmt), generate_key(fmt)
    data = os.urandom(600_000)
    (tmp_path / "p").write_bytes(data)
    mnt = tmpfs("1m")
    encrypt_file(tmp_path / "p", mnt / "c", old, fmt=fmt, bind="/c")
    before = (mnt / "c").read_bytes()
    with pytest.raises(OutputWriteError, match=f"^{re.escape(str(mnt / 'c'))}: no space left"):
        rekey_path(mnt / "c", old, new, bind="/c")
    assert everything_under(mnt) == ["c"] and (mnt / "c").read_bytes() == before


# -- short writes, write errors, reservation ------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_short_writes_of_one_byte_still_write_every_byte(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: Format
):
    key = generate_key(fmt)
    data = os.urandom(9000)
    (tmp_path / "p").write_bytes(data)
    real = os.pwrite
    calls = 0

    def one_byte(fd: int, buf: Any, offset: int) -> int:
        nonlocal calls
        calls += 1
        with memoryview(buf) as view, view.cast("B") as b:
            return real(fd, b[:1], offset)

    monkeypatch.setattr(os, "pwrite", one_byte)
    encrypt_file(tmp_path / "p", tmp_path / "c", key, fmt=fmt, bind="/c")
    decrypt_file(tmp_path / "c", tmp_path / "d", key, bind="/c")
    monkeypatch.undo()
    assert (tmp_path / "d").read_bytes() == data
    assert calls >= ciphertext_size(fmt, len(data)) + len(data)  # one call per byte


def test_short_writes_to_a_raw_sink_are_continued(tmp_path: Path):
    class Trickle:  # a raw file that takes at most 7 bytes per call
        def __init__(self, f: Any) -> None:
            self.f = f

        def write(self, b: Any) -> int:
            with memoryview(b) as view, view.cast("B") as v:
                return int(self.f.write(v[:7]))

        def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
            return int(self.f.seek(offset, whence))

        def flush(self) -> None:
            self.f.flush()

    data = os.urandom(10_000)
    for fmt, cls in ((Format.STREAM, StreamWriter), (Format.GRAMINE_PF, GramineWriter)):
        key = generate_key(fmt)
        with open(tmp_path / "c", "wb", buffering=0) as raw:
            w = cls(Trickle(raw), key, "/c")
            w.write(data)
            w.close()
        with open_protected(tmp_path / "c", key, bind="/c") as f:
            assert f.read() == data
        os.unlink(tmp_path / "c")


def test_a_write_of_zero_bytes_is_an_error_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    key = generate_key()
    (tmp_path / "p").write_bytes(os.urandom(5000))
    encrypt_file(tmp_path / "p", tmp_path / "c", key, bind="/c")
    monkeypatch.setattr(os, "pwrite", lambda fd, buf, offset: 0)
    with pytest.raises(OutputWriteError, match=r"/out/d: the system wrote 0 bytes"):
        decrypt_file(tmp_path / "c", tmp_path / "out" / "d", key, bind="/c")
    with pytest.raises(OutputWriteError, match=r"/e: the system wrote 0 bytes"):
        encrypt_file(tmp_path / "p", tmp_path / "e", key)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c", "p"]

    class Stuck:
        def write(self, b: Any) -> int:
            return 0

        def seek(self, offset: int, whence: int = 0) -> int:
            return offset

        def flush(self) -> None:
            pass

    with pytest.raises(OSError, match="0 bytes"):
        StreamWriter(Stuck(), key, "/c")  # type: ignore[arg-type]


def test_an_io_error_names_the_output_with_its_strerror(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
):
    k, key = keyfile(tmp_path, Format.STREAM)
    (tmp_path / "p").write_bytes(os.urandom(5000))
    encrypt_file(tmp_path / "p", tmp_path / "c", key, bind="/c")

    def broken(fd: int, buf: Any, offset: int) -> int:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "pwrite", broken)
    out = tmp_path / "d"
    rc, _, err = cli(capsys, "decrypt", tmp_path / "c", out, "--key", k, "--bind", "/c")
    assert (rc, err) == (EXIT_ERROR, f"error: {out}: {os.strerror(errno.EIO)}\n")
    assert not out.exists() and not list(tmp_path.glob(".d.*"))


def test_reserve_falls_back_cleanly_where_the_filesystem_cannot_fallocate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    def refusing(code: int) -> Callable[[int, int, int], None]:
        def fallocate(fd: int, offset: int, length: int) -> None:
            raise OSError(code, os.strerror(code))

        return fallocate

    with open(tmp_path / "f", "wb") as f:
        assert reserve(f.fileno(), 12345) is (hasattr(os, "posix_fallocate"))
        assert os.fstat(f.fileno()).st_size == 12345
        for code in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            monkeypatch.setattr(os, "posix_fallocate", refusing(code), raising=False)
            assert reserve(f.fileno(), 20000 + code) is False
            assert os.fstat(f.fileno()).st_size == 20000 + code
        monkeypatch.setattr(os, "posix_fallocate", refusing(errno.ENOSPC), raising=False)
        with pytest.raises(OSError) as info:
            reserve(f.fileno(), 1 << 40)
        assert info.value.errno == errno.ENOSPC
        monkeypatch.delattr(os, "posix_fallocate", raising=False)
        assert reserve(f.fileno(), 7) is False and os.fstat(f.fileno()).st_size == 7
        assert reserve(f.fileno(), 0) is False and os.fstat(f.fileno()).st_size == 0


@pytest.mark.parametrize("fmt", FORMATS)
def test_reserved_size_is_exactly_the_ciphertext_size(tmp_path: Path, fmt: Format):
    key = generate_key(fmt)
    seg = (1 << 20) - 56
    sizes = [0, 1, 3071, 3072, 3073, 3072 + 4096, 3072 + 96 * 4096, 3072 + 97 * 4096 + 5]
    sizes += [seg - 1, seg, seg + 1, seg + (1 << 20) - 16, seg + (1 << 20) - 15]
    for n in sizes:
        (tmp_path / "p").write_bytes(b"\1" * n)
        encrypt_file(tmp_path / "p", tmp_path / "c", key, fmt=fmt, overwrite=True)
        assert (tmp_path / "c").stat().st_size == ciphertext_size(fmt, n), n
        with open_protected(tmp_path / "c", key) as f:
            assert f.read() == b"\1" * n


# -- Ctrl-C ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_interrupted_encrypt_raises_keyboardinterrupt_and_leaves_nothing(
    tmp_path: Path, fmt: Format
):
    (tmp_path / "p").write_bytes(os.urandom(20 * MB))

    def interrupt(n: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt) as info:
        encrypt_file(tmp_path / "p", tmp_path / "out" / "c", generate_key(fmt), fmt=fmt,
                     progress=interrupt)  # fmt: skip
    assert not isinstance(info.value.__context__, BufferError)
    with pytest.raises(KeyboardInterrupt):
        encrypt_path(tmp_path / "p", tmp_path / "out" / "c", generate_key(fmt), fmt=fmt,
                     progress=interrupt)  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p"]


def children(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return []


# Ctrl-C is Python's KeyboardInterrupt even where this suite was started with SIGINT ignored
# (a background job of a shell without job control: nohup, some CI agents), which a child
# would inherit; the CLI itself leaves SIGINT as it finds it, as every program does.
CLI_WITH_CTRL_C = (
    "import runpy, signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "runpy.run_module('shieldml.cli', run_name='__main__', alter_sys=True)"
)


def shieldml(*argv: str | Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", CLI_WITH_CTRL_C, *map(os.fspath, argv)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group: the signal goes to it as Ctrl-C would
    )


def wait_for(cond: Callable[[], bool], proc: subprocess.Popen[str], what: str) -> None:
    deadline = time.monotonic() + 60
    while not cond():
        if proc.poll() is not None:
            pytest.fail(f"shieldml ended (rc {proc.returncode}) before {what}: {proc.stderr}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.005)


def needs_free_space(path: Path, size: int) -> None:
    st = os.statvfs(path)
    if st.f_bavail * st.f_frsize < 2 * size:
        pytest.skip(f"needs {2 * size >> 30} GiB free under {path} for the interrupted output")


@pytest.mark.parametrize(("fmt", "gib"), [(Format.STREAM, 4), (Format.GRAMINE_PF, 1)])
def test_ctrl_c_during_encrypt_says_interrupted_exits_130_and_leaves_nothing(
    tmp_path: Path, fmt: Format, gib: int
):
    # the issue: exit 1 and a traceback (a BufferError chained to the KeyboardInterrupt)
    size = gib << 30
    needs_free_space(tmp_path, size)
    k, _ = keyfile(tmp_path, fmt)
    with open(tmp_path / "big", "wb") as f:  # sparse: costs no disk, reads as zeros
        f.truncate(size)
    out = tmp_path / "out"
    proc = shieldml("encrypt", tmp_path / "big", out / "big.enc", "--key", k, "--format", fmt)

    def writing() -> bool:  # ciphertext appears in the first nodes once the output is reserved
        partial = list(out.glob(".big.enc.*.partial")) if out.is_dir() else []
        if not partial:
            return False
        with partial[0].open("rb") as f:
            return any(f.read(16384))

    wait_for(writing, proc, "it started writing")
    time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)
    stdout, err = proc.communicate(timeout=60)
    # click ends the ^C line with a newline first, as for every interrupted command
    assert (proc.returncode, stdout, err.strip()) == (EXIT_INTERRUPTED, "", "interrupted")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big", k.name]


def test_ctrl_c_during_decrypt_with_workers_prints_no_worker_traceback(tmp_path: Path):
    size = 1 << 30
    needs_free_space(tmp_path, 2 * size)
    k, key = keyfile(tmp_path, Format.STREAM)
    with open(tmp_path / "big", "wb") as f:
        f.truncate(size)
    encrypt_file(tmp_path / "big", tmp_path / "c", key, bind="/c")
    os.unlink(tmp_path / "big")
    proc = shieldml("decrypt", tmp_path / "c", tmp_path / "d", "--key", k, "--bind", "/c",
                    "--workers", "2")  # fmt: skip
    wait_for(lambda: len(children(proc.pid)) >= 2, proc, "both workers started")
    os.killpg(proc.pid, signal.SIGINT)
    stdout, err = proc.communicate(timeout=60)
    # click ends the ^C line with a newline first, as for every interrupted command
    assert (proc.returncode, stdout, err.strip()) == (EXIT_INTERRUPTED, "", "interrupted")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c", k.name]


# -- messages -------------------------------------------------------------------------------------


def test_wrong_bind_on_a_stream_file_says_wrong_bind_not_only_failed_authentication(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    k, key = keyfile(tmp_path, Format.STREAM)
    (tmp_path / "p").write_bytes(os.urandom(3 * MB))
    encrypt_file(tmp_path / "p", tmp_path / "c", key, bind="/models/p")
    rc, _, err = cli(capsys, "decrypt", tmp_path / "c", tmp_path / "d", "--key", k,
                     "--bind", "/models/q")  # fmt: skip
    assert rc == EXIT_INTEGRITY and "failed authentication (segment 0)" in err
    assert "wrong key, wrong --bind path, or modified" in err
    with open(tmp_path / "c", "r+b") as f:  # a change after a segment that authenticated
        f.seek(29 + (2 << 20) + 100)
        f.write(b"\xff" * 4)
    rc, _, err = cli(capsys, "decrypt", tmp_path / "c", tmp_path / "d", "--key", k,
                     "--bind", "/models/p")  # fmt: skip
    assert rc == EXIT_INTEGRITY and "(segment 2)" in err
    assert "the file was modified" in err and "--bind" not in err


@pytest.mark.parametrize("fmt", FORMATS)
def test_key_of_the_other_format_names_both_files_and_no_format_flag(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], fmt: Format
):
    other = Format.GRAMINE_PF if fmt is Format.STREAM else Format.STREAM
    _, key = keyfile(tmp_path, fmt)
    wrong, _ = keyfile(tmp_path, other)
    (tmp_path / "p").write_bytes(b"x" * 5000)
    c = tmp_path / "c"
    encrypt_file(tmp_path / "p", c, key, fmt=fmt, bind="/c")
    for argv in (
        ("decrypt", c, tmp_path / "d", "--key", wrong, "--bind", "/c"),
        ("inspect", c, "--key", wrong),
        ("rekey", c, "--key", wrong, "--new-key", wrong, "--bind", "/c"),
    ):
        rc, _, err = cli(capsys, *argv)
        assert rc == EXIT_ERROR, argv
        assert f"{c}: a {fmt} file needs a {fmt.key_size}-byte {fmt} key" in err, argv
        assert f"key file {wrong} is a {other.key_size}-byte {other} key" in err, argv
        assert "--format" not in err, argv
    assert not (tmp_path / "d").exists()
    with pytest.raises(KeyFileError, match="the key given is a"):
        open_protected(c, generate_key(other), bind="/c")
