"""The serve manifest table and the attestation exchange's bytes, without processes."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import pytest

from shieldml.client import (
    ResponseReader,
    attestation_report_data,
    attestation_request,
    certificate_report_data,
)
from shieldml.errors import FormatError, ManifestError
from shieldml.runner.manifest import JobManifest

DIGEST = "sha256:" + "ab" * 32


def _manifest(tmp_path: Path, serve: str) -> JobManifest:
    (tmp_path / "s.py").write_text("print(1)\n")
    h = hashlib.sha256(b"print(1)\n").hexdigest()
    text = (
        f'version = 1\ntee = "simulated"\n[command]\nargv = ["{sys.executable}", "s.py"]\n'
        f'[[trusted]]\npath = "s.py"\nsha256 = "{h}"\n{serve}'
    )
    (tmp_path / "job.toml").write_text(text)
    return JobManifest.load(tmp_path / "job.toml")


def test_serve_port_and_ready_path_are_measured_listen_is_not(tmp_path: Path):
    base = _manifest(tmp_path, "").workload_digest()
    a = _manifest(tmp_path, "[serve]\nport = 8000\n").workload_digest()
    b = _manifest(tmp_path, "[serve]\nport = 8001\n").workload_digest()
    c = _manifest(tmp_path, '[serve]\nport = 8000\nready_path = "/health"\n').workload_digest()
    d = _manifest(tmp_path, '[serve]\nport = 8000\nlisten = "127.0.0.1:9"\n').workload_digest()
    assert len({base, a, b, c}) == 4
    assert d == a


@pytest.mark.parametrize(
    "table",
    ["port = 0", 'port = "8000"', "port = 8000\nready_path = 'x y'", "port = 1\nready_timeout = -1",
     "port = 1\nlisten = 'nohost'", "port = 1\nother = 2"],
)  # fmt: skip
def test_malformed_serve_table_is_refused(tmp_path: Path, table: str):
    with pytest.raises(ManifestError):
        _manifest(tmp_path, f"[serve]\n{table}\n")


ROOT = Path(__file__).resolve().parents[2]


def test_binding_vectors_of_docs_protocol():
    nonce = bytes(range(32))
    spki = bytes.fromhex("3059301306072a8648ce3d020106082a8648ce3d03010703420004") + bytes(64)
    doc = (ROOT / "docs" / "protocol.md").read_text().split("## 7. Attested serving")[1]
    fresh = doc.split("| fresh evidence | `")[1].split("`")[0]
    cert_rd = doc.split("| certificate | `")[1].split("`")[0]
    assert attestation_report_data(nonce, spki, DIGEST).hex() == fresh
    assert certificate_report_data(spki, DIGEST).hex() == cert_rd


def test_binding_strings_are_as_specified():
    nonce, spki = bytes(range(32)), b"\x30\x03\x02\x01\x00"
    want = hashlib.sha512(
        b"shieldml/v1 serve\0" + nonce + hashlib.sha256(spki).digest() + bytes.fromhex("ab" * 32)
    ).digest()
    assert attestation_report_data(nonce, spki, DIGEST) == want
    cert = certificate_report_data(spki, DIGEST)
    assert cert[:32] == hashlib.sha256(spki).digest()
    assert (
        cert[32:]
        == hashlib.sha256(b"shieldml/v1 serve certificate\0" + bytes.fromhex("ab" * 32)).digest()
    )
    with pytest.raises(FormatError):
        attestation_report_data(nonce[:31], spki, DIGEST)


def test_host_header_injection_is_refused():
    with pytest.raises(FormatError):
        attestation_request("a\r\nX-Evil: 1", bytes(32))


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}EXTRA",
        b"HTTP/1.1 200 OK\r\nContent-Length: 99999999\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n",
        b"SSH-2.0-OpenSSH\r\n\r\n",
    ],
)
def test_malformed_or_oversized_attestation_answers_are_refused(answer: bytes):
    with pytest.raises(FormatError):
        ResponseReader().feed(answer)


def test_endless_header_is_refused():
    r = ResponseReader()
    with pytest.raises(FormatError):
        for _ in range(100):
            r.feed(b"X" * 1024)


def test_answer_split_across_reads_is_read_whole():
    r = ResponseReader()
    raw = b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nbody"
    assert not any(r.feed(raw[i : i + 1]) for i in range(len(raw) - 1))
    assert r.feed(raw[-1:]) and r.status == 200 and r.body == b"body"


def test_serve_of_a_batch_job_is_refused_before_anything_runs(tmp_path: Path):
    from shieldml.serve import serve_job

    _manifest(tmp_path, "")
    with pytest.raises(ManifestError, match=r"needs a \[serve\] table"):
        serve_job(tmp_path / "job.toml")
