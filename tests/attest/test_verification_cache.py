"""VerificationCache: a hit is the same check on the same bytes, and time is checked every call.

The hostile host controls the quote and the collateral a broker sees; it can send the genuine pair
once (warming the cache) and then variants that differ in a few bytes, or the same bytes at a
later verification time. None of that may ride on what the genuine pair established.
"""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import pytest

from shieldml.attest import (
    IntelCollateral,
    TrustAnchors,
    VerificationCache,
    verify_quote,
)
from shieldml.attest._intel_collateral import EnclaveIdentity, TcbInfo
from shieldml.errors import AttestationError, CollateralError, ExpiredError
from tests.attest.conftest import INTEL_CASES

PHALA = ("intel", "phala")


def _case(att: Path, case: str) -> tuple[bytes, IntelCollateral, object]:
    q, c, t = INTEL_CASES[case]
    d = att.joinpath(*PHALA)
    return (d / q).read_bytes(), IntelCollateral.from_json((d / c).read_text()), t


def _warm(raw: bytes, col: IntelCollateral, t) -> VerificationCache:  # type: ignore[no-untyped-def]
    cache = VerificationCache()
    verify_quote(raw, col, now=t, trust=TrustAnchors(), cache=cache)
    second = verify_quote(raw, col, now=t, trust=TrustAnchors(), cache=cache)
    assert any("[cached]" in c.detail for c in second.checks)  # the cache is really in use
    return cache


def _names(checks: tuple) -> list[tuple[str, str]]:  # type: ignore[type-arg]
    return [(c.name, c.detail.removesuffix(" [cached]")) for c in checks]


@pytest.mark.parametrize("case", ["sgx", "tdx_v4"])
def test_cached_result_equals_uncached(att: Path, case: str):
    raw, col, t = _case(att, case)
    cache = _warm(raw, col, t)
    plain = verify_quote(raw, col, now=t, trust=TrustAnchors())
    cached = verify_quote(raw, col, now=t, trust=TrustAnchors(), cache=cache)
    assert cached.to_dict()["measurements"] == plain.to_dict()["measurements"]
    assert (cached.tcb_status, cached.advisory_ids) == (plain.tcb_status, plain.advisory_ids)
    assert _names(cached.checks) == _names(plain.checks)  # every check still runs and is logged


def test_cached_chain_is_not_reused_for_other_bytes(att: Path):
    """The PCK chain with one byte of the leaf's PEM changed: a cache keyed by anything less than
    the exact bytes (subject, serial, the parsed chain of the genuine quote) would accept it."""
    raw, col, t = _case(att, "sgx")
    cache = _warm(raw, col, t)
    bad = (att / "negative" / "sgx_v3_pck_leaf_pem_flipped.bin").read_bytes()
    with pytest.raises(AttestationError):
        verify_quote(bad, col, now=t, trust=TrustAnchors(), cache=cache)


def test_cached_tcb_info_signature_is_not_reused_for_other_json(att: Path):
    """The genuine signature with TCB info whose text differs (a level's status rewritten to
    UpToDate): the signature fact is keyed by the JSON's exact bytes."""
    raw, col, t = _case(att, "sgx")
    cache = _warm(raw, col, t)
    forged = col.tcb_info.replace(b"ConfigurationAndSWHardeningNeeded", b"UpToDate", 1)
    assert forged != col.tcb_info
    with pytest.raises(CollateralError, match="signature does not verify"):
        verify_quote(raw, replace(col, tcb_info=forged), now=t, trust=TrustAnchors(), cache=cache)


def test_cached_qe_identity_signature_is_not_reused_for_other_json(att: Path):
    raw, col, t = _case(att, "tdx_v4")
    cache = _warm(raw, col, t)
    forged = col.qe_identity.replace(b'"tcbLevels"', b' "tcbLevels"', 1)  # one space more
    with pytest.raises(CollateralError, match="signature does not verify"):
        verify_quote(
            raw, replace(col, qe_identity=forged), now=t, trust=TrustAnchors(), cache=cache
        )


def test_cached_signature_is_not_reused_for_another_signature(att: Path):
    raw, col, t = _case(att, "sgx")
    cache = _warm(raw, col, t)
    sig = bytearray(col.tcb_info_signature)
    sig[-1] ^= 1
    with pytest.raises(CollateralError, match="signature does not verify"):
        verify_quote(
            raw,
            replace(col, tcb_info_signature=bytes(sig)),
            now=t,
            trust=TrustAnchors(),
            cache=cache,
        )


@pytest.mark.parametrize("case", ["sgx", "tdx_v4"])
def test_cached_collateral_past_its_next_update_is_refused(att: Path, case: str):
    """The cache was warmed inside every window; a later verification time one second past the
    first nextUpdate / notAfter of the collateral is refused as expired, cache or not."""
    raw, col, t = _case(att, case)
    cache = _warm(raw, col, t)
    info = TcbInfo.from_json(col.tcb_info)
    ident = EnclaveIdentity.from_json(col.qe_identity)
    ends = [info.next_update, ident.next_update]
    ends += [c.next_update_utc for c in (col.root_ca_crl, col.pck_crl) if c.next_update_utc]
    later = min(ends) + timedelta(seconds=1)
    for c in (cache, None):
        with pytest.raises(ExpiredError):
            verify_quote(raw, col, now=later, trust=TrustAnchors(), cache=c)


@pytest.mark.parametrize(
    ("case", "expires", "check"),
    [("sgx", "qe_identity", "QE identity"), ("tdx_v4", "pck_crl", "revocation list")],
)
def test_each_cached_window_is_checked_on_its_own(att: Path, case: str, expires: str, check: str):
    """The item of each vector whose window ends first, one second later: refused by that
    check (its parse / signature is cached, its dates are compared with each call's time)."""
    raw, col, t = _case(att, case)
    cache = _warm(raw, col, t)
    if expires == "qe_identity":
        end = EnclaveIdentity.from_json(col.qe_identity).next_update
    else:
        end = col.pck_crl.next_update_utc
    assert end is not None
    with pytest.raises(ExpiredError) as e:
        verify_quote(raw, col, now=end + timedelta(seconds=1), trust=TrustAnchors(), cache=cache)
    assert e.value.check == check
    verify_quote(raw, col, now=end, trust=TrustAnchors(), cache=cache)  # the last valid second


def test_cached_chain_before_its_not_before_is_refused(att: Path):
    """A time before the PCK certificate was issued: windows are checked per call, not cached."""
    raw, col, t = _case(att, "sgx")
    cache = _warm(raw, col, t)
    with pytest.raises(ExpiredError):
        verify_quote(raw, col, now=t - timedelta(days=3650), trust=TrustAnchors(), cache=cache)


def test_cached_tcb_info_parse_is_not_reused_for_other_json(att: Path):
    """Parsed TCB info is shared by its exact bytes: other bytes are parsed (and signed) anew."""
    raw, col, t = _case(att, "sgx")
    cache = _warm(raw, col, t)
    doc = json.loads(col.tcb_info)
    doc["fmspc"] = "000000000000"
    other = json.dumps(doc, separators=(",", ":")).encode()
    with pytest.raises(CollateralError):
        verify_quote(raw, replace(col, tcb_info=other), now=t, trust=TrustAnchors(), cache=cache)


def test_cached_root_trust_follows_the_anchors_of_each_call(att: Path):
    from shieldml.errors import UntrustedRootError

    raw, col, t = _case(att, "tdx_v4")
    cache = _warm(raw, col, t)
    with pytest.raises(UntrustedRootError):
        verify_quote(raw, col, now=t, trust=TrustAnchors(vendor={}), cache=cache)
    with pytest.raises(UntrustedRootError):  # and without the cache, after the vendor memo
        verify_quote(raw, col, now=t, trust=TrustAnchors(vendor={}))


def test_cache_shared_between_quotes_keeps_per_quote_signatures(att: Path):
    """One cache across SGX and TDX quotes and the negative cases: each tampered quote fails."""
    cache = VerificationCache()
    for case in ("sgx", "tdx_v4"):
        raw, col, t = _case(att, case)
        verify_quote(raw, col, now=t, trust=TrustAnchors(), cache=cache)
    neg = att / "negative"
    cases = json.loads((neg / "cases.json").read_text())
    cases = cases if isinstance(cases, list) else cases.get("cases", [])
    tried = 0
    for entry in cases:
        name = entry.get("file", "")
        if name.startswith(("sgx_", "tdx_")):
            raw, col, t = _case(att, "sgx" if name.startswith("sgx_") else "tdx_v4")
            with pytest.raises((AttestationError, ValueError)):
                verify_quote(
                    (neg / name).read_bytes(), col, now=t, trust=TrustAnchors(), cache=cache
                )
            tried += 1
    assert tried >= 5
