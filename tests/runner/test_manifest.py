"""Job manifests: validation, the workload digest, `shieldml job init|measure`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shieldml.cli import main
from shieldml.runner.manifest import HashCache, JobManifest, ManifestError, TrustedFileError


def scaffold(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    (tmp_path / "infer.py").write_text("print('hi')\n")
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "util.py").write_text("X = 1\n")
    assert main(["job", "init", str(tmp_path / "infer.py"), "-o", str(tmp_path / "job.toml")]) == 0
    capsys.readouterr()
    return tmp_path / "job.toml"


def test_init_then_measure(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    m = scaffold(tmp_path, capsys)
    assert main(["job", "measure", str(m), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["workload_digest"].startswith("sha256:") and doc["trusted_files"][0][
        "path"
    ].endswith("infer.py")
    assert main(["job", "init", str(tmp_path / "infer.py"), "-o", str(m)]) == 1  # never overwrites


def test_digest_changes_with_script_manifest_and_globbed_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    m = scaffold(tmp_path, capsys)
    m.write_text(m.read_text() + '\n[[trusted]]\nglob = "lib/**/*.py"\n')
    d1 = JobManifest.load(m).workload_digest()
    (tmp_path / "lib" / "util.py").write_text("X = 2\n")
    d2 = JobManifest.load(m).workload_digest()
    m.write_text(m.read_text().replace('allow = ["PATH", "HOME", "LANG"]', 'allow = ["PATH"]'))
    d3 = JobManifest.load(m).workload_digest()
    assert len({d1, d2, d3}) == 3
    (tmp_path / "infer.py").write_text("print('changed')\n")
    with pytest.raises(TrustedFileError, match=r"infer\.py"):
        JobManifest.load(m).workload_digest()


def test_hash_cache_is_reused(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    m = scaffold(tmp_path, capsys)
    cache = HashCache(tmp_path / "hashes.json")
    d = JobManifest.load(m).workload_digest(cache)
    cache.save()
    again = HashCache(tmp_path / "hashes.json")
    assert again.entries and JobManifest.load(m).workload_digest(again) == d


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[command]\nargv = []", "non-empty"),
        ("colour = 1\n[command]\nargv = ['x']", "unknown field"),
        ("tee = 'nope'\n[command]\nargv = ['x']", "tee must be"),
        ("[command]\nargv = ['x']\n[[trusted]]\npath = 'a'", "sha256"),
        ("[command]\nargv = ['x']\n[[broker]]\nname = 'b'\nurl = 'https://x'", "fingerprint"),
        (
            "[command]\nargv = ['x']\n[[input]]\npath = 'a'\nciphertext = 'b'\nkey = 'k'\nbroker = 'nobody'",
            "unknown broker",
        ),
        ("[command\n", "not valid TOML"),
        # found by atheris: a string where a table or an array is expected raised AttributeError
        ("[command]\nargv = ['x']\n[env]\nset = 'abab'", "env.set map"),
        ("[command]\nargv = ['x']\n[env]\nallow = 'PATH'", "env.allow must list"),
        ("[command]\nargv = ['x']\n[env]\nset = {A = 1}", "env.set map"),
        ("trusted = 'lib'\n[command]\nargv = ['x']", "array of tables"),
        ("input = {path = 'a'}\n[command]\nargv = ['x']", "array of tables"),
        ("broker = 3\n[command]\nargv = ['x']", "array of tables"),
    ],
)
def test_invalid_manifests(tmp_path: Path, text: str, message: str):
    (tmp_path / "job.toml").write_text(text)
    with pytest.raises(ManifestError, match=message):
        JobManifest.load(tmp_path / "job.toml")


def test_oversized_manifest_is_refused_without_reading_it_all(tmp_path: Path):
    from shieldml.runner.manifest import MAX_MANIFEST, JobManifest, ManifestError

    big = tmp_path / "job.toml"
    with big.open("wb") as f:
        f.truncate(8 * MAX_MANIFEST)  # sparse: a huge file costs nothing on disk
    with pytest.raises(ManifestError, match="too large"):
        JobManifest.load(big)
