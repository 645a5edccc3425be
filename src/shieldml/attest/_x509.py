"""Certificate chains and CRLs, checked at an explicit time against the trust anchors."""

from __future__ import annotations

import contextlib
import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import TypeVar, cast

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import Encoding

from shieldml.attest._checks import CheckLog
from shieldml.attest._claims import iso_utc
from shieldml.attest._trust import RootKind, TrustAnchors, Vendor
from shieldml.errors import AttestationError, ExpiredError, RevokedError

T = TypeVar("T")
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


@dataclass(frozen=True)
class CertInfo:
    """What verification reads from one certificate, derived once per certificate object."""

    digest: bytes  # SHA-256 of the certificate's exact DER
    fingerprint: str  # the same, in hex
    subject_cn: str
    not_before: datetime
    not_after: datetime


# Derived facts of immutable certificate / CRL objects, by object identity. Each entry holds the
# object itself, so its id cannot be reused by another object while the entry exists.
_INFO_MAX = 128
_infos: OrderedDict[int, tuple[object, object]] = OrderedDict()
_infos_lock = threading.Lock()


def _memo(obj: object, make: Callable[[], T]) -> T:
    hit = _infos.get(id(obj))  # one dict lookup: atomic under the GIL
    if hit is not None and hit[0] is obj:
        with contextlib.suppress(KeyError):  # evicted meanwhile by another thread: harmless
            _infos.move_to_end(id(obj))  # LRU: long-lived collateral stays, one-off chains go
        return cast(T, hit[1])
    value = make()
    with _infos_lock:
        _infos[id(obj)] = (obj, value)
        while len(_infos) > _INFO_MAX:
            _infos.popitem(last=False)
    return value


def cert_info(cert: x509.Certificate) -> CertInfo:
    def make() -> CertInfo:
        digest = hashlib.sha256(cert.public_bytes(Encoding.DER)).digest()
        return CertInfo(
            digest,
            digest.hex(),
            cn(cert.subject),
            cert.not_valid_before_utc,
            cert.not_valid_after_utc,
        )

    return _memo(cert, make)


def crl_digest(crl: x509.CertificateRevocationList) -> bytes:
    """SHA-256 of the CRL's exact DER."""
    return _memo(crl, lambda: hashlib.sha256(crl.public_bytes(Encoding.DER)).digest())


# Vendor roots (RootKind.VENDOR: their SHA-256 is one the anchors pin, in code by default) whose
# self-signature verified, by that SHA-256: a pinned root has one set of bytes, so its
# self-signature is a fact checked once per process. Only what some anchors pin as a vendor root
# can enter; bounded all the same.
_vendor_roots_self_signed: set[bytes] = set()
_VENDOR_ROOTS_MAX = 64


def _classify(
    trust: TrustAnchors, root: x509.Certificate, fp: str, vendor: Vendor, what: str
) -> RootKind:
    if fp in trust.vendor.get(vendor, frozenset()):
        return RootKind.VENDOR
    if fp in trust.simulated:
        return RootKind.SIMULATED
    return trust.classify(root, vendor, what)  # custom (logged on every use) or refused


def _signed_by(
    cert: x509.Certificate,
    issuer: x509.Certificate,
    infos: tuple[CertInfo, CertInfo],
    log: CheckLog,
    what: str,
) -> bool:
    """``cert``'s signature verifies under ``issuer``'s key (a fact of the two exact DERs);
    True when the answer came from the shared cache."""
    key = b"signed-by" + infos[0].digest + infos[1].digest
    hit = log.recall(key)
    if hit is not None:
        return hit[1]
    check_signed_by(cert, issuer, log, what)
    log.keep(key, True)
    return False


def verify_chain(
    chain: list[x509.Certificate],
    vendor: Vendor,
    trust: TrustAnchors,
    now: datetime,
    log: CheckLog,
    what: str,
) -> RootKind:
    """Leaf-first chain: every link signed by the next, the last self-signed and trusted, every
    certificate valid at ``now``.

    Signatures are facts of the exact DER bytes (reused from ``log``'s cache or from earlier in
    the same verification); the root's trust and every validity window are checked on each call.
    """
    if not 1 <= len(chain) <= MAX_CHAIN:
        raise log.fail(
            AttestationError("certificate chain", f"{what}: bad chain length {len(chain)}")
        )
    infos = [cert_info(c) for c in chain]
    root = chain[-1]
    try:
        kind = _classify(trust, root, infos[-1].fingerprint, vendor, what)
    except AttestationError as e:
        raise log.fail(e) from None
    if kind is RootKind.VENDOR and infos[-1].digest in _vendor_roots_self_signed:
        cached = True  # a pinned root: these exact bytes were checked in this process
    else:
        cached = _signed_by(root, root, (infos[-1], infos[-1]), log, what)
        if kind is RootKind.VENDOR and len(_vendor_roots_self_signed) < _VENDOR_ROOTS_MAX:
            _vendor_roots_self_signed.add(infos[-1].digest)
    for i in range(len(chain) - 1):
        cached = _signed_by(chain[i], chain[i + 1], (infos[i], infos[i + 1]), log, what) and cached
    for cert, info in zip(chain, infos, strict=True):
        if not info.not_before <= now <= info.not_after:
            check_validity(cert, now, log, what)  # raises with the message
    detail = f"{what}: {' <- '.join(i.subject_cn for i in infos)} ({kind} root)"
    log.ok("certificate chain", detail + (" [cached]" if cached else ""))
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
    """The CRL is signed by ``issuer``, current at ``now``, and lists none of ``subjects``.

    That the CRL is ``issuer``'s and its signature verifies is a fact of the two exact DERs
    (reused from ``log``'s cache); its window and the serials are checked on every call.
    """
    issuer_info = cert_info(issuer)
    key = b"crl-signed-by" + crl_digest(crl) + issuer_info.digest
    hit = log.recall(key)
    if hit is None:
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
        log.keep(key, True)
    nxt = crl.next_update_utc
    last = crl.last_update_utc
    if not last <= now or (nxt is not None and now > nxt):
        raise log.fail(
            ExpiredError(
                "revocation list",
                f"{what} from '{cn(crl.issuer)}' expired on {iso_utc(nxt) if nxt else '?'}",
                expected=f"current at {iso_utc(now)}",
                found=f"valid {iso_utc(last)} .. {iso_utc(nxt) if nxt else '?'}",
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
    detail = f"{what} from '{issuer_info.subject_cn}': not revoked"
    log.ok("revocation list", detail + (" [cached]" if hit is not None and hit[1] else ""))
