"""The simulated platform's evidence goes through the real verifiers, and only under its roots."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509

from shieldml.attest import TcbStatus, TeeKind, TrustAnchors, verify_evidence
from shieldml.errors import AttestationError, ExpiredError, UntrustedRootError
from shieldml.testing.simulated import SimulatedPlatform, fixed_clock, system_clock

NOW = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> SimulatedPlatform:
    return SimulatedPlatform.open(tmp_path_factory.mktemp("sim"), clock=fixed_clock(NOW))


def test_sgx_quote(platform: SimulatedPlatform):
    quote, col = platform.sgx_quote(
        report_data=b"\x01" * 64, mrenclave=b"\xaa" * 32, isv_svn=3, now=NOW
    )
    claims = verify_evidence(quote, collateral=col, now=NOW, trust=platform.trust())
    assert claims.tee is TeeKind.SGX and claims.tcb_status is TcbStatus.UP_TO_DATE
    assert claims.root.value == "simulated" and not claims.debug
    assert claims.measurements.mrenclave == b"\xaa" * 32  # type: ignore[union-attr]
    assert claims.measurements.isv_svn == 3  # type: ignore[union-attr]
    assert claims.report_data == b"\x01" * 64


def test_tdx_quote_with_chosen_tcb_and_debug(platform: SimulatedPlatform):
    quote, col = platform.tdx_quote(mrtd=b"\x05" * 48, debug=True, tcb_status="OutOfDate", now=NOW)
    claims = verify_evidence(quote, collateral=col, now=NOW, trust=platform.trust())
    assert claims.tee is TeeKind.TDX and claims.debug
    assert claims.tcb_status is TcbStatus.OUT_OF_DATE and claims.advisory_ids == ("INTEL-SA-00828",)


def test_snp_report(platform: SimulatedPlatform):
    report, vcek, chain = platform.snp_report(measurement=b"\x07" * 48, report_data=b"n" * 64)
    claims = verify_evidence(report, vcek=vcek, cert_chain=chain, now=NOW, trust=platform.trust())
    assert claims.tee is TeeKind.SNP and claims.measurements.measurement == b"\x07" * 48  # type: ignore[union-attr]


@pytest.mark.parametrize("kind", ["sgx", "tdx", "snp"])
def test_refused_unless_simulated_root_is_trusted(platform: SimulatedPlatform, kind: str):
    if kind == "snp":
        report, vcek, chain = platform.snp_report()
        args: dict[str, object] = {"vcek": vcek, "cert_chain": chain}
        data = report
    else:
        data, col = getattr(platform, f"{kind}_quote")(now=NOW)
        args = {"collateral": col}
    with pytest.raises(UntrustedRootError, match=r"untrusted root \(simulated\)"):
        verify_evidence(data, now=NOW, trust=TrustAnchors(), **args)  # type: ignore[arg-type]


def test_platform_persists(platform: SimulatedPlatform, tmp_path: Path):
    platform.save(tmp_path)
    again = SimulatedPlatform.open(tmp_path, clock=fixed_clock(NOW))
    assert again.intel_root == platform.intel_root and again.chip_id == platform.chip_id
    quote, col = again.sgx_quote(now=NOW)
    verify_evidence(quote, collateral=col, now=NOW, trust=platform.trust())


def test_tampered_simulated_quote_is_refused(platform: SimulatedPlatform):
    quote, col = platform.sgx_quote(report_data=b"\x01" * 64, now=NOW)
    bad = bytearray(quote)
    bad[48 + 320] ^= 1  # REPORTDATA
    with pytest.raises(AttestationError, match="quote signature"):
        verify_evidence(bytes(bad), collateral=col, now=NOW, trust=platform.trust())


def test_simulated_collateral_expires(platform: SimulatedPlatform):
    quote, col = platform.sgx_quote(now=NOW)
    with pytest.raises(ExpiredError):
        verify_evidence(quote, collateral=col, now=NOW + timedelta(days=45), trust=platform.trust())


def test_snp_certificates_from_the_extended_report(platform: SimulatedPlatform):
    """VCEK and ASK/ARK can come with the evidence, as the extended report's certificate table."""
    report, _, _ = platform.snp_report(report_data=b"t" * 64)
    claims = verify_evidence(
        report, vcek=platform.snp_cert_table(), now=NOW, trust=platform.trust()
    )
    assert claims.report_data == b"t" * 64


def test_cert_table_bounds():
    from shieldml.attest._snp import build_cert_table, parse_cert_table
    from shieldml.errors import FormatError

    table = build_cert_table({"vcek": b"abc"})
    assert parse_cert_table(table) == {"vcek": b"abc"}
    with pytest.raises(FormatError):
        parse_cert_table(table[:30])  # not terminated
    bad = bytearray(table)
    bad[20:24] = (10_000).to_bytes(4, "little")  # length past the end
    with pytest.raises(FormatError):
        parse_cert_table(bytes(bad))


def test_snp_chosen_tcb(platform: SimulatedPlatform):
    report, vcek, chain = platform.snp_report(reported_tcb={"snp": 3, "ucode": 200}, now=NOW)
    claims = verify_evidence(report, vcek=vcek, cert_chain=chain, now=NOW, trust=platform.trust())
    assert (
        claims.platform["reported_tcb_snp"] == "3"
        and claims.platform["reported_tcb_ucode"] == "200"
    )
    _, default_vcek, _ = platform.snp_report()
    with pytest.raises(AttestationError, match="REPORTED_TCB does not match"):
        verify_evidence(
            report, vcek=default_vcek, cert_chain=chain, now=NOW, trust=platform.trust()
        )


@pytest.mark.parametrize("years", [-3, 14])
def test_platform_dates_everything_by_its_clock(tmp_path: Path, years: int):
    """Evidence made with no explicit time verifies at the platform's clock, whatever today is."""
    at = NOW + timedelta(days=365 * years)
    plat = SimulatedPlatform.open(tmp_path, clock=fixed_clock(at))
    trust = plat.trust()
    for quote, col in (plat.sgx_quote(), plat.tdx_quote()):
        verify_evidence(quote, collateral=col, now=at, trust=trust)
    report, vcek, chain = plat.snp_report()
    verify_evidence(report, vcek=vcek, cert_chain=chain, now=at, trust=trust)
    cert = x509.load_pem_x509_certificate(plat.ratls_certificate()[0])
    assert cert.not_valid_before_utc < at < cert.not_valid_after_utc


def test_kept_platform_outside_its_validity_is_refused(tmp_path: Path):
    SimulatedPlatform.open(tmp_path, clock=fixed_clock(NOW))
    later = NOW + timedelta(days=3651)
    with pytest.raises(ExpiredError, match=r"valid .* but the clock reads 2036") as e:
        SimulatedPlatform.open(tmp_path, clock=fixed_clock(later))
    assert "remove the directory" in (e.value.hint or "")
    earlier = NOW - timedelta(days=2)
    with pytest.raises(ExpiredError, match="but the clock reads"):
        SimulatedPlatform.open(tmp_path, clock=fixed_clock(earlier))


def test_fixed_clock_needs_a_time_zone():
    with pytest.raises(ValueError, match="aware"):
        fixed_clock(datetime(2026, 1, 1))


def test_system_clock_is_the_wall_clock():
    before = datetime.now(UTC)
    assert before <= system_clock() <= datetime.now(UTC)
