"""One entry point for any evidence: detect the TEE, gather what it needs, verify, get Claims."""

from __future__ import annotations

import struct
from dataclasses import replace
from datetime import UTC, datetime

from cryptography import x509

from shieldml.attest import _certs
from shieldml.attest._checks import Check, CheckLog, VerificationCache
from shieldml.attest._claims import Claims
from shieldml.attest._intel_collateral import IntelCollateral
from shieldml.attest._intel_quote import TEE_TDX
from shieldml.attest._intel_verify import verify_quote
from shieldml.attest._ratls import extract
from shieldml.attest._snp import (
    HCL_OFFSET,
    REPORT_SIZE,
    CrlSource,
    load_certificate,
    parse_cert_table,
    verify_report,
)
from shieldml.attest._tee import TeeKind
from shieldml.attest._trust import TrustAnchors
from shieldml.errors import AttestationError, CollateralError, FormatError

#: what ``tee=`` accepts: detect it, one TEE kind, or an RA-TLS certificate carrying the evidence
#: (the CLI's ``--tee sgx`` maps a certificate to ``ratls``; ``--tee ratls`` is deprecated)
TEE_CHOICES = ("auto", *(k.value for k in TeeKind), "ratls")
MAX_EVIDENCE = 64 * 1024


def _is_cert_table(data: bytes) -> bool:
    """An SEV-SNP certificate table starts with a GUID, not with a DER SEQUENCE or PEM text."""
    return len(data) >= 24 and data[0] != 0x30 and not data.lstrip().startswith(b"-----BEGIN")


def load_crl(data: bytes, what: str) -> x509.CertificateRevocationList:
    """A CRL as DER or PEM; :class:`CollateralError` when it is neither."""
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            return _certs.pem_crl(data)
        return _certs.der_crl(data)
    except ValueError as e:
        raise CollateralError("collateral", f"{what}: not a DER or PEM CRL") from e


def is_certificate(data: bytes) -> bool:
    """Whether ``data`` looks like an X.509 certificate (PEM or DER): RA-TLS evidence."""
    return data.lstrip().startswith(b"-----BEGIN CERTIFICATE") or data[:2] in (
        b"\x30\x82",
        b"\x30\x81",
    )


def detect_tee(data: bytes) -> str:
    """Which kind of evidence ``data`` is: sgx, tdx, snp or ratls (an RA-TLS certificate)."""
    if is_certificate(data):
        return "ratls"
    if len(data) == REPORT_SIZE or (data[:4] == b"HCLA" and len(data) >= HCL_OFFSET + REPORT_SIZE):
        return "snp"
    if len(data) >= 48:
        version, key_type, tee_type = struct.unpack_from("<HHI", data)
        if version in (3, 4, 5) and key_type in (2, 3):
            return "tdx" if tee_type == TEE_TDX else "sgx"
    raise FormatError("cannot tell which TEE produced this evidence", hint="pass --tee")


def verify_evidence(
    data: bytes,
    *,
    tee: str = "auto",
    collateral: IntelCollateral | None = None,
    vcek: bytes | None = None,
    cert_chain: list[x509.Certificate] | None = None,
    now: datetime | None = None,
    trust: TrustAnchors | None = None,
    cache: VerificationCache | None = None,
    amd_crl: bytes | None = None,
    amd_crl_for: CrlSource | None = None,
) -> Claims:
    """Verify SGX/TDX quotes, SEV-SNP reports or RA-TLS certificates; raise the failing check.

    ``now`` is the verification time (default: the current time); ``trust`` the anchors
    (default: the pinned vendor roots only); ``amd_crl`` AMD's CRL for an SEV-SNP report's
    product (DER or PEM, as KDS serves it), checked when given; ``amd_crl_for`` the verifier's own
    source of it when none is given (asked only once the VCEK chain verified).
    """
    if len(data) > MAX_EVIDENCE:
        raise FormatError(f"evidence too large ({len(data)} bytes)")
    if tee not in TEE_CHOICES:
        raise ValueError(f"tee must be one of {TEE_CHOICES}")
    kind = detect_tee(data) if tee == "auto" else tee
    at = now or datetime.now(UTC)
    anchors = trust or TrustAnchors()
    if kind == "snp":
        if vcek is not None and _is_cert_table(vcek):  # certificates from the extended report
            table = parse_cert_table(vcek)
            vcek = table.get("vcek") or table.get("vlek")
            if cert_chain is None and "ask" in table and "ark" in table:
                cert_chain = [load_certificate(table["ask"]), load_certificate(table["ark"])]
        if vcek is None or cert_chain is None:
            raise CollateralError(
                "endorsement",
                "an SEV-SNP report needs its VCEK/VLEK and the ASK/ARK chain",
                hint="pass --vcek and --cert-chain (AMD's key distribution service serves both)",
            )
        crl = load_crl(amd_crl, "AMD CRL") if amd_crl is not None else None
        return verify_report(
            data, vcek, cert_chain, now=at, trust=anchors, cache=cache, crl=crl, crl_for=amd_crl_for
        )
    quote, binding = data, None
    if kind == "ratls":
        log = CheckLog()
        try:
            ev = extract(data)
        except AttestationError as e:
            raise log.fail(e) from None
        quote, binding = ev.quote, f"RA-TLS certificate ({ev.extension} extension): {ev.binding}"
    if collateral is None:
        raise CollateralError(
            "collateral",
            "a DCAP quote needs its collateral (PCK CRL, TCB info, QE identity)",
            hint="pass --collateral (JSON), or fetch it from a PCCS",
        )
    claims = verify_quote(quote, collateral, now=at, trust=anchors, cache=cache)
    if binding is None:
        return claims
    return replace(claims, checks=(Check("RA-TLS binding", True, binding), *claims.checks))
