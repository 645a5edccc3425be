"""Verify an Intel DCAP quote (SGX or TDX) against its collateral, following Intel's QVL.

Pipeline (each step raises the named error through the check log):
 1. parse the quote                                   FormatError
 2. header: ECDSA-P256 attestation key, Intel QE        AttestationError
 3. PCK chain from the quote to a trusted Intel root     UntrustedRootError / ExpiredError
 4. root CA CRL and PCK CRL (signature, time, entries)   RevokedError / ExpiredError
 5. QE report signed by the PCK key                      AttestationError
 6. QE report binds the attestation key (auth data)      AttestationError
 7. quote signed by the attestation key                  AttestationError
 8. TCB info: chain (TCB Signing <- the PCK chain's root), root CRL, signature over exact JSON,
    FMSPC/PCE-ID, validity                                                   CollateralError / ExpiredError
 9. QE identity: chain (as 8), root CRL, signature, QE match, QE TCB level   CollateralError
10. platform TCB level; TDX module identity; convergence; Revoked / no match TcbError
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import TypeVar, cast

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from shieldml.attest._checks import CheckLog, VerificationCache
from shieldml.attest._claims import (
    Claims,
    SgxMeasurements,
    TcbStatus,
    TdxMeasurements,
    iso_utc,
)
from shieldml.attest._intel_collateral import (
    IntelCollateral,
    PckExtension,
    TcbInfo,
    TcbLevel,
    load_pem_chain,
)
from shieldml.attest._intel_quote import (
    ATT_KEY_ECDSA_P256,
    CERT_PCK_CHAIN,
    INTEL_QE_VENDOR_ID,
    Quote,
    SgxReportBody,
    TdReportBody,
)
from shieldml.attest._tee import TeeKind
from shieldml.attest._trust import RootKind, TrustAnchors, Vendor, fingerprint, weakest
from shieldml.attest._x509 import cert_info, check_crl, cn, verify_chain
from shieldml.errors import (
    AttestationError,
    CollateralError,
    ExpiredError,
    FormatError,
    TcbError,
)

S = TcbStatus
P = TypeVar("P")
_OUT_OF_DATE_FROM = {
    S.UP_TO_DATE: S.OUT_OF_DATE,
    S.SW_HARDENING_NEEDED: S.OUT_OF_DATE,
    S.CONFIGURATION_NEEDED: S.OUT_OF_DATE_CONFIGURATION_NEEDED,
    S.CONFIGURATION_AND_SW_HARDENING_NEEDED: S.OUT_OF_DATE_CONFIGURATION_NEEDED,
}
_HINTS = {
    S.SW_HARDENING_NEEDED: "software mitigations for the listed advisories must be in place",
    S.CONFIGURATION_NEEDED: "the platform's BIOS configuration must change (see advisories)",
    S.CONFIGURATION_AND_SW_HARDENING_NEEDED: "BIOS configuration and software mitigations needed",
    S.OUT_OF_DATE: "a BIOS / microcode (or TDX module) update is needed",
    S.OUT_OF_DATE_CONFIGURATION_NEEDED: "a BIOS / microcode update and a configuration change",
}


def _p256(raw: bytes) -> ec.EllipticCurvePublicKey:
    return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), b"\x04" + raw)


def _ecdsa_ok(key: ec.EllipticCurvePublicKey, sig: bytes, data: bytes) -> bool:
    der = encode_dss_signature(int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:64], "big"))
    try:
        key.verify(der, data, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return False
    return True


def _signing_key(cert: x509.Certificate) -> ec.EllipticCurvePublicKey:
    key = cert.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise AttestationError("certificate chain", f"'{cn(cert.subject)}' has no EC key")
    return key


def verify_quote(
    raw: bytes,
    collateral: IntelCollateral,
    *,
    now: datetime,
    trust: TrustAnchors,
    cache: VerificationCache | None = None,
) -> Claims:
    """Verify a DCAP quote; return its :class:`Claims` or raise the failing check.

    ``cache`` reuses chain, CRL and collateral-signature results across calls (see
    :class:`VerificationCache`); every per-quote signature is always checked.
    """
    log = CheckLog(cache=cache)
    quote, chain, root_kind = _quote_and_pck_chain(raw, now, trust, log)  # 1-3
    cert = quote.certification
    pck, pck_ca, root = chain
    check_crl(collateral.root_ca_crl, root, [pck_ca], now, log, "root CA CRL")  # 4
    check_crl(collateral.pck_crl, pck_ca, [pck], now, log, "PCK CRL")
    ext_key = b"pck-extension" + cert_info(pck).digest
    hit = log.recall(ext_key)
    if hit is not None and isinstance(hit[0], PckExtension):
        ext = hit[0]
    else:
        try:
            ext = PckExtension.from_certificate(pck)
        except FormatError as e:
            raise log.fail(AttestationError("PCK certificate", e.message)) from e
        log.keep(ext_key, ext)
    qe = cert.qe_report  # 5
    if not _ecdsa_ok(_signing_key(pck), cert.qe_report_signature, qe.raw):
        raise log.fail(
            AttestationError("QE report signature", "QE report is not signed by the PCK key")
        )
    log.ok("QE report signature", "QE report signed by the PCK key")
    expected = hashlib.sha256(quote.attestation_key + cert.qe_auth_data).digest() + bytes(32)  # 6
    if qe.report_data != expected:
        raise log.fail(
            AttestationError(
                "attestation key binding",
                "QE report data does not bind the attestation key",
                expected=expected.hex(),
                found=qe.report_data.hex(),
            )
        )
    log.ok("attestation key binding", "QE report data = SHA-256(attestation key || auth data)")
    try:  # 7
        att_key = _p256(quote.attestation_key)
    except ValueError:
        raise log.fail(
            AttestationError("quote signature", "attestation key is not a P-256 point")
        ) from None
    if not _ecdsa_ok(att_key, quote.signature, quote.signed_bytes):
        raise log.fail(
            AttestationError("quote signature", "quote body is not signed by the attestation key")
        )
    log.ok("quote signature", "header and report body signed by the attestation key")
    tcb, tcb_root = _tcb_info(quote, ext, collateral, root, now, trust, log)  # 8
    identity, qe_root, qe_number = _qe_identity(quote, collateral, root, now, trust, log)  # 9
    status, advisories = _tcb_status(quote, ext, tcb, identity, log)  # 10
    kind = weakest(root_kind, tcb_root, qe_root)
    number = min(tcb.evaluation_data_number, qe_number)
    return _claims(quote, ext, status, advisories, kind, number, now, log)


def verify_pck_chain(
    raw: bytes, *, now: datetime, trust: TrustAnchors, cache: VerificationCache | None = None
) -> RootKind:
    """Steps 1-3 of :func:`verify_quote` alone: the quote parses, comes from Intel's QE and
    carries a PCK chain that ends at a trusted root, valid at ``now``.

    What a collateral source must check before it looks anything up (or fetches it from a PCCS)
    by the quote's PCK certificate: a quote whose chain does not verify names an FMSPC nobody
    vouched for. Raises the failing check, like :func:`verify_quote`.
    """
    return _quote_and_pck_chain(raw, now, trust, CheckLog(cache=cache))[2]


def _quote_and_pck_chain(
    raw: bytes, now: datetime, trust: TrustAnchors, log: CheckLog
) -> tuple[Quote, list[x509.Certificate], RootKind]:
    try:  # 1
        quote = Quote.from_bytes(raw)
    except FormatError as e:
        raise log.fail(AttestationError("quote format", e.message)) from e
    log.ok(
        "quote format", f"DCAP quote v{quote.header.version}, {'TDX' if quote.is_tdx else 'SGX'}"
    )
    h = quote.header  # 2
    if h.att_key_type != ATT_KEY_ECDSA_P256:
        raise log.fail(
            AttestationError(
                "quote header",
                "unsupported attestation key type",
                expected="2 (ECDSA P-256)",
                found=str(h.att_key_type),
            )
        )
    if h.qe_vendor_id != INTEL_QE_VENDOR_ID:
        raise log.fail(
            AttestationError(
                "quote header",
                "quote not produced by Intel's QE",
                expected=INTEL_QE_VENDOR_ID.hex(),
                found=h.qe_vendor_id.hex(),
            )
        )
    cert = quote.certification  # 3
    if cert.cert_type != CERT_PCK_CHAIN:
        raise log.fail(
            CollateralError(
                "PCK certificate",
                f"certification data type {cert.cert_type} is not a PCK certificate chain",
                expected="type 5 (PCK chain in the quote)",
                found=f"type {cert.cert_type}",
                hint="configure the platform's quote provider to embed the PCK chain",
            )
        )
    # the certificates these exact bytes parse to (a fact of the bytes: shared through the cache)
    chain_key = b"pem-chain" + hashlib.sha256(cert.cert_data).digest()
    hit = log.recall(chain_key) if log.cache is not None else None
    if hit is not None and isinstance(hit[0], tuple):
        chain = list(hit[0])
    else:
        try:
            chain = load_pem_chain(cert.cert_data, "PCK chain")
        except AttestationError as e:
            raise log.fail(e) from None
        if log.cache is not None:
            log.keep(chain_key, tuple(chain))
    if len(chain) != 3:
        raise log.fail(
            AttestationError(
                "PCK certificate", f"PCK chain has {len(chain)} certificates, expected 3"
            )
        )
    root_kind = verify_chain(chain, Vendor.INTEL, trust, now, log, "PCK chain")
    return quote, chain, root_kind


#: The subject (CN) of the certificate Intel signs TCB info and QE identities with.
TCB_SIGNING_CN = "Intel SGX TCB Signing"


def _signed_json(
    name: str,
    chain: list[x509.Certificate],
    raw: bytes,
    sig: bytes,
    collateral: IntelCollateral,
    root: x509.Certificate,
    now: datetime,
    trust: TrustAnchors,
    log: CheckLog,
) -> RootKind:
    """Check ``name``'s signing chain and signature; return how its root is trusted.

    Intel's shape only: exactly TCB Signing <- root, the root the quote's PCK chain ends at (one
    piece of evidence has one root: collateral re-signed under another trusted root, such as a
    simulated platform's, must not vouch for a real quote), and the root CA CRL always checked.
    """
    what = f"{name} signing chain"
    if len(chain) != 2:
        raise log.fail(
            CollateralError(
                "certificate chain",
                f"{what} has {len(chain)} certificate(s), expected 2 certificates "
                f"('{TCB_SIGNING_CN}' <- root)",
            )
        )
    if cert_info(chain[0]).subject_cn != TCB_SIGNING_CN:
        raise log.fail(
            CollateralError(
                "certificate chain",
                f"{name} is signed by '{cn(chain[0].subject)}', not by '{TCB_SIGNING_CN}'",
                expected=TCB_SIGNING_CN,
                found=cn(chain[0].subject),
            )
        )
    if cert_info(chain[-1]).digest != cert_info(root).digest:  # same DER
        raise log.fail(
            CollateralError(
                "certificate chain",
                f"{what} ends at another root than the PCK chain",
                expected=f"'{cn(root.subject)}' (SHA-256 {fingerprint(root)})",
                found=f"'{cn(chain[-1].subject)}' (SHA-256 {fingerprint(chain[-1])})",
                hint="TCB info and QE identity must come from the same root as the quote",
            )
        )
    kind = verify_chain(chain, Vendor.INTEL, trust, now, log, what)
    check_crl(collateral.root_ca_crl, chain[-1], chain[:-1], now, log, "root CA CRL")
    signer = cert_info(chain[0])
    key = b"signed-json" + _json_digest(raw) + hashlib.sha256(sig).digest() + signer.digest
    hit = log.recall(key)
    if hit is None:
        if len(sig) != 64 or not _ecdsa_ok(_signing_key(chain[0]), sig, raw):
            raise log.fail(
                CollateralError(name, f"{name} signature does not verify over its exact JSON bytes")
            )
        log.keep(key, True)
    detail = f"{name} signed by '{signer.subject_cn}'"
    log.ok(name, detail + (" [cached]" if hit is not None and hit[1] else ""))
    return kind


def _json_digest(raw: bytes) -> bytes:
    return hashlib.sha256(raw).digest()


def _parsed(kind: str, raw: bytes, parse: Callable[[bytes], P], log: CheckLog) -> P:
    """``parse(raw)``, shared through the cache by the exact bytes (parsing is a fact of them;
    the validity dates it yields are compared with the verification time on every call)."""
    key = b"parsed-" + kind.encode() + b"\0" + _json_digest(raw)
    hit = log.recall(key) if log.cache is not None else None
    if hit is not None:
        return cast(P, hit[0])
    try:
        value = parse(raw)
    except AttestationError as e:
        raise log.fail(e) from None
    if log.cache is not None:
        log.keep(key, value)
    return value


def _fresh(name: str, issue: datetime, nxt: datetime, now: datetime, log: CheckLog) -> None:
    if not issue <= now <= nxt:
        raise log.fail(
            ExpiredError(
                name,
                f"{name} expired on {iso_utc(nxt)}"
                if now > nxt
                else f"{name} issued only on {iso_utc(issue)}",
                expected=f"current at {iso_utc(now)}",
                found=f"valid {iso_utc(issue)} .. {iso_utc(nxt)}",
                hint="fetch fresh collateral, or verify at a time inside its validity (--at)",
            )
        )


def _tcb_info(
    quote: Quote,
    ext: PckExtension,
    col: IntelCollateral,
    root: x509.Certificate,
    now: datetime,
    trust: TrustAnchors,
    log: CheckLog,
) -> tuple[TcbInfo, RootKind]:
    kind = _signed_json(
        "TCB info",
        col.tcb_info_issuer_chain,
        col.tcb_info,
        col.tcb_info_signature,
        col,
        root,
        now,
        trust,
        log,
    )
    info = _parsed("tcb-info", col.tcb_info, lambda _: col.parsed_tcb_info, log)
    want = "TDX" if quote.is_tdx else "SGX"
    if info.id != want or (quote.is_tdx and info.version < 3):
        raise log.fail(
            CollateralError(
                "TCB info",
                "TCB info is for another TEE",
                expected=f"{want} (version 3)",
                found=f"{info.id} (version {info.version})",
            )
        )
    _fresh("TCB info", info.issue_date, info.next_update, now, log)
    if info.fmspc != ext.fmspc or info.pce_id != ext.pce_id:
        raise log.fail(
            CollateralError(
                "TCB info",
                "TCB info is for another platform",
                expected=f"FMSPC {ext.fmspc.hex()} PCE-ID {ext.pce_id.hex()}",
                found=f"FMSPC {info.fmspc.hex()} PCE-ID {info.pce_id.hex()}",
            )
        )
    log.ok(
        "TCB info",
        f"{info.id} TCB info for FMSPC {info.fmspc.hex()}, evaluation #{info.evaluation_data_number}",
    )
    return info, kind


def _masked_equal(a: bytes, b: bytes, mask: bytes) -> bool:
    return len(a) == len(b) == len(mask) and all(
        (x & m) == (y & m) for x, y, m in zip(a, b, mask, strict=True)
    )


def _qe_identity(
    quote: Quote,
    col: IntelCollateral,
    root: x509.Certificate,
    now: datetime,
    trust: TrustAnchors,
    log: CheckLog,
) -> tuple[tuple[S, tuple[str, ...], int], RootKind, int]:
    """The QE's TCB result (status, advisories, ISVSVN), the root kind and the identity's
    tcbEvaluationDataNumber."""
    kind = _signed_json(
        "QE identity",
        col.qe_identity_issuer_chain,
        col.qe_identity,
        col.qe_identity_signature,
        col,
        root,
        now,
        trust,
        log,
    )
    ident = _parsed("qe-identity", col.qe_identity, lambda _: col.parsed_qe_identity, log)
    want = "TD_QE" if quote.is_tdx else "QE"
    if ident.id != want or ident.version != 2:
        raise log.fail(
            CollateralError(
                "QE identity",
                "QE identity is for another enclave",
                expected=f"{want} version 2",
                found=f"{ident.id} version {ident.version}",
            )
        )
    _fresh("QE identity", ident.issue_date, ident.next_update, now, log)
    qe = quote.certification.qe_report
    mismatches = []
    if qe.mr_signer != ident.mrsigner:
        mismatches.append(f"MRSIGNER {qe.mr_signer.hex()} != {ident.mrsigner.hex()}")
    if qe.isv_prod_id != ident.isvprodid:
        mismatches.append(f"ISVPRODID {qe.isv_prod_id} != {ident.isvprodid}")
    if (qe.misc_select & ident.miscselect_mask) != (ident.miscselect & ident.miscselect_mask):
        mismatches.append("MISCSELECT differs under the mask")
    if not _masked_equal(qe.attributes, ident.attributes, ident.attributes_mask):
        mismatches.append("ATTRIBUTES differ under the mask")
    if mismatches:
        raise log.fail(
            AttestationError(
                "QE identity", "the quoting enclave is not Intel's", found="; ".join(mismatches)
            )
        )
    for isvsvn, status, adv in ident.levels:
        if isvsvn <= qe.isv_svn:
            log.ok(
                "QE identity",
                f"{want} ISVSVN {qe.isv_svn}: {status}, evaluation #{ident.evaluation_data_number}",
            )
            return (_status(status, log), adv, isvsvn), kind, ident.evaluation_data_number
    log.ok("QE identity", f"{want} ISVSVN {qe.isv_svn} below every level: Revoked")
    return (S.REVOKED, (), -1), kind, ident.evaluation_data_number


def _status(value: str, log: CheckLog) -> S:
    try:
        return S(value)
    except ValueError:
        raise log.fail(CollateralError("TCB info", f"unknown TCB status {value!r}")) from None


def _tdx_components_ok(level: TcbLevel, svn: bytes) -> bool:
    if level.tdx_components is None:
        return False
    skip = (0, 1) if svn[1] > 0 else ()  # Intel QVL isTdxTcbHigherOrEqual
    return all(i in skip or level.tdx_components[i] <= svn[i] for i in range(16))


def _tcb_status(
    quote: Quote,
    ext: PckExtension,
    info: TcbInfo,
    qe_result: tuple[S, tuple[str, ...], int],
    log: CheckLog,
) -> tuple[S, tuple[str, ...]]:
    body = quote.body
    tdx_svn = body.tee_tcb_svn if isinstance(body, TdReportBody) else None
    level = next(
        (
            lv
            for lv in info.levels
            if all(a <= b for a, b in zip(lv.sgx_components, ext.cpu_svn_components, strict=True))
            and lv.pcesvn <= ext.pcesvn
            and (tdx_svn is None or _tdx_components_ok(lv, tdx_svn))
        ),
        None,
    )
    if level is None:
        newest = info.levels[0] if info.levels else None
        lags = _behind(newest, ext, tdx_svn) if newest else []
        raise log.fail(
            TcbError(
                "TCB level",
                "no TCB level matches the platform (TCB not supported): evidence is not trusted",
                expected="a TCB level with every component <= the platform's",
                found=_text(lags) if newest else "no TCB levels",
                hint="the platform's TCB is older than any level Intel still evaluates: "
                + _update_hint(lags),
            )
        )
    status = _status(level.status, log)
    advisories = list(level.advisory_ids)
    detail = f"platform TCB level {level.date}: {status}"
    if isinstance(body, TdReportBody):
        status = _tdx_module(body, info, status, advisories, log)
    qe_status, qe_adv, _ = qe_result
    if qe_status is S.REVOKED:
        status = S.REVOKED
    elif qe_status is S.OUT_OF_DATE:
        status = _OUT_OF_DATE_FROM.get(status, status)
    advisories += [a for a in qe_adv if a not in advisories]
    if status is S.REVOKED:
        raise log.fail(
            TcbError(
                "TCB level",
                "the platform's TCB is Revoked",
                found=detail,
                hint="the platform cannot be trusted until Intel re-certifies it",
            )
        )
    hint = _HINTS.get(status)
    extra = f"; {hint}" if hint else ""
    if status is not S.UP_TO_DATE and info.levels:
        lags = _behind(info.levels[0], ext, tdx_svn)
        extra += f"; behind the newest level: {_text(lags)}"
        if status in (S.OUT_OF_DATE, S.OUT_OF_DATE_CONFIGURATION_NEEDED):
            extra += f"; {_update_hint(lags)}"
    log.ok(
        "TCB level",
        f"{detail} -> {status}"
        + (f", advisories {', '.join(advisories)}" if advisories else "")
        + extra,
    )
    return status, tuple(dict.fromkeys(advisories))


#: The update a component behind the newest TCB level calls for, by its kind, in the order the
#: advice names them. A component's kinds: the category Intel's TCB info gives it ("BIOS",
#: "OS/VMM"); the PCE's SVN is the OS/VMM's to update; every TDX component is also the TDX module's.
_UPDATE_FOR = {
    "BIOS": "a BIOS (firmware/microcode) update",
    "OS/VMM": "an OS/VMM update (late microcode, SEAMLDR, PCE)",
    "TDX": "a TDX module update",
}


@dataclass(frozen=True)
class _Lag:
    """One component of the platform's TCB below the newest level, and what kind of thing it is."""

    text: str
    kinds: frozenset[str]


def _update_hint(lags: list[_Lag]) -> str:
    """The kinds of update the components in ``lags`` call for (a platform update if unknown)."""
    kinds = [hint for kind, hint in _UPDATE_FOR.items() if any(kind in lag.kinds for lag in lags)]
    return " and ".join(kinds or ["a platform update"]) + " is needed"


def _text(lags: list[_Lag]) -> str:
    return "; ".join(lag.text for lag in lags) or "no component behind"


def _behind(newest: TcbLevel, ext: PckExtension, tdx_svn: bytes | None) -> list[_Lag]:
    names = newest.sgx_names or tuple(f"component {i + 1}" for i in range(16))
    tdx_names = newest.tdx_names or tuple(f"TEE_TCB_SVN[{i}]" for i in range(16))

    def kinds(categories: tuple[str, ...], i: int, *extra: str) -> frozenset[str]:
        return frozenset((categories[i] if i < len(categories) else "", *extra)) - {""}

    lags = [
        _Lag(f"SGX {names[i]} (#{i + 1}): {have} < {want}", kinds(newest.sgx_categories, i))
        for i, (want, have) in enumerate(
            zip(newest.sgx_components, ext.cpu_svn_components, strict=True)
        )
        if have < want
    ]
    if ext.pcesvn < newest.pcesvn:
        lags.append(_Lag(f"PCESVN {ext.pcesvn} < {newest.pcesvn}", frozenset({"OS/VMM"})))
    if tdx_svn is not None and newest.tdx_components is not None:
        lags += [
            _Lag(
                f"TDX {tdx_names[i]} (TEE_TCB_SVN[{i}]): {tdx_svn[i]} < {newest.tdx_components[i]}",
                kinds(newest.tdx_categories, i, "TDX"),
            )
            for i in range(16)
            if tdx_svn[i] < newest.tdx_components[i] and not (tdx_svn[1] > 0 and i < 2)
        ]
    return lags


def _tdx_module(
    body: TdReportBody, info: TcbInfo, status: S, advisories: list[str], log: CheckLog
) -> S:
    svn = body.tee_tcb_svn
    if svn[1] == 0:
        mod = info.tdx_module
        if mod is not None and (
            body.mr_signer_seam != mod.mrsigner
            or not _masked_equal(body.seam_attributes, mod.attributes, mod.attributes_mask)
        ):
            raise log.fail(
                AttestationError(
                    "TDX module",
                    "TDX module is not Intel's",
                    expected=mod.mrsigner.hex(),
                    found=body.mr_signer_seam.hex(),
                )
            )
        log.ok("TDX module", "TDX module 1.0 signer matches")
        return status
    ident_id = f"TDX_{svn[1]:02X}"
    ident = next((m for m in info.tdx_module_identities if m.id == ident_id), None)
    if ident is None:
        raise log.fail(
            TcbError(
                "TDX module",
                f"no TDX module identity {ident_id} in the TCB info",
                hint="the TDX module version is not supported by this collateral",
            )
        )
    if body.mr_signer_seam != ident.mrsigner or not _masked_equal(
        body.seam_attributes, ident.attributes, ident.attributes_mask
    ):
        raise log.fail(
            AttestationError(
                "TDX module",
                f"TDX module does not match identity {ident_id}",
                expected=ident.mrsigner.hex(),
                found=body.mr_signer_seam.hex(),
            )
        )
    level = next(((s, st, adv) for s, st, adv in ident.levels if s <= svn[0]), None)
    if level is None:
        raise log.fail(
            TcbError(
                "TDX module",
                f"TDX module {ident_id} SVN {svn[0]} is Revoked",
                hint="update the TDX module",
            )
        )
    mod_status = _status(level[1], log)
    advisories += [a for a in level[2] if a not in advisories]
    if mod_status is S.OUT_OF_DATE:
        status = _OUT_OF_DATE_FROM.get(status, status)
    elif mod_status is S.REVOKED:
        status = S.REVOKED
    log.ok(
        "TDX module",
        f"{ident_id} SVN {svn[0]}: {mod_status}"
        + ("; a TDX module update is needed" if mod_status is S.OUT_OF_DATE else ""),
    )
    return status


def _claims(
    quote: Quote,
    ext: PckExtension,
    status: S,
    advisories: tuple[str, ...],
    root: RootKind,
    evaluation_data_number: int,
    now: datetime,
    log: CheckLog,
) -> Claims:
    body = quote.body
    platform = {
        "fmspc": ext.fmspc.hex(),
        "pce_id": ext.pce_id.hex(),
        "cpusvn": ext.cpusvn.hex(),
        "pcesvn": str(ext.pcesvn),
    }
    if isinstance(body, SgxReportBody):
        m: SgxMeasurements | TdxMeasurements = SgxMeasurements(
            mrenclave=body.mr_enclave,
            mrsigner=body.mr_signer,
            isv_prod_id=body.isv_prod_id,
            isv_svn=body.isv_svn,
            attributes=body.attributes,
            misc_select=body.misc_select,
            config_id=body.config_id,
            config_svn=body.config_svn,
            isv_ext_prod_id=body.isv_ext_prod_id,
            isv_family_id=body.isv_family_id,
        )
        tee = TeeKind.SGX
    else:
        r = body.rtmrs
        m = TdxMeasurements(
            mrtd=body.mr_td,
            rtmr0=r[0],
            rtmr1=r[1],
            rtmr2=r[2],
            rtmr3=r[3],
            mr_config_id=body.mr_config_id,
            mr_owner=body.mr_owner,
            mr_owner_config=body.mr_owner_config,
            td_attributes=body.td_attributes,
            xfam=body.xfam,
            sept_ve_disable=body.sept_ve_disable,
            mr_seam=body.mr_seam,
            mr_signer_seam=body.mr_signer_seam,
            seam_attributes=body.seam_attributes,
            tee_tcb_svn=body.tee_tcb_svn,
            tee_tcb_svn2=body.tee_tcb_svn2,
            mr_service_td=body.mr_service_td,
        )
        tee = TeeKind.TDX
    return Claims(
        tee=tee,
        tcb_status=status,
        advisory_ids=advisories,
        debug=body.debug,
        report_data=body.report_data,
        measurements=m,
        platform=platform,
        root=root,
        verified_at=now,
        checks=tuple(log.checks),
        tcb_evaluation_data_number=evaluation_data_number,
    )
