"""OCSP responses as collateral: revocation of a certificate, checked offline at an explicit time.

A response (RFC 6960, DER) is used for a certificate only when its single response names that
certificate (serial, issuer name hash and issuer key hash), it is signed by the issuer itself or
by a responder certificate the issuer signed directly for OCSP signing (``id-kp-OCSPSigning``),
and its ``thisUpdate`` is no later than the verification time (a response's age is counted
from ``thisUpdate``: when the responder last knew the status to be right). ``revoked`` (any reason, also
``certificateHold``) and ``unknown`` fail verification. A response whose ``nextUpdate`` has
passed is a *cached* one: verification records it with its age, and the policy decides
whether to accept it (``ocsp_allow_cached``, ``ocsp_max_age``). Verification never fetches.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509 import ocsp
from cryptography.x509.oid import ExtendedKeyUsageOID

from shieldml.attest._checks import CheckLog
from shieldml.attest._claims import iso_utc
from shieldml.attest._x509 import cn
from shieldml.errors import AttestationError, CollateralError, RevokedError

MAX_OCSP = 16 * 1024
MAX_RESPONSES = 32


@dataclass(frozen=True)
class OcspStatus:
    """The revocation status of one certificate, as a verified OCSP response states it."""

    subject: str
    serial: int
    status: str  # "good", or "not checked" when no response was given
    this_update: datetime | None = None
    next_update: datetime | None = None
    age_s: int | None = None  # verification time - thisUpdate
    cached: bool = False  # nextUpdate has passed: the policy decides

    def to_dict(self) -> dict[str, object]:
        out: dict[str, object] = {
            "subject": self.subject,
            "serial": f"{self.serial:x}",
            "status": self.status,
        }
        if self.this_update is not None:
            out["this_update"] = iso_utc(self.this_update)
            out["next_update"] = iso_utc(self.next_update) if self.next_update else None
            out["age_s"] = self.age_s
            out["cached"] = self.cached
        return out


def load_responses(blobs: list[bytes]) -> list[ocsp.OCSPResponse]:
    """DER OCSP responses; :class:`CollateralError` for anything else."""
    if len(blobs) > MAX_RESPONSES:
        raise CollateralError("OCSP", f"more than {MAX_RESPONSES} OCSP responses")
    out = []
    for i, blob in enumerate(blobs):
        if len(blob) > MAX_OCSP:
            raise CollateralError("OCSP", f"OCSP response {i} is too large ({len(blob)} bytes)")
        try:
            resp = ocsp.load_der_ocsp_response(blob)
            if resp.response_status is ocsp.OCSPResponseStatus.SUCCESSFUL:
                _ = (resp.produced_at_utc, resp.tbs_response_bytes, resp.certificates)
                _ = [
                    (r.serial_number, r.issuer_key_hash, r.issuer_name_hash) for r in resp.responses
                ]
        except (ValueError, TypeError, UnsupportedAlgorithm) as e:
            raise CollateralError("OCSP", f"OCSP response {i} is not a DER OCSP response") from e
        out.append(resp)
    return out


def _cert_id(
    cert: x509.Certificate, issuer: x509.Certificate, alg: hashes.HashAlgorithm
) -> tuple[bytes, bytes]:
    req = ocsp.OCSPRequestBuilder().add_certificate(cert, issuer, alg).build()
    return req.issuer_name_hash, req.issuer_key_hash


def _single(
    resp: ocsp.OCSPResponse, cert: x509.Certificate, issuer: x509.Certificate
) -> ocsp.OCSPSingleResponse | None:
    for single in resp.responses:
        if single.serial_number != cert.serial_number:
            continue
        alg = single.hash_algorithm
        if not isinstance(alg, hashes.SHA1 | hashes.SHA256 | hashes.SHA384 | hashes.SHA512):
            continue
        if (single.issuer_name_hash, single.issuer_key_hash) == _cert_id(cert, issuer, alg):
            return single
    return None


def _key_hash(cert: x509.Certificate) -> bytes:
    return _cert_id(cert, cert, hashes.SHA1())[1]  # noqa: S303 - RFC 6960 ResponderID byKey is SHA-1


def _responder_key(
    resp: ocsp.OCSPResponse, issuer: x509.Certificate, now: datetime
) -> ec.EllipticCurvePublicKey | rsa.RSAPublicKey | None:
    def names(c: x509.Certificate) -> bool:
        if resp.responder_name is not None:
            return resp.responder_name == c.subject
        return resp.responder_key_hash == _key_hash(c)

    candidate: x509.Certificate | None = issuer if names(issuer) else None
    if candidate is None:
        for c in resp.certificates:
            if not names(c):
                continue
            try:
                c.verify_directly_issued_by(issuer)
                eku = c.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
            except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
                continue
            except x509.ExtensionNotFound:
                continue
            if ExtendedKeyUsageOID.OCSP_SIGNING not in eku:
                continue
            if not c.not_valid_before_utc <= now <= c.not_valid_after_utc:
                continue
            candidate = c
            break
    if candidate is None:
        return None
    key = candidate.public_key()
    return key if isinstance(key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey) else None


def _signature_ok(
    resp: ocsp.OCSPResponse, key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey
) -> bool:
    alg = resp.signature_hash_algorithm
    if alg is None:
        return False
    try:
        if isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(resp.signature, resp.tbs_response_bytes, ec.ECDSA(alg))
        else:
            key.verify(resp.signature, resp.tbs_response_bytes, padding.PKCS1v15(), alg)
    except (InvalidSignature, ValueError, TypeError, UnsupportedAlgorithm):
        return False
    return True


def check_ocsp(
    cert: x509.Certificate,
    issuer: x509.Certificate,
    responses: list[ocsp.OCSPResponse],
    now: datetime,
    log: CheckLog,
    what: str,
) -> OcspStatus:
    """The status of ``cert`` (issued by ``issuer``) from ``responses``; raise on revoked,
    unknown, or a response for it that does not verify."""
    name = cn(cert.subject)
    found = [
        (r, s)
        for r in responses
        if r.response_status is ocsp.OCSPResponseStatus.SUCCESSFUL
        for s in [_single(r, cert, issuer)]
        if s is not None
    ]
    if not found:
        log.ok("OCSP", f"{what}: '{name}' revocation not checked (no OCSP response given)")
        return OcspStatus(name, cert.serial_number, "not checked")
    # the newest response that verifies decides
    found.sort(key=lambda rs: rs[1].this_update_utc, reverse=True)
    for resp, single in found:
        key = _responder_key(resp, issuer, now)
        if key is None or not _signature_ok(resp, key):
            continue
        produced = single.this_update_utc  # the status was known correct then
        if produced > now:
            raise log.fail(
                AttestationError(
                    "OCSP",
                    f"{what}: OCSP response for '{name}' is dated after the verification time",
                    expected=f"thisUpdate by {iso_utc(now)}",
                    found=f"thisUpdate {iso_utc(produced)}",
                    hint="verify at a time after the response (--at), or fetch it again",
                )
            )
        status = single.certificate_status
        if status is ocsp.OCSPCertStatus.REVOKED:
            reason = single.revocation_reason
            raise log.fail(
                RevokedError(
                    "OCSP",
                    f"{what}: '{name}' (serial {cert.serial_number:x}) is revoked"
                    + (f" ({reason.value})" if reason is not None else ""),
                    found=f"revoked {iso_utc(single.revocation_time_utc)}"
                    if single.revocation_time_utc
                    else "revoked",
                    hint="NVIDIA revoked this certificate: the device or firmware is not trusted",
                )
            )
        if status is not ocsp.OCSPCertStatus.GOOD:
            raise log.fail(
                AttestationError(
                    "OCSP",
                    f"{what}: OCSP responder does not know '{name}'",
                    found="unknown",
                    hint="the certificate was not issued by the CA the responder speaks for",
                )
            )
        nxt = single.next_update_utc
        cached = nxt is not None and now > nxt
        age = int((now - produced).total_seconds())
        state = f"cached: nextUpdate {iso_utc(nxt)} has passed" if cached and nxt else "current"
        log.ok(
            "OCSP", f"{what}: '{name}' good (thisUpdate {iso_utc(produced)}, age {age} s, {state})"
        )
        return OcspStatus(name, cert.serial_number, "good", produced, nxt, age, cached)
    raise log.fail(
        AttestationError(
            "OCSP",
            f"{what}: the OCSP response for '{name}' is not signed by its issuer "
            f"'{cn(issuer.subject)}' or a responder it authorised",
            hint="OCSP responses must come from the CA's responder",
        )
    )
