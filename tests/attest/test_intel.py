"""Intel DCAP: every vector gives the README's result; every tampering is refused precisely."""

from __future__ import annotations

import contextlib
import json
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shieldml.attest import IntelCollateral, Quote, TcbStatus, TeeKind, TrustAnchors, verify_quote
from shieldml.attest._intel_quote import HEADER_SIZE
from shieldml.errors import (
    AttestationError,
    ExpiredError,
    FormatError,
    TcbError,
    UntrustedRootError,
)
from tests.attest.conftest import INTEL_CASES, REAL_NOW
from tests.conftest import fuzz_examples


def load(att: Path, case: str) -> tuple[bytes, IntelCollateral, datetime]:
    q, c, t = INTEL_CASES[case]
    d = att / "intel" / "phala"
    return (d / q).read_bytes(), IntelCollateral.from_json((d / c).read_text()), t


def test_sgx_vector(att: Path):
    raw, col, t = load(att, "sgx")
    claims = verify_quote(raw, col, now=t, trust=TrustAnchors())
    assert claims.tee is TeeKind.SGX
    assert claims.tcb_status is TcbStatus.CONFIGURATION_AND_SW_HARDENING_NEEDED
    assert claims.advisory_ids == ("INTEL-SA-00289", "INTEL-SA-00615")
    assert not claims.debug
    m = claims.to_dict()["measurements"]
    assert m["mrenclave"].startswith("33d8736d") and m["mrenclave"].endswith("2fbb")
    assert m["mrsigner"].startswith("815f42f1") and m["mrsigner"].endswith("e0e6")
    assert claims.report_data == b"Hello, world!".ljust(64, b"\0")
    assert claims.platform["fmspc"] == "00a067110000"
    assert claims.root.value == "vendor"


def test_tdx_v4_vector(att: Path):
    raw, col, t = load(att, "tdx_v4")
    claims = verify_quote(raw, col, now=t, trust=TrustAnchors())
    assert claims.tee is TeeKind.TDX
    assert claims.tcb_status is TcbStatus.UP_TO_DATE and claims.advisory_ids == ()
    d = claims.to_dict()
    assert d["measurements"]["mrtd"].startswith("91eb2b44d141d4ec")
    assert d["measurements"]["sept_ve_disable"] is True and d["debug"] is False
    assert d["platform"]["fmspc"] == "b0c06f000000"


def test_tdx_v5_without_matching_level_is_not_trusted(att: Path):
    raw, col, t = load(att, "tdx_v5")
    quote = Quote.from_bytes(raw)
    assert quote.header.version == 5 and quote.body.is_td15  # type: ignore[union-attr]
    with pytest.raises(TcbError, match="no TCB level matches") as e:
        verify_quote(raw, col, now=t, trust=TrustAnchors())
    passed = [c.name for c in e.value.checks if c.passed]
    assert "quote signature" in passed and "QE identity" in passed  # signatures were valid


@pytest.mark.parametrize("case", sorted(INTEL_CASES))
def test_refused_at_the_real_current_time(att: Path, case: str):
    raw, col, _ = load(att, case)
    with pytest.raises(ExpiredError, match=r"expired on \d{4}-\d\d-\d\d") as e:
        verify_quote(raw, col, now=REAL_NOW, trust=TrustAnchors())
    assert e.value.hint and "--at" in e.value.hint


def test_refused_before_collateral_issue(att: Path):
    raw, col, _ = load(att, "sgx")
    with pytest.raises(ExpiredError):
        verify_quote(raw, col, now=datetime(2025, 6, 1, tzinfo=UTC), trust=TrustAnchors())


def _negatives(att: Path) -> list[dict[str, str]]:
    return [
        c for c in json.loads((att / "negative" / "cases.json").read_text()) if c["kind"] == "dcap"
    ]


def test_every_dcap_negative_is_refused(att: Path):
    cases = _negatives(att)
    assert len(cases) == 12
    for case in cases:
        src = "sgx" if "sgx_quote" in case["source"] else "tdx_v4"
        _, col, t = load(att, src)
        raw = (att / "negative" / case["file"]).read_bytes()
        with pytest.raises((AttestationError, FormatError)) as e:
            verify_quote(raw, col, now=t, trust=TrustAnchors())
        if isinstance(e.value, AttestationError):
            assert e.value.checks and not e.value.checks[-1].passed, case["file"]


def test_negative_reasons_are_precise(att: Path):
    _, col, t = load(att, "sgx")
    expect = {
        "sgx_v3_mrenclave_flipped.bin": "quote signature",
        "sgx_v3_isv_sig_flipped.bin": "quote signature",
        "sgx_v3_qe_reportdata_flipped.bin": "QE report signature",
        "sgx_v3_qe_authdata_flipped.bin": "attestation key binding",
    }
    for name, check in expect.items():
        with pytest.raises(AttestationError) as e:
            verify_quote((att / "negative" / name).read_bytes(), col, now=t, trust=TrustAnchors())
        assert e.value.check == check, name


def test_synthetic_qvl_sample_is_refused_under_the_real_root(att: Path):
    d = att / "intel" / "qvl-synthetic"
    raw = (d / "tdx" / "quote.dat").read_bytes()
    _, col, t = load(att, "tdx_v4")
    with pytest.raises(UntrustedRootError, match="untrusted root"):
        verify_quote(raw, col, now=datetime(2024, 3, 20, tzinfo=UTC), trust=TrustAnchors())
    with pytest.raises(AttestationError):  # the SGX sample carries no PCK chain at all
        verify_quote((d / "quote.dat").read_bytes(), col, now=t, trust=TrustAnchors())


def test_tampered_collateral_is_refused(att: Path):
    raw, col, t = load(att, "sgx")
    text = col.tcb_info.decode().replace('"tcbStatus":"OutOfDate"', '"tcbStatus":"UpToDate"', 1)
    bad = replace(col, tcb_info=text.encode())
    with pytest.raises(AttestationError, match="TCB info signature"):
        verify_quote(raw, bad, now=t, trust=TrustAnchors())
    other = load(att, "tdx_v4")[1]
    with pytest.raises(AttestationError):  # collateral of another platform
        verify_quote(
            raw,
            replace(col, tcb_info=other.tcb_info, tcb_info_signature=other.tcb_info_signature),
            now=t,
            trust=TrustAnchors(),
        )


def test_collateral_json_round_trip(att: Path):
    _, col, _ = load(att, "tdx_v4")
    again = IntelCollateral.from_json(col.to_json())
    assert again.tcb_info == col.tcb_info and again.pck_crl == col.pck_crl


@pytest.mark.parametrize("case", sorted(INTEL_CASES))
def test_agrees_with_dcap_qvl(att: Path, case: str):
    """An independent verifier (Phala's dcap-qvl, Rust) as oracle: same status and advisories."""
    dcap_qvl = pytest.importorskip("dcap_qvl")
    q, c, t = INTEL_CASES[case]
    d = att / "intel" / "phala"
    raw = (d / q).read_bytes()
    col = dcap_qvl.QuoteCollateralV3.from_json((d / c).read_text())
    try:
        theirs = dcap_qvl.verify(raw, col, int(t.timestamp()))
    except ValueError:
        theirs = None
    if theirs is None:
        with pytest.raises(AttestationError):
            verify_quote(
                raw, IntelCollateral.from_json((d / c).read_text()), now=t, trust=TrustAnchors()
            )
        return
    ours = verify_quote(
        raw, IntelCollateral.from_json((d / c).read_text()), now=t, trust=TrustAnchors()
    )
    assert ours.tcb_status == theirs.status
    assert sorted(ours.advisory_ids) == sorted(theirs.advisory_ids)


@settings(max_examples=fuzz_examples(300), deadline=None)
@given(st.binary(max_size=6000))
def test_parser_raises_only_format_errors(data: bytes):
    with contextlib.suppress(FormatError):
        Quote.from_bytes(data)


@settings(max_examples=fuzz_examples(200), deadline=None)
@given(st.integers(0, 5005), st.integers(1, 255), st.sampled_from(["sgx", "tdx"]))
def test_mutated_real_quotes_never_crash(vectors: Path, pos: int, xor: int, which: str):
    name = "sgx_quote.bin" if which == "sgx" else "tdx_quote_v4.bin"
    raw = bytearray((vectors / "attestation" / "intel" / "phala" / name).read_bytes())
    raw[pos % len(raw)] ^= xor
    with contextlib.suppress(FormatError):
        Quote.from_bytes(bytes(raw))


def test_truncated_and_oversized_quotes(att: Path):
    raw = (att / "intel" / "phala" / "sgx_quote.bin").read_bytes()
    for n in (0, 10, HEADER_SIZE, 432, 500, 1100, len(raw) - 1):
        with pytest.raises(FormatError):
            Quote.from_bytes(raw[:n])
    with pytest.raises(FormatError, match="too large"):
        Quote.from_bytes(raw + bytes(70000))


def test_verification_cache_reuses_only_what_is_identical_and_current(att: Path):
    from shieldml.attest import VerificationCache

    raw, col, t = load(att, "sgx")
    cache = VerificationCache()
    first = verify_quote(raw, col, now=t, trust=TrustAnchors(), cache=cache)
    second = verify_quote(raw, col, now=t, trust=TrustAnchors(), cache=cache)
    assert (
        cache.hits > 0
        and first.tcb_status == second.tcb_status
        and first.report_data == second.report_data
    )
    assert any("[cached]" in c.detail for c in second.checks)
    bad = (att / "negative" / "sgx_v3_isv_sig_flipped.bin").read_bytes()
    with pytest.raises(AttestationError, match="quote signature"):  # per-quote checks never cached
        verify_quote(bad, col, now=t, trust=TrustAnchors(), cache=cache)
    with pytest.raises(ExpiredError):  # outside the validity window the cache is not used
        verify_quote(raw, col, now=REAL_NOW, trust=TrustAnchors(), cache=cache)
    with pytest.raises(UntrustedRootError):  # other anchors, other cache entries
        verify_quote(raw, col, now=t, trust=TrustAnchors(vendor={}), cache=cache)
