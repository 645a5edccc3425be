"""stream format: round trips, random access, and every tampering the issue names is detected."""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shieldml.errors import FormatError, IntegrityError, UnsupportedVersionError, WrongKeyError
from shieldml.files import Format, encrypt_file, generate_key, key_id, open_protected
from shieldml.files import _stream as s
from tests.conftest import fuzz_examples

SEG = 4096  # small segments make every boundary cheap to reach
FIRST = SEG - 56
BOUNDARIES = [0, 1, FIRST - 1, FIRST, FIRST + 1, FIRST + SEG - 16, FIRST + SEG - 15, 5 * SEG]


def write(data: bytes, key: bytes, bind: str = "/in/tee", seg: int = SEG) -> bytes:
    sink = io.BytesIO()
    w = s.StreamWriter(sink, key, bind, segment_size=seg)
    # uneven writes exercise buffering
    for i in range(0, len(data), 1000):
        w.write(data[i : i + 1000])
    w.close()
    return sink.getvalue()


def reader(tmp_path: Path, blob: bytes, key: bytes, bind: str = "/in/tee") -> s.StreamReader:
    path = tmp_path / "f.enc"
    path.write_bytes(blob)
    return s.StreamReader(path, key, bind)


@pytest.fixture
def key() -> bytes:
    return generate_key(Format.STREAM)


@pytest.mark.parametrize("size", BOUNDARIES)
def test_roundtrip_at_segment_boundaries(tmp_path: Path, key: bytes, size: int):
    data = os.urandom(size)
    blob = write(data, key)
    with reader(tmp_path, blob, key) as f:
        assert f.size == size
        assert f.read() == data
        assert f.read() == b""


def test_header_layout(tmp_path: Path, key: bytes):
    blob = write(b"hello", key)
    hdr = s.StreamHeader.from_bytes(blob)
    assert blob[:8] == b"SHIELDML" and blob[8] == 1
    assert hdr.segment_size == SEG and hdr.key_id == key_id(key)
    assert hdr.to_bytes() == blob[: s.HEADER_SIZE]
    assert blob[s.HEADER_SIZE] == 40  # Tink header length byte


@settings(
    max_examples=fuzz_examples(60),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    data=st.binary(max_size=5 * SEG),
    ops=st.lists(st.tuples(st.integers(0, 6 * SEG), st.integers(0, 3 * SEG)), max_size=12),
)
def test_random_access_matches_plaintext(tmp_path: Path, data: bytes, ops: list[tuple[int, int]]):
    k = bytes(32)
    with reader(tmp_path, write(data, k), k) as f:
        for pos, n in ops:
            f.seek(pos)
            buf = bytearray(n)
            got = f.readinto(buf)
            assert bytes(buf[:got]) == data[pos : pos + n]
            assert f.tell() == pos + got


def test_seek_whence(tmp_path: Path, key: bytes):
    data = os.urandom(3 * SEG)
    with reader(tmp_path, write(data, key), key) as f:
        assert f.seek(-10, os.SEEK_END) == len(data) - 10
        assert f.read() == data[-10:]
        f.seek(5)
        f.seek(5, os.SEEK_CUR)
        assert f.read(3) == data[10:13]
        with pytest.raises(ValueError):
            f.seek(-1)


def test_wrong_key_is_reported_before_decrypting(tmp_path: Path, key: bytes):
    blob = write(b"x" * 100, key)
    with pytest.raises(WrongKeyError, match="wrong key"):
        reader(tmp_path, blob, generate_key())


def test_swapping_files_between_paths_is_detected(tmp_path: Path, key: bytes):
    a = write(b"model weights", key, bind="/data/model.pt")
    with pytest.raises(IntegrityError, match="segment 0"):
        with reader(tmp_path, a, key, bind="/data/input.bin") as f:
            f.read()


@pytest.mark.parametrize("offset", range(s.HEADER_SIZE + s.TINK_HEADER_SIZE))
def test_every_header_byte_is_authenticated(tmp_path: Path, key: bytes, offset: int):
    blob = bytearray(write(os.urandom(2 * SEG), key))
    blob[offset] ^= 0x01
    with pytest.raises((IntegrityError, FormatError)):
        with reader(tmp_path, bytes(blob), key) as f:
            f.read()


def test_version_is_checked(tmp_path: Path, key: bytes):
    blob = bytearray(write(b"abc", key))
    blob[8] = 2
    with pytest.raises(UnsupportedVersionError):
        reader(tmp_path, bytes(blob), key)


@pytest.mark.parametrize("cut", [1, 15, 16, 17, SEG - 1, SEG, SEG + 1, 2 * SEG])
def test_truncation_is_detected(tmp_path: Path, key: bytes, cut: int):
    blob = write(os.urandom(3 * SEG), key)
    with pytest.raises(IntegrityError):
        with reader(tmp_path, blob[:-cut], key) as f:
            f.read()


def test_truncation_at_a_segment_boundary_is_detected(tmp_path: Path, key: bytes):
    """Dropping whole trailing segments leaves a valid-looking length: the last flag catches it."""
    blob = write(os.urandom(3 * SEG), key)
    geo = s.Geometry(SEG, len(blob) - s.HEADER_SIZE)
    for keep in range(1, geo.count):
        with pytest.raises(IntegrityError, match=f"segment {keep - 1}"):
            with reader(tmp_path, blob[: s.HEADER_SIZE + keep * SEG], key) as f:
                f.read()


def test_reordered_segments_are_detected(tmp_path: Path, key: bytes):
    blob = write(os.urandom(4 * SEG), key)
    h = s.HEADER_SIZE
    seg1, seg2 = blob[h + SEG : h + 2 * SEG], blob[h + 2 * SEG : h + 3 * SEG]
    swapped = blob[: h + SEG] + seg2 + seg1 + blob[h + 3 * SEG :]
    with pytest.raises(IntegrityError, match="segment 1"):
        with reader(tmp_path, swapped, key) as f:
            f.read()


@settings(
    max_examples=fuzz_examples(80),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(pos=st.integers(min_value=0), bit=st.integers(0, 7))
def test_any_flipped_bit_is_detected(tmp_path: Path, pos: int, bit: int):
    k = b"\x07" * 32
    blob = bytearray(write(bytes(range(256)) * 40, k))
    blob[pos % len(blob)] ^= 1 << bit
    with pytest.raises((IntegrityError, FormatError)):
        with reader(tmp_path, bytes(blob), k) as f:
            f.read()


def test_failed_readinto_leaves_no_plaintext(tmp_path: Path, key: bytes):
    data = b"\xaa" * (3 * SEG)
    blob = bytearray(write(data, key))
    blob[s.HEADER_SIZE + SEG + 100] ^= 1  # segment 1
    buf = bytearray(b"\x55" * len(data))
    with reader(tmp_path, bytes(blob), key) as f, pytest.raises(IntegrityError):
        f.readinto(buf)
    assert b"\xaa" not in buf[FIRST:]  # nothing from the failed segment on


def test_abandoned_writer_is_refused(tmp_path: Path, key: bytes):
    sink = io.BytesIO()
    w = s.StreamWriter(sink, key, "/x", segment_size=SEG)
    w.write(os.urandom(2 * SEG))
    w.abort()
    with pytest.raises(IntegrityError):
        with reader(tmp_path, sink.getvalue(), key, "/x") as f:
            f.read()


def test_writer_exception_in_with_block_does_not_finalise(tmp_path: Path, key: bytes):
    sink = io.BytesIO()
    with pytest.raises(RuntimeError), s.StreamWriter(sink, key, "/x", segment_size=SEG) as w:
        w.write(b"partial")
        raise RuntimeError("boom")
    with pytest.raises(IntegrityError):
        with reader(tmp_path, sink.getvalue(), key, "/x") as f:
            f.read()


def test_default_segment_size_is_one_mib(tmp_path: Path, key: bytes):
    src = tmp_path / "in"
    src.write_bytes(os.urandom((1 << 20) + 5))
    encrypt_file(src, tmp_path / "o", key, bind="/b")
    raw = (tmp_path / "o").read_bytes()
    assert s.StreamHeader.from_bytes(raw).segment_size == 1 << 20
    with open_protected(tmp_path / "o", key, bind="/b") as f:
        assert f.read() == src.read_bytes()


def test_bad_segment_size_rejected(key: bytes):
    with pytest.raises(FormatError):
        s.StreamWriter(io.BytesIO(), key, "/x", segment_size=100)


def test_copy_to_other_file_keeps_binding(tmp_path: Path, key: bytes):
    """The binding is to the in-TEE path, not the host file name: a copy still opens."""
    src = tmp_path / "in"
    src.write_bytes(b"data")
    encrypt_file(src, tmp_path / "a", key, bind="/tee/data")
    shutil.copyfile(tmp_path / "a", tmp_path / "b")
    with open_protected(tmp_path / "b", key, bind="/tee/data") as f:
        assert f.read() == b"data"
