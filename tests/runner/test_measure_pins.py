"""`[[input]] sha256` pins a ciphertext: part of the workload digest (so a policy pinning the
digest pins the file), and `shieldml job measure` shows each pin against the file as it is."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest

from shieldml.cli import main
from shieldml.runner.manifest import JobManifest

SCRIPT_SHA = hashlib.sha256(b"print(1)\n").hexdigest()


def manifest(tmp_path: Path, pin: str | None) -> Path:
    (tmp_path / "infer.py").write_text("print(1)\n")
    (tmp_path / "a.enc").write_bytes(b"ciphertext A")
    (tmp_path / "b.enc").write_bytes(b"ciphertext B")
    line = f'sha256 = "{pin}"\n' if pin else ""
    m = tmp_path / "job.toml"
    m.write_text(f"""\
tee = "auto"
[command]
argv = ["{sys.executable}", "infer.py"]
[[trusted]]
path = "infer.py"
sha256 = "{SCRIPT_SHA}"
[[broker]]
name = "o"
url = "http://127.0.0.1:1"
[[input]]
path = "a"
ciphertext = "a.enc"
key = "k"
broker = "o"
{line}
[[input]]
path = "b"
ciphertext = "b.enc"
key = "k"
broker = "o"
""")
    return m


A = hashlib.sha256(b"ciphertext A").hexdigest()


def test_pin_is_part_of_the_workload_digest(tmp_path: Path):
    digests = {
        JobManifest.load(manifest(tmp_path, p)).workload_digest() for p in (None, A, "0" * 64)
    }
    assert len(digests) == 3  # a policy that pins the workload digest pins the ciphertext


def test_job_measure_shows_each_pin_against_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    m = manifest(tmp_path, A)
    assert main(["job", "measure", str(m)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("sha256:")
    assert (
        lines[1]
        == f"input {tmp_path.resolve()}/a: pinned sha256 {A} ({tmp_path.resolve()}/a.enc matches)"
    )
    b = hashlib.sha256(b"ciphertext B").hexdigest()
    assert (
        lines[2]
        == f"input {tmp_path.resolve()}/b: not pinned ({tmp_path.resolve()}/b.enc now sha256 {b})"
    )
    (tmp_path / "a.enc").write_bytes(b"an older version")  # what a rollback would put there
    assert main(["job", "measure", str(m), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [(i["pinned"], i["matches"]) for i in doc["inputs"]] == [(A, False), (None, None)]
    assert doc["inputs"][0]["sha256"] == hashlib.sha256(b"an older version").hexdigest()
    assert main(["job", "measure", str(m)]) == 0
    assert "DIFFERS" in capsys.readouterr().out
