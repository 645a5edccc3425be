"""Attestation: is this evidence genuine TEE hardware, and at which TCB level?

Parsing (bytes -> typed, unverified objects) and verification (signatures, chains to pinned vendor
roots, collateral at an explicit time, TCB levels) for Intel SGX/TDX DCAP quotes and AMD SEV-SNP
reports. The result is :class:`Claims`; acceptability (debug, measurements) is the policy's job.

Names load on first use (PEP 562): reading a TEE's name (a manifest, the CLI's options) loads
only ``_tee``, and each name loads the module it lives in, not every other vendor's code.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from shieldml.attest._checks import Check, VerificationCache
    from shieldml.attest._claims import (
        Claims,
        SgxMeasurements,
        SnpMeasurements,
        TcbStatus,
        TdxMeasurements,
        iso_utc,
    )
    from shieldml.attest._evidence import TEE_CHOICES, detect_tee, is_certificate, verify_evidence
    from shieldml.attest._fetch import (
        CollateralCache,
        Fetcher,
        fetch_amd_crl,
        fetch_intel_collateral,
        fetch_vcek,
        http_fetcher,
    )
    from shieldml.attest._intel_collateral import (
        EnclaveIdentity,
        IntelCollateral,
        TcbInfo,
        load_pem_chain,
    )
    from shieldml.attest._intel_quote import Quote, SgxReportBody, TdReportBody
    from shieldml.attest._intel_verify import verify_pck_chain, verify_quote
    from shieldml.attest._nvidia import (
        GpuClaims,
        GpuEvidence,
        load_evidence_json,
        not_in_cc_mode,
        verify_gpu_evidence,
    )
    from shieldml.attest._nvidia import (
        load_chain as load_gpu_chain,
    )
    from shieldml.attest._ratls import RaTlsEvidence, extract
    from shieldml.attest._snp import AMD_PRODUCTS, CrlSource, SnpReport, verify_report
    from shieldml.attest._tee import DEPRECATED_TEE_NAMES, TEE_NAMES, TeeKind, canonical_tee
    from shieldml.attest._trust import (
        AMD_ARK_SHA256,
        INTEL_SGX_ROOT_SHA256,
        RootKind,
        TrustAnchors,
        Vendor,
        anchors_from_files,
        fingerprint,
    )
    from shieldml.attest._truststore import TrustStore, default_store

#: where each public name lives: (module, its name there)
_WHERE = {
    "AMD_ARK_SHA256": ("_trust", "AMD_ARK_SHA256"),
    "AMD_PRODUCTS": ("_snp", "AMD_PRODUCTS"),
    "Check": ("_checks", "Check"),
    "Claims": ("_claims", "Claims"),
    "CollateralCache": ("_fetch", "CollateralCache"),
    "CrlSource": ("_snp", "CrlSource"),
    "DEPRECATED_TEE_NAMES": ("_tee", "DEPRECATED_TEE_NAMES"),
    "EnclaveIdentity": ("_intel_collateral", "EnclaveIdentity"),
    "Fetcher": ("_fetch", "Fetcher"),
    "GpuClaims": ("_nvidia", "GpuClaims"),
    "GpuEvidence": ("_nvidia", "GpuEvidence"),
    "INTEL_SGX_ROOT_SHA256": ("_trust", "INTEL_SGX_ROOT_SHA256"),
    "IntelCollateral": ("_intel_collateral", "IntelCollateral"),
    "Quote": ("_intel_quote", "Quote"),
    "RaTlsEvidence": ("_ratls", "RaTlsEvidence"),
    "RootKind": ("_trust", "RootKind"),
    "SgxMeasurements": ("_claims", "SgxMeasurements"),
    "SgxReportBody": ("_intel_quote", "SgxReportBody"),
    "SnpMeasurements": ("_claims", "SnpMeasurements"),
    "SnpReport": ("_snp", "SnpReport"),
    "TEE_CHOICES": ("_evidence", "TEE_CHOICES"),
    "TEE_NAMES": ("_tee", "TEE_NAMES"),
    "TcbInfo": ("_intel_collateral", "TcbInfo"),
    "TcbStatus": ("_claims", "TcbStatus"),
    "TdReportBody": ("_intel_quote", "TdReportBody"),
    "TdxMeasurements": ("_claims", "TdxMeasurements"),
    "TeeKind": ("_tee", "TeeKind"),
    "TrustAnchors": ("_trust", "TrustAnchors"),
    "TrustStore": ("_truststore", "TrustStore"),
    "Vendor": ("_trust", "Vendor"),
    "VerificationCache": ("_checks", "VerificationCache"),
    "anchors_from_files": ("_trust", "anchors_from_files"),
    "canonical_tee": ("_tee", "canonical_tee"),
    "default_store": ("_truststore", "default_store"),
    "detect_tee": ("_evidence", "detect_tee"),
    "extract": ("_ratls", "extract"),
    "fetch_amd_crl": ("_fetch", "fetch_amd_crl"),
    "fetch_intel_collateral": ("_fetch", "fetch_intel_collateral"),
    "fetch_vcek": ("_fetch", "fetch_vcek"),
    "fingerprint": ("_trust", "fingerprint"),
    "http_fetcher": ("_fetch", "http_fetcher"),
    "is_certificate": ("_evidence", "is_certificate"),
    "iso_utc": ("_claims", "iso_utc"),
    "load_evidence_json": ("_nvidia", "load_evidence_json"),
    "load_gpu_chain": ("_nvidia", "load_chain"),
    "load_pem_chain": ("_intel_collateral", "load_pem_chain"),
    "not_in_cc_mode": ("_nvidia", "not_in_cc_mode"),
    "verify_evidence": ("_evidence", "verify_evidence"),
    "verify_gpu_evidence": ("_nvidia", "verify_gpu_evidence"),
    "verify_pck_chain": ("_intel_verify", "verify_pck_chain"),
    "verify_quote": ("_intel_verify", "verify_quote"),
    "verify_report": ("_snp", "verify_report"),
}

__all__ = [
    "AMD_ARK_SHA256",
    "AMD_PRODUCTS",
    "DEPRECATED_TEE_NAMES",
    "INTEL_SGX_ROOT_SHA256",
    "TEE_CHOICES",
    "TEE_NAMES",
    "Check",
    "Claims",
    "CollateralCache",
    "CrlSource",
    "EnclaveIdentity",
    "Fetcher",
    "GpuClaims",
    "GpuEvidence",
    "IntelCollateral",
    "Quote",
    "RaTlsEvidence",
    "RootKind",
    "SgxMeasurements",
    "SgxReportBody",
    "SnpMeasurements",
    "SnpReport",
    "TcbInfo",
    "TcbStatus",
    "TdReportBody",
    "TdxMeasurements",
    "TeeKind",
    "TrustAnchors",
    "TrustStore",
    "Vendor",
    "VerificationCache",
    "anchors_from_files",
    "canonical_tee",
    "default_store",
    "detect_tee",
    "extract",
    "fetch_amd_crl",
    "fetch_intel_collateral",
    "fetch_vcek",
    "fingerprint",
    "http_fetcher",
    "is_certificate",
    "iso_utc",
    "load_evidence_json",
    "load_gpu_chain",
    "load_pem_chain",
    "not_in_cc_mode",
    "verify_evidence",
    "verify_gpu_evidence",
    "verify_pck_chain",
    "verify_quote",
    "verify_report",
]
assert sorted(__all__) == sorted(_WHERE)


def __getattr__(name: str) -> Any:
    try:
        module, attr = _WHERE[name]
    except KeyError:
        raise AttributeError(f"module 'shieldml.attest' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(f"shieldml.attest.{module}"), attr)
    globals()[name] = value  # loaded once: the next lookup does not come here
    return value


def __dir__() -> list[str]:
    return __all__
