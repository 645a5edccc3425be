"""``shieldml broker fingerprint``: the SHA-256 of STATE/tls-cert.pem, as clients pin it."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from shieldml.broker.server import self_signed
from shieldml.broker.tls import cert_fingerprint
from shieldml.cli import main


def test_prints_the_fingerprint_of_the_state_dirs_certificate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    cert = self_signed(tmp_path, ["127.0.0.1"]).cert
    expected = cert_fingerprint(cert.read_bytes())
    assert main(["broker", "fingerprint", "--state", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == expected
    assert main(["broker", "fingerprint", "--state", str(tmp_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {
        "path": str(tmp_path / "tls-cert.pem"),
        "fingerprint": expected,
    }


def test_the_default_state_is_under_shieldml_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
):
    monkeypatch.setenv("SHIELDML_HOME", str(tmp_path))
    (tmp_path / "broker").mkdir()
    cert = self_signed(tmp_path / "broker", ["127.0.0.1"]).cert
    assert main(["broker", "fingerprint"]) == 0
    assert capsys.readouterr().out.strip() == cert_fingerprint(cert.read_bytes())


def test_missing_or_partial_certificate_is_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    assert main(["broker", "fingerprint", "--state", str(tmp_path)]) == 1
    assert "tls-cert.pem" in capsys.readouterr().err
    (tmp_path / "tls-cert.pem").write_text("")  # a broker that has begun writing it
    assert main(["broker", "fingerprint", "--state", str(tmp_path), "--wait", "0.3"]) == 1
    assert "not a PEM certificate" in capsys.readouterr().err


def test_wait_returns_once_the_broker_wrote_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    made = tmp_path / "made"
    made.mkdir()
    pem = self_signed(made, ["127.0.0.1"]).cert.read_bytes()
    target = tmp_path / "state" / "tls-cert.pem"

    def broker_starts() -> None:
        time.sleep(0.3)
        target.parent.mkdir()
        target.write_bytes(pem[: len(pem) // 2])  # partial first
        time.sleep(0.3)
        target.write_bytes(pem)

    t = threading.Thread(target=broker_starts)
    t.start()
    try:
        rc = main(["broker", "fingerprint", "--state", str(target.parent), "--wait", "20"])
    finally:
        t.join()
    assert rc == 0
    assert capsys.readouterr().out.strip() == cert_fingerprint(pem)
