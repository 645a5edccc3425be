"""`shieldml attest verify|explain`: exit codes, JSON keys, explanations."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shieldml.cli import main

KEYS = {
    "genuine",
    "tee",
    "tcb_status",
    "advisory_ids",
    "debug",
    "measurements",
    "report_data",
    "reasons",
}


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def test_verify_sgx_json(att: Path, capsys: pytest.CaptureFixture[str]):
    d = att / "intel" / "phala"
    rc, out, _ = run(capsys, "attest", "verify", str(d / "sgx_quote.bin"), "--collateral",
                     str(d / "sgx_quote_collateral.json"), "--at", "2025-07-01T00:00:00Z", "--json")  # fmt: skip
    doc = json.loads(out)
    assert rc == 0 and doc.keys() >= KEYS
    assert doc["genuine"] is True and doc["tee"] == "sgx"
    assert doc["tcb_status"] == "ConfigurationAndSWHardeningNeeded"
    assert doc["advisory_ids"] == ["INTEL-SA-00289", "INTEL-SA-00615"]
    assert doc["report_data"].startswith(b"Hello, world!".hex())
    assert all(isinstance(r, str) for r in doc["reasons"])


def test_verify_expired_at_real_time(att: Path, capsys: pytest.CaptureFixture[str]):
    d = att / "intel" / "phala"
    rc, out, _ = run(capsys, "attest", "verify", str(d / "tdx_quote_v4.bin"), "--collateral",
                     str(d / "tdx_quote_v4_collateral.json"), "--json")  # fmt: skip
    doc = json.loads(out)
    assert rc == 1 and doc["genuine"] is False and "expired on" in doc["reasons"][0]


def test_verify_v5_not_trusted(att: Path, capsys: pytest.CaptureFixture[str]):
    d = att / "intel" / "phala"
    rc, out, _ = run(capsys, "attest", "verify", str(d / "tdx_quote_v5_td15.bin"), "--collateral",
                     str(d / "tdx_quote_v5_td15_collateral.json"), "--at", "2026-03-01")  # fmt: skip
    assert rc == 1 and "no TCB level matches" in out


def test_explain_snp(att: Path, capsys: pytest.CaptureFixture[str]):
    a = att / "amd" / "go-sev-guest"
    rc, out, _ = run(capsys, "attest", "explain", str(a / "attestation.bin"), "--vcek", str(a / "vcek_milan.der"),
                     "--cert-chain", str(a / "ask_ark_milan.pem"), "--at", "2026-01-01")  # fmt: skip
    assert rc == 0 and "report signature" in out and "debug on" in out


def test_explain_failure_names_expected_and_found(att: Path, capsys: pytest.CaptureFixture[str]):
    a = att / "amd" / "virtee"
    rc, out, _ = run(capsys, "attest", "explain", str(att / "negative" / "snp_v2_reported_tcb_snp_flipped.bin"),
                     "--vcek", str(a / "vcek_milan.der"), "--cert-chain", str(a / "cert_chain_milan.pem"),
                     "--at", "2026-01-01")  # fmt: skip
    assert rc == 1 and "✗" in out and "not genuine" in out


def test_ratls_needs_collateral_and_says_so(att: Path, capsys: pytest.CaptureFixture[str]):
    rc, out, _ = run(
        capsys, "attest", "verify", str(att / "ratls" / "konvera_tls_cert.der"), "--json"
    )
    doc = json.loads(out)
    assert rc == 1 and "collateral" in doc["reasons"][0]


def test_custom_root_requires_insecure_switch(
    att: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    d = att / "intel" / "qvl-synthetic"
    args = ["attest", "verify", str(d / "tdx" / "quote.dat"), "--collateral",
            str(att / "intel" / "phala" / "tdx_quote_v4_collateral.json"), "--trust-root", str(d / "trustedRootCaCert.pem")]  # fmt: skip
    rc, _, err = run(capsys, *args)
    assert rc == 1 and "--insecure-custom-root" in err


def test_usage_error(capsys: pytest.CaptureFixture[str], att: Path):
    rc, _, _ = run(capsys, "attest", "verify", str(att / "README.md"), "--tee", "nope")
    assert rc == 2


def test_trust_import_then_snp_without_chain(
    att: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("SHIELDML_HOME", str(tmp_path))
    rc, out, _ = run(
        capsys, "trust", "import", str(att / "amd" / "roots" / "milan_ask_ark_asvk.pem"), "--json"
    )
    assert rc == 0 and len(json.loads(out)["imported"]) == 3
    rc, _, err = run(
        capsys, "trust", "import", str(att / "intel" / "qvl-synthetic" / "trustedRootCaCert.pem")
    )
    assert rc == 1 and "neither a pinned vendor root" in err
    a = att / "amd" / "virtee"
    rc, out, _ = run(capsys, "attest", "verify", str(a / "report_milan.bin"), "--vcek", str(a / "vcek_milan.der"),
                     "--at", "2026-01-01", "--json")  # fmt: skip
    assert rc == 0 and json.loads(out)["tee"] == "snp"
    rc, out, _ = run(capsys, "trust", "list", "--json")
    assert len(json.loads(out)["certificates"]) == 3


def test_unreadable_inputs_are_errors_not_verdicts(
    att: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    """Collateral or a chain that does not parse is an input error (`error:` on stderr), not a
    verdict on the evidence (`not genuine` on stdout); both exit 1."""
    d = att / "intel" / "phala"
    bad = tmp_path / "collateral.json"
    bad.write_text("{}")
    rc, out, err = run(
        capsys, "attest", "verify", str(d / "sgx_quote.bin"), "--collateral", str(bad)
    )
    assert rc == 1 and "error:" in err and "malformed collateral" in err and "genuine" not in out
    a = att / "amd" / "go-sev-guest"
    (tmp_path / "chain.pem").write_text("not a chain")
    rc, out, err = run(capsys, "attest", "explain", str(a / "attestation.bin"), "--vcek",
                       str(a / "vcek_milan.der"), "--cert-chain", str(tmp_path / "chain.pem"))  # fmt: skip
    assert rc == 1 and "not a PEM certificate chain" in err and out == ""


def test_cert_chain_with_text_before_the_certificates(
    att: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    a = att / "amd" / "go-sev-guest"
    chain = tmp_path / "chain.pem"
    chain.write_bytes(b"AMD ASK and ARK for Milan\n" + (a / "ask_ark_milan.pem").read_bytes())
    rc, out, _ = run(capsys, "attest", "verify", str(a / "attestation.bin"), "--vcek", str(a / "vcek_milan.der"),
                     "--cert-chain", str(chain), "--at", "2026-01-01", "--json")  # fmt: skip
    assert rc == 0 and json.loads(out)["genuine"] is True
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    certs = x509.load_pem_x509_certificates((a / "ask_ark_milan.pem").read_bytes())
    chain.write_bytes(b"".join(c.public_bytes(Encoding.DER) for c in certs))  # a DER chain
    rc, out, _ = run(capsys, "attest", "verify", str(a / "attestation.bin"), "--vcek", str(a / "vcek_milan.der"),
                     "--cert-chain", str(chain), "--at", "2026-01-01", "--json")  # fmt: skip
    assert rc == 0 and json.loads(out)["genuine"] is True


def test_failure_json_names_the_failed_check(att: Path, capsys: pytest.CaptureFixture[str]):
    a = att / "amd" / "virtee"
    rc, out, _ = run(capsys, "attest", "verify", str(att / "negative" / "snp_v2_reported_tcb_snp_flipped.bin"),
                     "--vcek", str(a / "vcek_milan.der"), "--cert-chain", str(a / "cert_chain_milan.pem"),
                     "--at", "2026-01-01", "--json")  # fmt: skip
    doc = json.loads(out)
    assert rc == 1 and doc["genuine"] is False and doc["error"].endswith("Error")
    assert doc["checks"] and doc["checks"][-1]["name"] == doc["failed_check"]
    assert not doc["checks"][-1]["passed"]


def test_explain_json(att: Path, capsys: pytest.CaptureFixture[str]):
    a = att / "amd" / "go-sev-guest"
    rc, out, _ = run(capsys, "attest", "explain", str(a / "attestation.bin"), "--vcek", str(a / "vcek_milan.der"),
                     "--cert-chain", str(a / "ask_ark_milan.pem"), "--at", "2026-01-01", "--json")  # fmt: skip
    doc = json.loads(out)
    assert rc == 0 and doc.keys() >= KEYS and doc["genuine"] is True and doc["tee"] == "snp"
    assert doc["checks"] and all(c["passed"] for c in doc["checks"])
    assert any(c["name"] == "report signature" for c in doc["checks"])
    v = att / "amd" / "virtee"
    rc, out, _ = run(capsys, "attest", "explain", str(att / "negative" / "snp_v2_reported_tcb_snp_flipped.bin"),
                     "--vcek", str(v / "vcek_milan.der"), "--cert-chain", str(v / "cert_chain_milan.pem"),
                     "--at", "2026-01-01", "--json")  # fmt: skip
    doc = json.loads(out)
    assert rc == 1 and doc["genuine"] is False
    assert doc["checks"][-1]["passed"] is False
    assert doc["checks"][-1]["name"] == doc["failed_check"]
    assert {"message", "expected", "found", "hint"} <= doc.keys()
