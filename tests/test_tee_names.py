"""One vocabulary of TEE names across ``job``, ``policy``, ``attest``: sgx, tdx, snp (with auto and
simulated where they apply); the older ``gramine`` and ``ratls`` are taken with a warning."""

from __future__ import annotations

import json
from pathlib import Path

import click
import pytest

from shieldml.attest import DEPRECATED_TEE_NAMES, TEE_NAMES
from shieldml.cli import EXIT_OK, EXIT_USAGE, cli, main
from shieldml.runner.manifest import JobManifest

CANONICAL = {"auto", "simulated", *TEE_NAMES}
#: evidence that is not a whole TEE's: a GPU's, verified beside the CPU's (attest verify|explain)
GPU = {"nvidia-gpu"}


def _tee_options() -> dict[str, list[str]]:
    """Every ``--tee`` of every command, with its choices."""
    found: dict[str, list[str]] = {}

    def walk(cmd: click.Command, path: str) -> None:
        if isinstance(cmd, click.Group):
            ctx = click.Context(cmd)  # the top level loads its command modules lazily
            for name in cmd.list_commands(ctx):
                sub = cmd.get_command(ctx, name)
                assert sub is not None, name
                walk(sub, f"{path} {name}")
            return
        for p in cmd.params:
            if p.name == "tee" and isinstance(p.type, click.Choice):
                found[path.strip()] = list(p.type.choices)

    walk(cli, "")
    return found


def test_every_tee_option_uses_the_canonical_names():
    found = _tee_options()
    assert {"job init", "policy init", "attest verify", "attest explain"} <= set(found)
    for command, choices in found.items():
        assert set(choices) <= CANONICAL | (GPU if command.startswith("attest") else set()), command
        assert set(TEE_NAMES) <= set(choices), command  # sgx, tdx, snp everywhere
        assert not set(choices) & set(DEPRECATED_TEE_NAMES), command


def test_unknown_tee_names_the_canonical_ones(capsys: pytest.CaptureFixture[str], tmp_path: Path):
    (tmp_path / "a.py").write_text("print(1)\n")
    rc = main(
        ["job", "init", str(tmp_path / "a.py"), "-o", str(tmp_path / "j.toml"), "--tee", "sev"]
    )
    err = capsys.readouterr().err
    assert rc == EXIT_USAGE and "'sgx', 'tdx', 'snp'" in err


def test_job_init_tee_gramine_warns_and_writes_sgx(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
):
    (tmp_path / "a.py").write_text("print(1)\n")
    job = tmp_path / "j.toml"
    rc = main(["job", "init", str(tmp_path / "a.py"), "-o", str(job), "--tee", "gramine", "--json"])
    cap = capsys.readouterr()
    assert rc == EXIT_OK, cap.err
    assert "warning: --tee 'gramine' is deprecated, use 'sgx'" in cap.err
    json.loads(cap.out)  # the result is still one JSON document
    assert 'tee = "sgx"' in job.read_text() and JobManifest.load(job).tee == "sgx"


def test_manifest_spelling_gramine_means_sgx_and_keeps_its_digest(tmp_path: Path):
    (tmp_path / "a.py").write_text("print(1)\n")
    text = 'version = 1\ntee = "{}"\n[command]\nargv = ["/usr/bin/python3", "a.py"]\n'
    (tmp_path / "old.toml").write_text(text.format("gramine"))
    (tmp_path / "new.toml").write_text(text.format("sgx"))
    with pytest.warns(DeprecationWarning, match="tee 'gramine' is deprecated, use 'sgx'"):
        old = JobManifest.load(tmp_path / "old.toml")
    new = JobManifest.load(tmp_path / "new.toml")
    assert old.tee == new.tee == "sgx"
    # the digest is over what the file says: a policy pinned before the rename still matches
    assert old.canonical([])["tee"] == "gramine" and new.canonical([])["tee"] == "sgx"


def test_policy_init_takes_the_old_spelling_with_a_warning(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
):
    (tmp_path / "a.py").write_text("print(1)\n")
    job = tmp_path / "j.toml"
    assert main(["job", "init", str(tmp_path / "a.py"), "-o", str(job), "--tee", "sgx"]) == EXIT_OK
    capsys.readouterr()
    rc = main(["policy", "init", "--from-job", str(job), "-o", str(tmp_path / "p.toml"),
               "--tee", "gramine", "--set", "mrsigner=" + "ab" * 32, "--json"])  # fmt: skip
    cap = capsys.readouterr()
    assert rc == EXIT_OK, cap.err
    assert json.loads(cap.out)["tee"] == "sgx" and "deprecated, use 'sgx'" in cap.err


@pytest.mark.parametrize("tee", ["sgx", "ratls"])
def test_attest_tee_sgx_reads_an_ratls_certificate(
    capsys: pytest.CaptureFixture[str], vectors: Path, tmp_path: Path, tee: str
):
    ratls = vectors / "attestation" / "ratls"
    rc = main(["attest", "verify", str(ratls / "ccc_gramine-cert.pem"), "--tee", tee, "--json"])
    cap = capsys.readouterr()
    # the certificate was opened and its quote found: only the collateral is missing
    assert rc != EXIT_OK and json.loads(cap.out)["failed_check"] == "collateral"
    assert ("deprecated, use 'sgx'" in cap.err) == (tee == "ratls")
    # a broken certificate is refused as a certificate (read as a quote, it would only have
    # failed later, for want of collateral)
    cut = tmp_path / "cut.der"
    cut.write_bytes((ratls / "konvera_tls_cert.der").read_bytes()[:300])
    rc = main(["attest", "verify", str(cut), "--tee", tee, "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert rc != EXIT_OK and doc["failed_check"] != "collateral", doc
