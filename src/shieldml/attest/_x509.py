"""Certificate chains and CRLs, checked at an explicit time against the trust anchors."""

from __future__ import annotations

import itertools
from datetime import datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa

from shieldml.attest._checks import CheckLog
from shieldml.attest._claims import iso_utc
from shieldml.attest._trust import RootKind, TrustAnchors, Vendor
from shieldml.errors import AttestationError, ExpiredError, RevokedError

MAX_CHAIN = 5
# keys that can sign a CRL (an X25519 or ML-KEM key in a certificate signs nothing)
_CRL_SIGNERS = (
    ec.EllipticCurvePublicKey,
    rsa.RSAPublicKey,
    dsa.DSAPublicKey,
    ed25519.Ed25519PublicKey,
    ed448.Ed448PublicKey,
)


def cn(name: x509.Name) -> str:
    attrs = name.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    return str(attrs[0].value) if attrs else name.rfc4514_string()


def check_validity(cert: x509.Certificate, now: datetime, log: CheckLog, what: str) -> None:
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    if not start <= now <= end:
        state = "expired on" if now > end else "not valid before"
        raise log.fail(
            ExpiredError(
                "certificate validity",
                f"{what} certificate '{cn(cert.subject)}' {state} "
                f"{iso_utc(end if now > end else start)}",
                expected=f"valid at {iso_utc(now)}",
                found=f"valid {iso_utc(start)} .. {iso_utc(end)}",
                hint="fetch fresh collateral, or verify at a time inside its validity (--at)",
            )
        )


def check_signed_by(
    cert: x509.Certificate, issuer: x509.Certificate, log: CheckLog, what: str
) -> None:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm) as e:
        raise log.fail(
            AttestationError(
                "certificate chain",
                f"{what}: '{cn(cert.subject)}' is not validly signed by '{cn(issuer.subject)}'",
                found=str(e) or type(e).__name__,
            )
        ) from None


def verify_chain(
    chain: list[x509.Certificate],
    vendor: Vendor,
    trust: TrustAnchors,
    now: datetime,
    log: CheckLog,
    what: str,
) -> RootKind:
    """Leaf-first chain: every link signed by the next, the last self-signed and trusted."""
    if not 1 <= len(chain) <= MAX_CHAIN:
        raise log.fail(
            AttestationError("certificate chain", f"{what}: bad chain length {len(chain)}")
        )
    key = None
    if log.cache is not None:
        key = log.cache.key(
            "chain", vendor.value, trust.key(), what, *(cert_bytes(c) for c in chain)
        )
        hit = log.cache.get(key, now)
        if hit is not None and isinstance(hit[1], RootKind):
            log.ok("certificate chain", hit[0] + " [cached]")
            return hit[1]
    root = chain[-1]
    try:
        kind = trust.classify(root, vendor, what)
    except AttestationError as e:
        raise log.fail(e) from None
    check_signed_by(root, root, log, what)
    for cert, issuer in itertools.pairwise(chain):
        check_signed_by(cert, issuer, log, what)
    for cert in chain:
        check_validity(cert, now, log, what)
    detail = f"{what}: {' <- '.join(cn(c.subject) for c in chain)} ({kind} root)"
    log.ok("certificate chain", detail)
    if log.cache is not None and key is not None:
        start = max(c.not_valid_before_utc for c in chain)
        end = min(c.not_valid_after_utc for c in chain)
        log.cache.put(key, start, end, detail, kind)
    return kind


def cert_bytes(cert: x509.Certificate) -> bytes:
    return cert.tbs_certificate_bytes + cert.signature


def check_crl(
    crl: x509.CertificateRevocationList,
    issuer: x509.Certificate,
    subjects: list[x509.Certificate],
    now: datetime,
    log: CheckLog,
    what: str,
) -> None:
    """The CRL is signed by ``issuer``, current at ``now``, and lists none of ``subjects``."""
    key = None
    if log.cache is not None:
        serials = ",".join(str(c.serial_number) for c in subjects)
        key = log.cache.key(
            "crl", what, crl.tbs_certlist_bytes, crl.signature, cert_bytes(issuer), serials
        )
        hit = log.cache.get(key, now)
        if hit is not None:
            log.ok("revocation list", hit[0] + " [cached]")
            return
    issuer_key = issuer.public_key()
    if (
        crl.issuer != issuer.subject
        or not isinstance(issuer_key, _CRL_SIGNERS)
        or not crl.is_signature_valid(issuer_key)
    ):
        raise log.fail(
            AttestationError(
                "revocation list",
                f"{what} is not signed by '{cn(issuer.subject)}'",
                found=f"issuer '{cn(crl.issuer)}'",
            )
        )
    nxt = crl.next_update_utc
    if not crl.last_update_utc <= now or (nxt is not None and now > nxt):
        raise log.fail(
            ExpiredError(
                "revocation list",
                f"{what} from '{cn(crl.issuer)}' expired on {iso_utc(nxt) if nxt else '?'}",
                expected=f"current at {iso_utc(now)}",
                found=f"valid {iso_utc(crl.last_update_utc)} .. {iso_utc(nxt) if nxt else '?'}",
                hint="fetch fresh collateral, or verify at a time inside its validity (--at)",
            )
        )
    for cert in subjects:
        if crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None:
            raise log.fail(
                RevokedError(
                    "revocation list",
                    f"certificate '{cn(cert.subject)}' (serial {cert.serial_number:x}) is revoked",
                    hint="the platform's keys were revoked by the vendor",
                )
            )
    detail = f"{what} from '{cn(crl.issuer)}': not revoked"
    log.ok("revocation list", detail)
    if log.cache is not None and key is not None and nxt is not None:
        log.cache.put(key, crl.last_update_utc, nxt, detail, None)
