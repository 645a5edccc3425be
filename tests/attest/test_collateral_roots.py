"""Collateral and roots: every chain of one piece of evidence ends at the same trusted root, the
TCB signing chain is Intel's shape, and the claims' ``root`` is the weakest root used.

The attack these tests are named after: a host with a genuine (but vulnerable) Intel platform
re-signs the TCB info and QE identity of its real quote with a root the verifier trusts for other
reasons (the simulated platform of a broker started with ``--simulated-platform``, a custom root),
and marks its TCB ``UpToDate`` with no advisories. The quote's PCK chain still ends at Intel's root,
so a verifier that keeps only the PCK chain's root kind reports ``root=vendor``.
"""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from shieldml.attest import (
    IntelCollateral,
    RootKind,
    TcbStatus,
    TrustAnchors,
    verify_quote,
)
from shieldml.broker.server.config import BrokerConfig
from shieldml.errors import AttestationError, CollateralError
from shieldml.testing.simulated import SimulatedPlatform, fixed_clock
from tests.attest.conftest import INTEL_CASES

AT = datetime(2025, 7, 1, tzinfo=UTC)


def _sign(key: ec.EllipticCurvePrivateKey, data: bytes) -> bytes:
    r, s = decode_dss_signature(key.sign(data, ec.ECDSA(hashes.SHA256())))
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def _ec(sim: SimulatedPlatform, name: str) -> ec.EllipticCurvePrivateKey:
    key = sim.keys[name]
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return key


def _real(att: Path, case: str) -> tuple[bytes, IntelCollateral]:
    q, c, _ = INTEL_CASES[case]
    d = att / "intel" / "phala"
    return (d / q).read_bytes(), IntelCollateral.from_json((d / c).read_text())


def _all_up_to_date(tcb_info: bytes) -> bytes:
    """The host's edit: every TCB level UpToDate, no advisories."""
    info = json.loads(tcb_info)
    for level in info["tcbLevels"]:
        level["tcbStatus"] = "UpToDate"
        level["advisoryIDs"] = []
    return json.dumps(info, separators=(",", ":")).encode()


def _resigned(
    col: IntelCollateral,
    key: ec.EllipticCurvePrivateKey,
    chain: list[x509.Certificate],
    tcb_info: bytes | None = None,
) -> IntelCollateral:
    tcb = col.tcb_info if tcb_info is None else tcb_info
    return replace(
        col,
        tcb_info_issuer_chain=chain,
        tcb_info=tcb,
        tcb_info_signature=_sign(key, tcb),
        qe_identity_issuer_chain=chain,
        qe_identity_signature=_sign(key, col.qe_identity),
    )


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> SimulatedPlatform:
    return SimulatedPlatform.open(tmp_path_factory.mktemp("sim"), clock=fixed_clock(AT))


@pytest.fixture(scope="module")
def broker_trust(sim: SimulatedPlatform, tmp_path_factory: pytest.TempPathFactory) -> TrustAnchors:
    """The anchors of a broker started with ``--simulated-platform`` (the pinned vendor roots plus
    the simulated platform's), built the way ``shieldml broker serve`` builds them."""
    d = tmp_path_factory.mktemp("sim-dir")
    sim.save(d)
    state = tmp_path_factory.mktemp("state")
    return BrokerConfig(
        database="sqlite://", state_dir=str(state), simulated_platforms=(str(d),)
    ).trust()


def test_real_quote_with_tcb_info_resigned_by_the_simulated_root_is_not_vendor(
    att: Path, sim: SimulatedPlatform, broker_trust: TrustAnchors
):
    """The attack of issue 13.2: Intel's quote, the simulated root's TCB info (one-certificate
    chain, so no root CRL) claiming UpToDate. Before the fix: root=vendor, UpToDate."""
    raw, col = _real(att, "sgx")
    forged = _resigned(col, _ec(sim, "intel_root"), [sim.intel_root], _all_up_to_date(col.tcb_info))
    with pytest.raises(AttestationError) as e:
        claims = verify_quote(raw, forged, now=AT, trust=broker_trust)
        pytest.fail(f"accepted as root={claims.root} {claims.tcb_status} {claims.advisory_ids}")
    assert e.value.check in ("certificate chain", "TCB info")


def test_real_quote_with_collateral_resigned_by_the_simulated_tcb_signing_key_is_not_vendor(
    att: Path, sim: SimulatedPlatform, broker_trust: TrustAnchors
):
    """The same with Intel's chain shape (TCB Signing <- root) but the simulated root: the TCB info
    chain ends at another root than the PCK chain."""
    raw, col = _real(att, "tdx_v4")
    chain = [sim.certs["tcb_signing"], sim.intel_root]
    forged = _resigned(col, _ec(sim, "tcb_signing"), chain)
    with pytest.raises(CollateralError, match="another root than the PCK chain"):
        verify_quote(raw, forged, now=AT, trust=broker_trust)


def test_simulated_tcb_info_signed_by_the_root_alone_is_refused(sim: SimulatedPlatform):
    """A one-certificate TCB info chain (the root signs the TCB info itself) skipped the root CRL
    check; Intel signs collateral with a TCB Signing certificate only."""
    quote, col = sim.sgx_quote()
    forged = _resigned(col, _ec(sim, "intel_root"), [sim.intel_root])
    with pytest.raises(CollateralError, match="2 certificates"):
        verify_quote(quote, forged, now=AT, trust=sim.trust())


def test_tcb_info_signed_by_the_pck_ca_is_refused(sim: SimulatedPlatform):
    """Any certificate under the root is not Intel's TCB signer: the PCK CA's key (which signs
    every PCK certificate) must not sign TCB info."""
    quote, col = sim.sgx_quote()
    forged = _resigned(col, _ec(sim, "pck_ca"), [sim.certs["pck_ca"], sim.intel_root])
    with pytest.raises(CollateralError, match="Intel SGX TCB Signing"):
        verify_quote(quote, forged, now=AT, trust=sim.trust())


def test_real_collateral_still_verifies_as_vendor(att: Path, broker_trust: TrustAnchors):
    raw, col = _real(att, "tdx_v4")
    claims = verify_quote(raw, col, now=AT, trust=broker_trust)
    assert claims.root is RootKind.VENDOR and claims.tcb_status is TcbStatus.UP_TO_DATE
    assert claims.tcb_evaluation_data_number == 17


def test_weakest_root_kind():
    from shieldml.attest._trust import weakest

    v, c, s = RootKind.VENDOR, RootKind.CUSTOM, RootKind.SIMULATED
    assert weakest(v, v) is v
    assert weakest(v, c) is c and weakest(c, v) is c
    assert weakest(v, s, c) is s and weakest(c, s) is s
