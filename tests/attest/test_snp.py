"""AMD SEV-SNP: the real reports verify, tampering and corrupted VCEKs are refused."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
from cryptography import x509
from hypothesis import given, settings
from hypothesis import strategies as st

from shieldml.attest import SnpReport, TeeKind, TrustAnchors, verify_report
from shieldml.attest._snp import Endorsement, load_certificate
from shieldml.errors import AttestationError, ExpiredError, FormatError, UntrustedRootError
from tests.attest.conftest import SNP_AT
from tests.conftest import fuzz_examples

CASES = {
    "virtee_milan": ("virtee/report_milan.bin", "virtee/vcek_milan.der", "virtee/cert_chain_milan.pem"),
    "go_sev_guest": ("go-sev-guest/attestation.bin", "go-sev-guest/vcek_milan.der", "go-sev-guest/ask_ark_milan.pem"),
    "trustee_milan": ("trustee/test-report.bin", "trustee/test-vcek.der", "roots/milan_ask_ark_asvk.pem"),
    "trustee_genoa": ("trustee/snp-report-genoa.bin", "trustee/vcek-genoa.pem", "roots/genoa_ask_ark_asvk.pem"),
}  # fmt: skip


def verify(att: Path, report: str, vcek: str, chain: str, **kw: object):  # type: ignore[no-untyped-def]
    a = att / "amd"
    certs = x509.load_pem_x509_certificates((a / chain).read_bytes())
    opts = {"now": SNP_AT, "trust": TrustAnchors(), **kw}
    return verify_report((a / report).read_bytes(), (a / vcek).read_bytes(), certs, **opts)  # type: ignore[arg-type]


@pytest.mark.parametrize("case", sorted(CASES))
def test_real_reports_verify(att: Path, case: str):
    claims = verify(att, *CASES[case])
    assert claims.tee is TeeKind.SNP
    assert claims.tcb_status is None
    assert claims.measurements.signing_key == "vcek"  # type: ignore[union-attr]
    assert claims.debug is (case == "go_sev_guest")  # policy bit 19 set on that guest


def test_virtee_milan_claims(att: Path):
    d = verify(att, *CASES["virtee_milan"]).to_dict()
    assert d["measurements"]["measurement"].startswith("7a1e5c266c0108db")
    assert d["measurements"]["vmpl"] == 0 and d["measurements"]["guest_policy"] == 0x30000
    assert d["platform"]["reported_tcb_snp"] == "8" and d["platform"]["reported_tcb_ucode"] == "115"
    assert d["platform"]["chip_id"].startswith("d49554ec717f4e5b")


def test_genoa_report_is_version_3(att: Path):
    report = SnpReport.from_bytes((att / "amd" / CASES["trustee_genoa"][0]).read_bytes())
    assert report.version == 3 and report.generation_from_cpuid() == "Genoa"


@pytest.mark.parametrize("which", ["legacy", "new"])
def test_corrupted_vceks_fail_the_chain(att: Path, which: str):
    vcek = f"trustee/test-vcek-invalid-{which}.der"
    with pytest.raises(AttestationError, match="not validly signed"):
        verify(att, "trustee/test-report.bin", vcek, "roots/milan_ask_ark_asvk.pem")
    e = Endorsement.from_certificate(load_certificate((att / "amd" / vcek).read_bytes()))
    assert e.hwid is not None and len(e.hwid) == 64  # both hwID encodings parse


def test_turin_vcek_has_eight_byte_hwid(att: Path):
    e = Endorsement.from_certificate(
        load_certificate((att / "amd/virtee/vcek_turin.der").read_bytes())
    )
    assert e.product == "Turin" and e.hwid == bytes.fromhex("1e550a8ee5cf9f4d")
    assert e.spl["ucode"] == 9 and e.spl["fmc"] == 0


def test_every_snp_negative_is_refused(att: Path):
    cases = [
        c for c in json.loads((att / "negative" / "cases.json").read_text()) if c["kind"] == "snp"
    ]
    assert len(cases) == 5
    for case in cases:
        with pytest.raises(AttestationError) as e:
            verify(att, f"../negative/{case['file']}", *CASES["virtee_milan"][1:])
        assert e.value.check == "report signature", case["file"]


def test_expired_vcek_is_refused(att: Path):
    from datetime import UTC, datetime

    with pytest.raises(ExpiredError, match="expired on 2030-04-03"):
        verify(att, *CASES["virtee_milan"], now=datetime(2031, 1, 1, tzinfo=UTC))


def test_wrong_generation_chain_is_refused(att: Path):
    with pytest.raises(AttestationError, match="need SEV-Milan"):
        verify(
            att, "virtee/report_milan.bin", "virtee/vcek_milan.der", "roots/genoa_ask_ark_asvk.pem"
        )


def test_unpinned_ark_is_refused(att: Path):
    with pytest.raises(UntrustedRootError):
        verify(att, *CASES["virtee_milan"], trust=TrustAnchors(vendor={}))


def test_tcb_mismatch_is_refused(att: Path):
    """The go-sev-guest VCEK certifies another TCB than the virtee report (same chip generation)."""
    with pytest.raises(AttestationError):
        verify(
            att,
            "virtee/report_milan.bin",
            "go-sev-guest/vcek_milan.der",
            "virtee/cert_chain_milan.pem",
        )


@settings(max_examples=fuzz_examples(200), deadline=None)
@given(st.binary(max_size=1300))
def test_parser_raises_only_format_errors(data: bytes):
    with contextlib.suppress(FormatError):
        SnpReport.from_bytes(data)


def test_truncated_report(att: Path):
    raw = (att / "amd/virtee/report_milan.bin").read_bytes()
    for n in (0, 4, 0x2A0, len(raw) - 1):
        with pytest.raises(FormatError):
            SnpReport.from_bytes(raw[:n])
    assert SnpReport.from_bytes(raw).to_bytes() == raw
