"""``shieldml policy init --from-quote | --from-sigstruct``: a policy's measurements taken from
real evidence or a signed SIGSTRUCT, each verified first. The host may hand the owner a quote
with a flipped byte, a SIGSTRUCT re-pointed at another enclave, stale collateral, or evidence of
another TEE; none of them may become a policy.

Vectors (``SHIELDML_VECTORS``): the Phala SGX/TDX quotes verify at 2025-07-01T00:00:00Z, the
virtee Milan SEV-SNP report any time in 2024-2029 (``shared/vectors/attestation/README.md``).
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from pathlib import Path

import pytest

from shieldml.cli import EXIT_INTEGRITY, EXIT_OK, EXIT_USAGE, main
from shieldml.policy import Policy
from tests.gramine.test_gramine import build_sigstruct

AT = "2025-07-01T00:00:00Z"


@pytest.fixture
def att(vectors: Path) -> Path:
    return vectors / "attestation"


def _job(tmp_path: Path, tee: str) -> Path:
    (tmp_path / "a.py").write_text("print(1)\n")
    job = tmp_path / "job.toml"
    job.write_text(f'version = 1\ntee = "{tee}"\n[command]\nargv = ["/usr/bin/python3", "a.py"]\n')
    return job


def _init(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict[str, object], str]:
    rc = main(["policy", "init", *argv, "--json"])
    cap = capsys.readouterr()
    return rc, (json.loads(cap.out) if rc == EXIT_OK else {}), cap.err


def _profile(path: Path) -> dict[str, object]:
    Policy.from_toml(path.read_text(), str(path))  # a valid policy
    return dict(tomllib.loads(path.read_text())["profile"][0])


def test_sgx_quote_gives_its_measurements(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, att: Path
):
    phala = att / "intel" / "phala"
    out = tmp_path / "p.toml"
    rc, doc, err = _init(capsys, "--from-job", str(_job(tmp_path, "sgx")), "-o", str(out),
                         "--from-quote", str(phala / "sgx_quote.bin"),
                         "--collateral", str(phala / "sgx_quote_collateral.json"), "--at", AT)  # fmt: skip
    assert rc == EXIT_OK, err
    p = _profile(out)
    assert p["mrenclave"] == ["33d8736db756ed4997e04ba358d27833188f1932ff7b1d156904d3f560452fbb"]
    assert p["mrsigner"] == ["815f42f11cf64430c30bab7816ba596a1da0130c3b028b673133a66cf9a3e0e6"]
    assert doc["tee"] == "sgx" and doc["unpinned"] == []
    assert "--from-quote" in out.read_text().splitlines()[1]


def test_tdx_quote_for_an_auto_job(capsys: pytest.CaptureFixture[str], tmp_path: Path, att: Path):
    phala = att / "intel" / "phala"
    out = tmp_path / "p.toml"
    rc, _, err = _init(capsys, "--from-job", str(_job(tmp_path, "auto")), "-o", str(out),
                         "--from-quote", str(phala / "tdx_quote_v4.bin"),
                         "--collateral", str(phala / "tdx_quote_v4_collateral.json"), "--at", AT)  # fmt: skip
    assert rc == EXIT_OK, err
    p = _profile(out)
    assert p["tee"] == "tdx" and p["mrtd"][0].startswith("91eb2b44d141d4ec")  # type: ignore[index]
    assert p["rtmr0"] != "any" and p["rtmr2"] != "any"
    assert p["mr_config_id"] == "any"  # init data is per deployment: left for --set


def test_snp_report_gives_measurement_and_tcb(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, att: Path
):
    v = att / "amd" / "virtee"
    out = tmp_path / "p.toml"
    rc, _, err = _init(capsys, "--from-job", str(_job(tmp_path, "snp")), "-o", str(out),
                       "--from-quote", str(v / "report_milan.bin"), "--vcek", str(v / "vcek_milan.der"),
                       "--cert-chain", str(v / "cert_chain_milan.pem"), "--at", AT)  # fmt: skip
    assert rc == EXIT_OK, err
    p = _profile(out)
    assert p["measurement"][0].startswith("7a1e5c266c0108db")  # type: ignore[index]
    assert p["min_reported_tcb"] == {"bl": 3, "tee": 0, "snp": 8, "ucode": 115}


@pytest.mark.parametrize("name", ["sgx_v3_mrenclave_flipped.bin", "sgx_v3_isv_sig_flipped.bin"])
def test_flipped_quote_writes_no_policy(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, att: Path, name: str
):
    out = tmp_path / "p.toml"
    col = att / "intel" / "phala" / "sgx_quote_collateral.json"
    rc, _, err = _init(capsys, "--from-job", str(_job(tmp_path, "sgx")), "-o", str(out),
                       "--from-quote", str(att / "negative" / name), "--collateral", str(col),
                       "--at", AT)  # fmt: skip
    assert rc != EXIT_OK and not out.exists()
    assert '"failed_check"' in err or "not genuine" in err


def test_quote_with_expired_collateral_writes_no_policy(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, att: Path
):
    phala = att / "intel" / "phala"
    out = tmp_path / "p.toml"
    rc, _, _ = _init(capsys, "--from-job", str(_job(tmp_path, "sgx")), "-o", str(out),
                     "--from-quote", str(phala / "sgx_quote.bin"),
                     "--collateral", str(phala / "sgx_quote_collateral.json"),
                     "--at", "2031-01-01T00:00:00Z")  # fmt: skip
    assert rc != EXIT_OK and not out.exists()


def test_quote_of_another_tee_than_the_job_is_refused(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, att: Path
):
    phala = att / "intel" / "phala"
    out = tmp_path / "p.toml"
    rc, _, err = _init(capsys, "--from-job", str(_job(tmp_path, "sgx")), "-o", str(out),
                       "--from-quote", str(phala / "tdx_quote_v4.bin"),
                       "--collateral", str(phala / "tdx_quote_v4_collateral.json"), "--at", AT)  # fmt: skip
    assert rc != EXIT_OK and not out.exists()
    assert "tdx evidence, but the job runs in sgx" in err


def test_sigstruct_gives_the_enclave_identity(capsys: pytest.CaptureFixture[str], tmp_path: Path):
    raw, key = build_sigstruct(bytes(range(32)), prod=7, svn=3)
    sig = tmp_path / "app.sig"
    sig.write_bytes(raw)
    out = tmp_path / "p.toml"
    rc, doc, err = _init(capsys, "--from-job", str(_job(tmp_path, "sgx")), "-o", str(out),
                         "--from-sigstruct", str(sig))  # fmt: skip
    assert rc == EXIT_OK, err
    p = _profile(out)
    n = key.public_key().public_numbers().n.to_bytes(384, "little")
    assert p["mrenclave"] == [bytes(range(32)).hex()]
    assert p["mrsigner"] == [hashlib.sha256(n).hexdigest()]  # SHA-256 of the modulus, LE
    assert p["isv_prod_id"] == 7 and p["min_isv_svn"] == 3 and doc["tee"] == "sgx"


def test_sigstruct_repointed_at_another_enclave_is_refused(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
):
    raw, _ = build_sigstruct(b"\x01" * 32)
    bad = bytearray(raw)
    bad[960:992] = b"\x02" * 32  # ENCLAVEHASH changed, signature left as it was
    sig = tmp_path / "app.sig"
    sig.write_bytes(bytes(bad))
    out = tmp_path / "p.toml"
    rc, _, err = _init(capsys, "--from-job", str(_job(tmp_path, "sgx")), "-o", str(out),
                       "--from-sigstruct", str(sig))  # fmt: skip
    assert rc == EXIT_INTEGRITY and not out.exists() and "signature" in err


def test_sigstruct_for_a_tdx_job_and_stray_options_are_refused(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
):
    raw, _ = build_sigstruct(b"\x01" * 32)
    sig = tmp_path / "app.sig"
    sig.write_bytes(raw)
    out = tmp_path / "p.toml"
    rc, _, err = _init(capsys, "--from-job", str(_job(tmp_path, "tdx")), "-o", str(out),
                       "--from-sigstruct", str(sig))  # fmt: skip
    assert rc != EXIT_OK and not out.exists() and "sgx evidence, but the job runs in tdx" in err
    rc, _, err = _init(capsys, "--from-job", str(_job(tmp_path, "sgx")), "-o", str(out),
                       "--from-sigstruct", str(sig), "--at", AT)  # fmt: skip
    assert rc == EXIT_USAGE and "--from-quote" in err


def test_set_wins_over_the_reference(capsys: pytest.CaptureFixture[str], tmp_path: Path):
    raw, _ = build_sigstruct(b"\x01" * 32, svn=3)
    sig = tmp_path / "app.sig"
    sig.write_bytes(raw)
    out = tmp_path / "p.toml"
    rc, _, err = _init(capsys, "--from-job", str(_job(tmp_path, "sgx")), "-o", str(out),
                       "--from-sigstruct", str(sig), "--set", "min_isv_svn=5")  # fmt: skip
    assert rc == EXIT_OK, err
    assert _profile(out)["min_isv_svn"] == 5
