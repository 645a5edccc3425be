"""``broker serve --json`` (one JSON line once listening) and ``broker rotate-kek --json``."""

from __future__ import annotations

import json
import os
import selectors
import socket
import subprocess
import sys
import time
from pathlib import Path

from shieldml.broker.tls import cert_fingerprint


def _first_line(proc: subprocess.Popen[str], timeout: float) -> str:
    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sel.select(0.2):
            return proc.stdout.readline()
        if proc.poll() is not None:
            break
    raise AssertionError(f"no line from broker serve --json (exit {proc.poll()})")


def _cli(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "shieldml.cli", *argv], capture_output=True,
                          text=True, timeout=60, check=False)  # fmt: skip


def test_serve_json_line_names_address_fingerprint_and_state(tmp_path: Path):
    state = tmp_path / "state"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "shieldml.cli",
            "broker",
            "serve",
            "--json",
            "--state",
            str(state),
            "--port",
            "0",
            "--print-admin-token",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "COLUMNS": "500"},
    )
    try:
        doc = json.loads(_first_line(proc, 60))
        assert doc["event"] == "listening" and doc["state"] == str(state)
        assert doc["port"] > 0 and doc["url"] == f"https://127.0.0.1:{doc['port']}"
        cert = (state / "tls-cert.pem").read_bytes()
        assert doc["fingerprint"] == cert_fingerprint(cert)
        assert doc["admin_token_file"] == str(state / "admin-token")
        assert doc["admin_token"] == (state / "admin-token").read_text().strip()
        with socket.create_connection(("127.0.0.1", doc["port"]), timeout=5):
            pass  # the address it names is the one it listens on
    finally:
        proc.terminate()
        _, rest = proc.communicate(timeout=30)
    assert "admin token" not in rest  # with --json, stdout held the one line and nothing else

    r = _cli("broker", "rotate-kek", "--state", str(state), "--json")
    assert r.returncode == 0, r.stderr
    first = json.loads(r.stdout)
    assert first["rewrapped"] == 0 and first["kek_id"]
    again = json.loads(_cli("broker", "rotate-kek", "--state", str(state), "--json").stdout)
    assert again["kek_id"] != first["kek_id"]
