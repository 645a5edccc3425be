"""AMD SEV-SNP revocation: AMD's CRL (KDS ``/vcek/v1/{product}/crl``, DER, RSA-PSS by the ARK) is
checked when given, and the claims say when it was not."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509

from shieldml.attest import TrustAnchors, verify_evidence
from shieldml.errors import AttestationError, CollateralError, ExpiredError, RevokedError
from shieldml.testing.simulated import SimulatedPlatform, fixed_clock
from tests.attest.conftest import SNP_AT

AT = datetime(2025, 7, 1, tzinfo=UTC)


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> SimulatedPlatform:
    return SimulatedPlatform.open(tmp_path_factory.mktemp("sim"), clock=fixed_clock(AT))


def _verify(sim: SimulatedPlatform, crl: bytes | None, at: datetime = AT):  # type: ignore[no-untyped-def]
    report, vcek, chain = sim.snp_report()
    return verify_evidence(
        report, vcek=vcek, cert_chain=chain, now=at, trust=sim.trust(), amd_crl=crl
    )


def test_revoked_ask_on_the_amd_crl_is_refused(sim: SimulatedPlatform):
    """The attack: AMD revoked the ASK (so every VCEK under it), the host presents a report
    signed under it anyway. Before: the CRL was never looked at."""
    crl = sim.amd_crl(revoked=(sim.certs["ask"],))
    with pytest.raises(RevokedError, match="SEV-Milan"):
        _verify(sim, crl)


def test_current_amd_crl_is_checked_and_said_so(sim: SimulatedPlatform):
    claims = _verify(sim, sim.amd_crl())
    assert claims.platform["revocation"].startswith("checked")
    assert any("AMD CRL of ARK-Milan" in c.detail for c in claims.checks)


def test_without_an_amd_crl_the_claims_say_revocation_was_not_checked(sim: SimulatedPlatform):
    claims = _verify(sim, None)
    assert claims.platform["revocation"] == "not checked: no AMD CRL given"
    assert "revocation not checked" in " ".join(claims.to_dict()["reasons"])


def test_expired_amd_crl_is_refused(sim: SimulatedPlatform):
    crl = sim.amd_crl(now=AT - timedelta(days=30))
    with pytest.raises(ExpiredError, match="AMD CRL"):
        _verify(sim, crl)


def test_amd_crl_not_signed_by_the_ark_is_refused(
    sim: SimulatedPlatform, tmp_path: Path, vectors: Path
):
    """The host's own empty CRL (another platform's ARK) must not pass for AMD's: on a real
    Milan report it is not signed by the real ARK-Milan."""
    a = vectors / "attestation" / "amd" / "virtee"
    report, vcek = (a / "report_milan.bin").read_bytes(), (a / "vcek_milan.der").read_bytes()
    chain = x509.load_pem_x509_certificates((a / "cert_chain_milan.pem").read_bytes())
    fake = sim.amd_crl(now=SNP_AT)
    with pytest.raises(AttestationError, match="not signed by 'ARK-Milan'"):
        verify_evidence(
            report, vcek=vcek, cert_chain=chain, now=SNP_AT, trust=TrustAnchors(), amd_crl=fake
        )
    claims = verify_evidence(report, vcek=vcek, cert_chain=chain, now=SNP_AT, trust=TrustAnchors())
    assert claims.root.value == "vendor" and claims.platform["revocation"].startswith("not checked")


def test_a_crl_that_does_not_parse_is_a_collateral_error(sim: SimulatedPlatform):
    with pytest.raises(CollateralError, match="not a DER or PEM CRL"):
        _verify(sim, b"\x30\x03abc")


def test_cli_verify_takes_the_amd_crl(
    sim: SimulatedPlatform, vectors: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    import json

    from shieldml.cli import main

    a = vectors / "attestation" / "amd" / "virtee"
    args = ["attest", "verify", str(a / "report_milan.bin"), "--vcek", str(a / "vcek_milan.der"),
            "--cert-chain", str(a / "cert_chain_milan.pem"), "--at", "2026-01-01", "--json"]  # fmt: skip
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)["platform"]["revocation"].startswith("not checked")
    (tmp_path / "crl.der").write_bytes(sim.amd_crl(now=SNP_AT))
    assert main([*args, "--amd-crl", str(tmp_path / "crl.der")]) == 1
    assert "not signed by 'ARK-Milan'" in capsys.readouterr().out


def test_fetch_amd_crl_from_kds(sim: SimulatedPlatform):
    from shieldml.attest import fetch_amd_crl
    from shieldml.attest._fetch import AMD_KDS_URL, Response
    from tests.attest.test_fetch import FakeServer

    der = sim.amd_crl()
    server = FakeServer({f"{AMD_KDS_URL}/vcek/v1/Milan/crl": Response(200, der, {})})
    assert fetch_amd_crl("Milan", server) == der
    with pytest.raises(CollateralError, match="HTTP 404"):
        fetch_amd_crl("Genoa", server)
    junk = FakeServer({f"{AMD_KDS_URL}/vcek/v1/Milan/crl": Response(200, b"<html>", {})})
    with pytest.raises(CollateralError, match="not a DER CRL"):
        fetch_amd_crl("Milan", junk)
