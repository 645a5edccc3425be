"""Attestation: is this evidence genuine TEE hardware, and at which TCB level?

Parsing (bytes -> typed, unverified objects) and verification (signatures, chains to pinned vendor
roots, collateral at an explicit time, TCB levels) for Intel SGX/TDX DCAP quotes and AMD SEV-SNP
reports. The result is :class:`Claims`; acceptability (debug, measurements) is the policy's job.
"""

from shieldml.attest._checks import Check, VerificationCache
from shieldml.attest._claims import (
    DEPRECATED_TEE_NAMES,
    TEE_NAMES,
    Claims,
    SgxMeasurements,
    SnpMeasurements,
    TcbStatus,
    TdxMeasurements,
    TeeKind,
    canonical_tee,
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
from shieldml.attest._nvidia import load_chain as load_gpu_chain
from shieldml.attest._ratls import RaTlsEvidence, extract
from shieldml.attest._snp import AMD_PRODUCTS, CrlSource, SnpReport, verify_report
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
