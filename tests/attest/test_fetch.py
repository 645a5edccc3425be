"""Collateral, VCEKs and vendor certificates through an injected fetcher (no network)."""

from __future__ import annotations

import urllib.parse
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from shieldml.attest import IntelCollateral, TrustAnchors, Vendor, verify_evidence
from shieldml.attest._fetch import (
    INTEL_PCS_URL,
    INTEL_ROOT_CA_CRL_URL,
    INTEL_ROOT_CA_URL,
    CollateralCache,
    Response,
    fetch_intel_collateral,
    fetch_vcek,
    pcs_response_json,
)
from shieldml.attest._truststore import TrustStore
from shieldml.errors import CollateralError, UntrustedRootError

T = datetime(2025, 7, 1, tzinfo=UTC)


def pem(chain: list[x509.Certificate]) -> str:
    return urllib.parse.quote("".join(c.public_bytes(Encoding.PEM).decode() for c in chain))


class FakeServer:
    """Serves fixed responses by URL and records what was asked."""

    def __init__(self, routes: dict[str, Response]) -> None:
        self.routes = routes
        self.calls: list[str] = []

    def __call__(self, url: str) -> Response:
        self.calls.append(url)
        return self.routes.get(url, Response(404, b"", {}))


def fake_pcs(
    col: IntelCollateral, fmspc: str, tee: str = "sgx", ca: str = "processor"
) -> FakeServer:
    der = Encoding.DER
    return FakeServer(
        {
            f"{INTEL_PCS_URL}/sgx/certification/v4/pckcrl?ca={ca}&encoding=der": Response(
                200, col.pck_crl.public_bytes(der), {"SGX-PCK-CRL-Issuer-Chain": pem(col.pck_crl_issuer_chain)}
            ),
            f"{INTEL_PCS_URL}/{tee}/certification/v4/tcb?fmspc={fmspc}": Response(
                200, pcs_response_json("tcbInfo", col.tcb_info, col.tcb_info_signature),
                {"TCB-Info-Issuer-Chain": pem(col.tcb_info_issuer_chain)},
            ),
            f"{INTEL_PCS_URL}/{tee}/certification/v4/qe/identity": Response(
                200, pcs_response_json("enclaveIdentity", col.qe_identity, col.qe_identity_signature),
                {"SGX-Enclave-Identity-Issuer-Chain": pem(col.qe_identity_issuer_chain)},
            ),
            INTEL_ROOT_CA_CRL_URL: Response(200, col.root_ca_crl.public_bytes(der), {}),
        }
    )  # fmt: skip


@pytest.fixture
def sgx(att: Path) -> tuple[bytes, IntelCollateral]:
    d = att / "intel" / "phala"
    return (d / "sgx_quote.bin").read_bytes(), IntelCollateral.from_json(
        (d / "sgx_quote_collateral.json").read_text()
    )


def test_fetch_from_pcs_gives_verifiable_collateral(sgx: tuple[bytes, IntelCollateral]):
    quote, col = sgx
    server = fake_pcs(col, "00A067110000")
    fetched = fetch_intel_collateral(quote, server)
    assert fetched.tcb_info == col.tcb_info  # exact signed bytes preserved
    claims = verify_evidence(quote, collateral=fetched, now=T)
    assert claims.tcb_status.value == "ConfigurationAndSWHardeningNeeded"  # type: ignore[union-attr]


def test_cache_reuses_valid_collateral_and_refetches_expired(
    sgx: tuple[bytes, IntelCollateral], tmp_path: Path
):
    quote, col = sgx
    server = fake_pcs(col, "00A067110000")
    cache = CollateralCache(tmp_path)
    cache.intel(quote, now=T, fetch=server)
    n = len(server.calls)
    cache.intel(quote, now=T)  # served from the cache, no fetcher needed
    assert len(server.calls) == n
    with pytest.raises(CollateralError, match="no valid cached collateral"):
        cache.intel(quote, now=datetime(2026, 1, 1, tzinfo=UTC))


def test_fetch_error_is_reported(sgx: tuple[bytes, IntelCollateral]):
    with pytest.raises(CollateralError, match="HTTP 404"):
        fetch_intel_collateral(sgx[0], FakeServer({}))


def test_fetch_vcek_and_chain_from_kds(att: Path, tmp_path: Path):
    a = att / "amd" / "virtee"
    report = (a / "report_milan.bin").read_bytes()
    chip = (a / "report_milan.bin").read_bytes()[0x1A0:0x1E0].hex()
    vcek = (a / "vcek_milan.der").read_bytes()
    base = "https://kdsintf.amd.com/vcek/v1/Milan"
    fetch = FakeServer(
        {
            f"{base}/cert_chain": Response(200, (a / "cert_chain_milan.pem").read_bytes(), {}),
            f"{base}/{chip}?blSPL=03&teeSPL=00&snpSPL=08&ucodeSPL=115": Response(200, vcek, {}),
        }
    )
    server = fetch
    got, chain = fetch_vcek(report, fetch, product="Milan")
    assert got == vcek and len(chain) == 2
    claims = verify_evidence(
        report, vcek=got, cert_chain=chain, now=datetime(2026, 1, 1, tzinfo=UTC)
    )
    assert claims.tee.value == "snp"
    cache = CollateralCache(tmp_path)
    cache.vcek(report, fetch=fetch, product="Milan")
    n = len(server.calls)
    assert cache.vcek(report)[0] == vcek and len(server.calls) == n
    with pytest.raises(CollateralError, match="product generation"):
        fetch_vcek(report, fetch)


def test_trust_store_accepts_only_pinned_chains(att: Path, tmp_path: Path):
    store = TrustStore(tmp_path / "trust")
    names = store.import_file(att / "amd" / "roots" / "milan_ask_ark_asvk.pem")
    assert sorted(names) == ["amd-ark-milan", "amd-sev-milan", "amd-sev-vlek-milan"]
    assert store.import_file(att / "intel" / "phala" / "Intel_SGX_RootCA.der") == ["intel-sgx-root"]
    with pytest.raises(UntrustedRootError):
        store.import_file(att / "intel" / "qvl-synthetic" / "trustedRootCaCert.pem")
    assert len(store.certificates()) == 4


def test_trust_fetch_through_injected_client(att: Path, tmp_path: Path):
    roots = att / "amd" / "roots"
    routes = {
        INTEL_ROOT_CA_URL: Response(
            200, (att / "intel/phala/Intel_SGX_RootCA.der").read_bytes(), {}
        )
    }
    for gen in ("Milan", "Genoa", "Turin"):
        body = (roots / f"{gen.lower()}_ask_ark_asvk.pem").read_bytes()
        for kind in ("vcek", "vlek"):
            routes[f"https://kdsintf.amd.com/{kind}/v1/{gen}/cert_chain"] = Response(200, body, {})
    store = TrustStore(tmp_path)
    names = store.fetch(FakeServer(routes))
    assert "intel-sgx-root" in names and "amd-ark-turin" in names and len(names) == 10


def test_default_anchors_are_pinned():
    anchors = TrustAnchors()
    assert (
        set(anchors.vendor) == {Vendor.INTEL, Vendor.AMD, Vendor.NVIDIA, Vendor.NVIDIA_RIM}
        and all(len(fps) >= 1 for fps in anchors.vendor.values())
        and anchors.simulated == frozenset()
        and anchors.custom == frozenset()
    )
