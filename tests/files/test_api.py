"""The format-independent API: detection, atomic output, trees, parallel decryption."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from shieldml.errors import IntegrityError, NotProtectedError, OutputExistsError
from shieldml.files import (
    Format,
    decrypt_file,
    decrypt_path,
    detect_format,
    encrypt_file,
    encrypt_path,
    generate_key,
    inspect_file,
    open_protected,
)

FORMATS = [Format.STREAM, Format.GRAMINE_PF]


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "plain"
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "a.bin").write_bytes(os.urandom(10000))
    (root / "sub" / "b.txt").write_bytes(b"hello")
    (root / "sub" / "deeper" / "c").write_bytes(b"")
    return root


def files_of(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("fmt", FORMATS)
def test_detect_and_inspect(tmp_path: Path, fmt: Format):
    key = generate_key(fmt)
    (tmp_path / "p").write_bytes(b"x" * 5000)
    encrypt_file(tmp_path / "p", tmp_path / "c", key, fmt=fmt)
    assert detect_format(tmp_path / "c") is fmt
    info = inspect_file(tmp_path / "c")
    assert info.format is fmt and info.version == 1
    if fmt is Format.STREAM:
        assert info.plaintext_size == 5000 and info.header_size == 29
        assert info.key_id == inspect_file(tmp_path / "c").key_id
    else:
        assert info.plaintext_size is None
        assert info.plaintext_size_range is not None
        lo, hi = info.plaintext_size_range
        assert lo <= 5000 <= hi
        assert inspect_file(tmp_path / "c", key).plaintext_size == 5000


def test_plain_file_is_reported_as_not_protected(tmp_path: Path):
    (tmp_path / "p").write_bytes(b"just some text")
    with pytest.raises(NotProtectedError, match="not a protected file"):
        open_protected(tmp_path / "p", generate_key())


@pytest.mark.parametrize("fmt", FORMATS)
def test_tree_roundtrip_binds_relative_paths(tmp_path: Path, tree: Path, fmt: Format):
    key = generate_key(fmt)
    enc, dec = tmp_path / "enc", tmp_path / "dec"
    items = encrypt_path(tree, enc, key, bind="/data", fmt=fmt)
    assert sorted(i.bind for i in items) == ["/data/a.bin", "/data/sub/b.txt", "/data/sub/deeper/c"]
    with open_protected(enc / "sub" / "b.txt", key, bind="/data/sub/b.txt") as f:
        assert f.read() == b"hello"
    decrypt_path(enc, dec, key, bind="/data")
    assert files_of(dec) == files_of(tree)


def test_tree_default_binding_is_output_path(tmp_path: Path, tree: Path):
    key = generate_key()
    enc = tmp_path / "enc"
    encrypt_path(tree, enc, key)
    with open_protected(enc / "a.bin", key) as f:  # default: the path as given
        assert f.bound_path == str(enc / "a.bin")
    decrypt_path(enc, tmp_path / "dec", key)  # decrypt defaults to IN: same strings
    assert files_of(tmp_path / "dec") == files_of(tree)


def test_existing_output_is_not_overwritten(tmp_path: Path):
    key = generate_key()
    (tmp_path / "p").write_bytes(b"data")
    (tmp_path / "c").write_bytes(b"precious")
    with pytest.raises(OutputExistsError):
        encrypt_file(tmp_path / "p", tmp_path / "c", key)
    assert (tmp_path / "c").read_bytes() == b"precious"
    encrypt_file(tmp_path / "p", tmp_path / "c", key, overwrite=True)
    assert detect_format(tmp_path / "c") is Format.STREAM


def test_failed_decrypt_leaves_nothing(tmp_path: Path):
    key = generate_key()
    (tmp_path / "p").write_bytes(os.urandom(3 << 20))
    encrypt_file(tmp_path / "p", tmp_path / "c", key, bind="/x")
    with (tmp_path / "c").open("r+b") as f:
        f.seek((2 << 20) + 100)  # segment i starts at 29 + i MiB
        f.write(b"\0\0\0\0")
    with pytest.raises(IntegrityError, match="segment 2"):
        decrypt_file(tmp_path / "c", tmp_path / "out", key, bind="/x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c", "p"]


def test_tree_with_unprotected_file_fails_before_writing(tmp_path: Path, tree: Path):
    key = generate_key()
    enc = tmp_path / "enc"
    encrypt_path(tree, enc, key)
    (enc / "zz-stray.txt").write_bytes(b"not encrypted")
    with pytest.raises(NotProtectedError, match="zz-stray"):
        decrypt_path(enc, tmp_path / "dec", key)
    assert not (tmp_path / "dec").exists()


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("workers", [2, 3])
def test_parallel_decrypt_matches(tmp_path: Path, fmt: Format, workers: int):
    key = generate_key(fmt)
    data = os.urandom((20 << 20) + 12345)
    (tmp_path / "p").write_bytes(data)
    encrypt_file(tmp_path / "p", tmp_path / "c", key, fmt=fmt, bind="f")
    seen: list[int] = []
    decrypt_file(
        tmp_path / "c", tmp_path / "d", key, bind="f", workers=workers, progress=seen.append
    )
    assert (tmp_path / "d").read_bytes() == data
    assert sum(seen) == len(data)


@pytest.mark.parametrize("fmt", FORMATS)
def test_parallel_decrypt_detects_tampering(
    tmp_path: Path, fmt: Format, capfd: pytest.CaptureFixture[str]
):
    key = generate_key(fmt)
    (tmp_path / "p").write_bytes(os.urandom(20 << 20))
    encrypt_file(tmp_path / "p", tmp_path / "c", key, fmt=fmt, bind="f")
    with (tmp_path / "c").open("r+b") as f:
        f.seek(15 << 20)
        f.write(b"\xff" * 8)
    with pytest.raises(IntegrityError):
        decrypt_file(tmp_path / "c", tmp_path / "d", key, bind="f", workers=2)
    assert not (tmp_path / "d").exists()
    assert "Traceback" not in capfd.readouterr().err


@pytest.mark.parametrize("fmt", FORMATS)
def test_rekey_in_place(tmp_path: Path, tree: Path, fmt: Format):
    from shieldml.cli import main
    from shieldml.files import rekey_path, write_key_file

    old, new = generate_key(fmt), generate_key(fmt)
    enc = tmp_path / "enc"
    encrypt_path(tree, enc, old, bind="/data", fmt=fmt)
    rekey_path(enc, old, new, bind="/data")
    with pytest.raises(IntegrityError):
        decrypt_path(enc, tmp_path / "x", old, bind="/data")
    decrypt_path(enc, tmp_path / "dec", new, bind="/data")
    assert files_of(tmp_path / "dec") == files_of(tree)
    assert not list(enc.rglob("*.partial"))
    newer = generate_key(fmt)
    write_key_file(tmp_path / "k1", new)
    write_key_file(tmp_path / "k2", newer)
    assert (
        main(
            [
                "rekey",
                str(enc),
                "--key",
                str(tmp_path / "k1"),
                "--new-key",
                str(tmp_path / "k2"),
                "--bind",
                "/data",
            ]
        )
        == 0
    )
    decrypt_path(enc, tmp_path / "dec2", newer, bind="/data")


def test_auto_workers_one_per_idle_core_for_large_files():
    from shieldml.files import auto_workers
    from shieldml.files._api import AUTO_WORKERS_MIN

    gib = 1 << 30
    assert auto_workers(AUTO_WORKERS_MIN - 1, cpus=16, load=0.0) == 1  # small: no fork
    assert auto_workers(gib, cpus=2, load=0.0) == 2
    assert auto_workers(gib, cpus=2, load=1.6) == 1  # the other core is busy
    assert auto_workers(gib, cpus=2, load=7.0) == 1  # overloaded: never fewer than one
    assert auto_workers(gib, cpus=16, load=0.0) == 8  # capped
    assert auto_workers(AUTO_WORKERS_MIN, cpus=16, load=0.0) == 2  # 32 MiB a worker at least
    assert 1 <= auto_workers(gib) <= 8  # this machine's cores and load


def test_busy_cores_are_the_threads_running_now_not_the_lagging_load_average():
    """Right after one decryption the one-minute load average still said 1 on an idle 2-core
    machine, so the next large file got one worker; the run queue says what runs now."""
    from shieldml.files._api import busy_cores

    assert busy_cores("0.98 0.80 0.55 1/312 4242\n") == 0.0  # only the caller runs
    assert busy_cores("0.02 0.01 0.00 3/312 4242\n") == 2.0  # two others run now
    assert busy_cores("garbled") >= 0.0  # unreadable: the load average instead
    assert busy_cores() >= 0.0


@pytest.mark.parametrize("fmt", FORMATS)
def test_automatic_workers_refuse_a_tampered_file_and_leave_nothing(
    tmp_path: Path, fmt: Format, monkeypatch: pytest.MonkeyPatch
):
    """workers=None on a file large enough for workers: a flipped byte in the last worker's
    range still fails the whole decryption, and no output is left."""
    import shieldml.files._api as api

    monkeypatch.setattr(api, "AUTO_WORKERS_MIN", 16 << 20)  # a small file still forks
    monkeypatch.setattr(api, "AUTO_WORKERS_SHARE", 8 << 20)
    monkeypatch.setattr(api, "busy_cores", lambda: 0.0)  # both cores idle, whatever runs now
    key = generate_key(fmt)
    (tmp_path / "p").write_bytes(os.urandom(20 << 20))
    encrypt_file(tmp_path / "p", tmp_path / "c", key, fmt=fmt, bind="f")
    assert api.auto_workers(20 << 20, cpus=2) == 2
    with (tmp_path / "c").open("r+b") as f:
        f.seek(18 << 20)
        f.write(b"\x01")
    with pytest.raises(IntegrityError):
        decrypt_file(tmp_path / "c", tmp_path / "d", key, bind="f", workers=None)
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("version", [1, 2])
def test_rekey_keeps_the_gramine_version(tmp_path: Path, version: int):
    """A Gramine v2 file stays v2 after a rekey (Gramine 1.8 would refuse it: v1 stays v1)."""
    from shieldml.files import encrypt_file, open_protected, rekey_path

    old, new = generate_key(Format.GRAMINE_PF), generate_key(Format.GRAMINE_PF)
    (tmp_path / "in").write_bytes(b"x" * 10000)
    enc = tmp_path / "file.pf"
    encrypt_file(tmp_path / "in", enc, old, bind="file.pf", fmt=Format.GRAMINE_PF,
                 gramine_version=version)  # fmt: skip
    rekey_path(enc, old, new, bind="file.pf")
    with open_protected(enc, new, bind="file.pf") as r:
        assert r.header.major_version == version
        assert r.read() == b"x" * 10000
