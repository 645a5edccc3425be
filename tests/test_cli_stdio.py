"""``-`` for standard input and output in ``shieldml encrypt`` and ``decrypt``.

The host may hand the decrypting side any byte stream: cut short at a segment boundary, with a
segment swapped, extended, or made for another path. Nothing unauthenticated may reach standard
output, and a failure after some output must exit non-zero saying that the output is a prefix.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from shieldml.cli import EXIT_ERROR, EXIT_INTEGRITY, EXIT_OK, EXIT_USAGE, main
from shieldml.files import Format, decrypt_stream, encrypt_stream, generate_key
from shieldml.files._stream import HEADER_SIZE, TINK_HEADER_SIZE

SEG = 1 << 20
FIRST = SEG - TINK_HEADER_SIZE - 16  # plaintext bytes in segment 0
REST = SEG - 16  # in every later full segment
SRC = str(Path(__file__).resolve().parents[1] / "src")


def _plain(n: int) -> bytes:
    return bytes((i * 7 + 3) % 251 for i in range(256)) * (n // 256) + bytes(n % 256)


class Stdio:
    """Standard input from bytes, standard output captured as bytes, for in-process main()."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, capsysbinary: pytest.CaptureFixture[bytes]):
        self.mp, self.cap = monkeypatch, capsysbinary

    def __call__(self, stdin: bytes, *argv: str) -> tuple[int, bytes, str]:
        self.mp.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin)))
        rc = main(list(argv))
        cap = self.cap.readouterr()
        return rc, cap.out, cap.err.decode()


@pytest.fixture
def sh(monkeypatch: pytest.MonkeyPatch, capsysbinary: pytest.CaptureFixture[bytes]) -> Stdio:
    return Stdio(monkeypatch, capsysbinary)


@pytest.fixture
def key(tmp_path: Path) -> Path:
    k = tmp_path / "k"
    k.write_bytes(generate_key())
    return k


def _encrypt(key: Path, data: bytes, bind: str = "/m") -> bytes:
    sink = io.BytesIO()
    encrypt_stream(io.BytesIO(data), sink, key.read_bytes(), bind=bind)
    return sink.getvalue()


def test_round_trip_through_pipes(sh: Stdio, key: Path, tmp_path: Path):
    data = _plain(FIRST + REST + 100)  # three segments
    rc, ct, err = sh(data, "encrypt", "-", "-", "--key", str(key), "--bind", "/m")
    assert rc == EXIT_OK and ct[:8] == b"SHIELDML", err
    assert "encrypted <stdin> -> <stdout>" in err  # the report goes beside the data, not in it
    rc, out, err = sh(ct, "decrypt", "-", "-", "--key", str(key), "--bind", "/m")
    assert rc == EXIT_OK and out == data, err
    # a file on either side, and the same bytes as the file API writes
    (tmp_path / "c").write_bytes(ct)
    rc, out, _ = sh(b"", "decrypt", str(tmp_path / "c"), "-", "--key", str(key), "--bind", "/m")
    assert rc == EXIT_OK and out == data
    rc, _, _ = sh(ct, "decrypt", "-", str(tmp_path / "d"), "--key", str(key), "--bind", "/m")
    assert rc == EXIT_OK and (tmp_path / "d").read_bytes() == data
    rc, _, _ = sh(data, "encrypt", "-", str(tmp_path / "e"), "--key", str(key))
    assert rc == EXIT_OK
    rc, out, _ = sh(b"", "decrypt", str(tmp_path / "e"), "-", "--key", str(key))
    assert rc == EXIT_OK and out == data  # bound to OUT as given by default, as for files


@pytest.mark.parametrize("size", [0, 1, FIRST, FIRST + 1, FIRST + REST])
def test_segment_edges_round_trip(key: Path, size: int):
    data = _plain(size)
    ct = _encrypt(key, data)
    out = io.BytesIO()
    assert decrypt_stream(io.BytesIO(ct), out, key.read_bytes(), bind="/m") == size
    assert out.getvalue() == data


def _cuts(ct: bytes) -> dict[str, bytes]:
    seg1 = HEADER_SIZE + SEG  # where segment 1 starts in the file
    return {
        "at_segment_boundary": ct[: seg1 + SEG],
        "inside_last_segment": ct[:-1],
        "header_only": ct[: HEADER_SIZE + TINK_HEADER_SIZE],
        "extended": ct + b"\0",
        "segments_swapped": ct[:seg1]
        + ct[seg1 + SEG : seg1 + 2 * SEG]
        + ct[seg1 : seg1 + SEG]
        + ct[seg1 + 2 * SEG :],
        "flipped_in_segment_1": ct[: seg1 + 5] + bytes([ct[seg1 + 5] ^ 1]) + ct[seg1 + 6 :],
    }


@pytest.mark.parametrize(
    ("attack", "prefix"),
    [
        ("at_segment_boundary", FIRST),  # segment 1 is then the last and fails as such
        ("inside_last_segment", FIRST + 2 * REST),
        ("header_only", 0),
        ("extended", FIRST + 2 * REST),
        ("segments_swapped", FIRST),
        ("flipped_in_segment_1", FIRST),
    ],
)
def test_truncated_or_tampered_stdin_emits_only_an_authenticated_prefix(
    sh: Stdio, key: Path, attack: str, prefix: int
):
    data = _plain(FIRST + 2 * REST + 10)  # four segments, the last short
    bad = _cuts(_encrypt(key, data))[attack]
    rc, out, err = sh(bad, "decrypt", "-", "-", "--key", str(key), "--bind", "/m")
    assert rc == EXIT_INTEGRITY, err
    assert out == data[:prefix]  # whole authenticated segments, never a byte more
    if out:
        assert f"the {prefix} bytes already written" in err and "prefix" in err


@pytest.mark.parametrize("attack", ["at_segment_boundary", "flipped_in_segment_1"])
def test_truncated_stdin_into_a_file_leaves_nothing(
    sh: Stdio, key: Path, tmp_path: Path, attack: str
):
    data = _plain(FIRST + 2 * REST + 10)
    bad = _cuts(_encrypt(key, data))[attack]
    dst = tmp_path / "out" / "plain"
    rc, _, err = sh(bad, "decrypt", "-", str(dst), "--key", str(key), "--bind", "/m")
    assert rc == EXIT_INTEGRITY, err
    assert not (tmp_path / "out").exists()  # no partial file, no directory made for it


def test_stdin_encrypted_for_another_path_is_refused_before_any_output(sh: Stdio, key: Path):
    ct = _encrypt(key, _plain(FIRST + 10), bind="/models/a")
    rc, out, err = sh(ct, "decrypt", "-", "-", "--key", str(key), "--bind", "/models/b")
    assert rc == EXIT_INTEGRITY and out == b""
    assert "wrong key, wrong --bind path, or modified" in err and "segment 0" in err


def test_wrong_key_on_stdin_is_named_before_decrypting(sh: Stdio, key: Path, tmp_path: Path):
    ct = _encrypt(key, b"secret")
    other = tmp_path / "other"
    other.write_bytes(generate_key())
    rc, out, err = sh(ct, "decrypt", "-", "-", "--key", str(other), "--bind", "/m")
    assert rc == EXIT_INTEGRITY and out == b"" and "wrong key" in err
    g = tmp_path / "g"
    g.write_bytes(generate_key(Format.GRAMINE_PF))
    rc, out, err = sh(ct, "decrypt", "-", "-", "--key", str(g), "--bind", "/m")
    assert rc == EXIT_ERROR and out == b"" and str(g) in err and "<stdin>" in err


def test_gramine_pf_through_a_pipe_says_why_not(sh: Stdio, tmp_path: Path):
    g = tmp_path / "g"
    g.write_bytes(generate_key(Format.GRAMINE_PF))
    data = _plain(10000)
    rc, out, err = sh(data, "encrypt", "-", "-", "--key", str(g), "--format", "gramine-pf",
                      "--bind", "/x")  # fmt: skip
    assert rc == EXIT_ERROR and out == b"" and "seekable" in err and "gramine-pf" in err
    # from a pipe into a file it works (the output is seekable), and back out to a pipe
    pf = tmp_path / "pf"
    rc, _, err = sh(data, "encrypt", "-", str(pf), "--key", str(g), "--format", "gramine-pf")
    assert rc == EXIT_OK, err
    rc, out, _ = sh(b"", "decrypt", str(pf), "-", "--key", str(g))
    assert rc == EXIT_OK and out == data
    rc, out, err = sh(pf.read_bytes(), "decrypt", "-", "-", "--key", str(g), "--bind", str(pf))
    assert rc == EXIT_ERROR and out == b"" and "random access" in err


def test_usage_errors_name_what_is_missing(sh: Stdio, key: Path, tmp_path: Path):
    rc, _, err = sh(b"x", "encrypt", "-", "-", "--key", str(key))
    assert rc == EXIT_USAGE and "--bind" in err
    rc, _, err = sh(b"x", "decrypt", "-", "-", "--key", str(key))
    assert rc == EXIT_USAGE and "--bind" in err
    rc, _, err = sh(b"x", "decrypt", "-", "-", "--key", str(key), "--bind", "/m", "--workers", "2")
    assert rc == EXIT_USAGE and "--workers" in err
    (tmp_path / "d").mkdir()
    rc, _, err = sh(b"", "encrypt", str(tmp_path / "d"), "-", "--key", str(key), "--bind", "/m")
    assert rc == EXIT_USAGE and "directory" in err


def test_json_report_goes_to_stderr_when_stdout_carries_data(sh: Stdio, key: Path):
    rc, ct, err = sh(b"abc", "encrypt", "-", "-", "--key", str(key), "--bind", "/m", "--json")
    assert rc == EXIT_OK and ct[:8] == b"SHIELDML"
    doc = json.loads(err.strip().splitlines()[-1])
    assert doc["action"] == "encrypted" and doc["files"][0]["bound_path"] == "/m"


def test_real_pipe_cut_short_exits_non_zero(key: Path, tmp_path: Path):
    """The console script between real pipes: the consumer sees the exit status."""
    data = _plain(FIRST + REST + 10)
    ct = _encrypt(key, data)
    env = {**os.environ, "PYTHONPATH": SRC}
    cmd = [sys.executable, "-m", "shieldml.cli", "decrypt", "-", "-", "--key", str(key)]
    p = subprocess.run([*cmd, "--bind", "/m"], input=ct[: HEADER_SIZE + SEG + 100], env=env,
                       capture_output=True, check=False)  # fmt: skip
    assert p.returncode == EXIT_INTEGRITY
    assert p.stdout == data[:FIRST] and b"prefix" in p.stderr and b"Traceback" not in p.stderr
