"""RA-TLS certificates: extract the TEE quote and check that it binds the certificate's key.

Gramine's legacy extension (OID as encoded on the wire: ``0.6.9.42.840.113741.1337.6``; the
intended ``1.2.840.113741.1337.6`` is accepted too) carries a raw quote whose REPORTDATA starts
with SHA-256 of the certificate's SubjectPublicKeyInfo. The TCG DICE tagged-evidence extension
``2.23.133.5.4.9`` carries CBOR ``60000([quote, claims])`` where REPORTDATA starts with SHA-256 of
the claims, and the claims' ``pubkey-hash`` is the hash of the SubjectPublicKeyInfo. As in Gramine
1.8+, TCG evidence is used when present (and must then verify); otherwise the legacy one.
Spec: ``shared/docs/specs/gramine-formats.md`` §4.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass

import cbor2

from shieldml.attest import _der
from shieldml.attest._intel_quote import Quote
from shieldml.errors import AttestationError, FormatError

LEGACY_OIDS = ("0.6.9.42.840.113741.1337.6", "1.2.840.113741.1337.6")
TCG_OID = "2.23.133.5.4.9"
CBOR_TAG_INTEL_QUOTE = 60000
MAX_CERT = 64 * 1024
_HASHES = {1: "sha256", 7: "sha384", 8: "sha512"}  # IANA named-information hash ids


@dataclass(frozen=True)
class RaTlsEvidence:
    """A quote taken from an RA-TLS certificate, with its key binding already checked."""

    spki: bytes  # DER SubjectPublicKeyInfo of the certificate's key
    quote: bytes
    extension: str  # "tcg" or "legacy"
    binding: str  # human description of what was compared


def _der_certificate(data: bytes) -> bytes:
    if len(data) > MAX_CERT:
        raise FormatError("certificate too large")
    if data.lstrip().startswith(b"-----BEGIN"):
        try:
            text = data.decode("ascii")
            body = text.split("-----BEGIN CERTIFICATE-----", 1)[1].split("-----END", 1)[0]
            return base64.b64decode("".join(body.split()), validate=True)
        except (UnicodeDecodeError, IndexError, ValueError) as e:
            raise FormatError("not a PEM certificate") from e
    return data


def parse_certificate(data: bytes) -> tuple[bytes, dict[str, bytes]]:
    """The SubjectPublicKeyInfo (DER) and ``{extension OID: value}`` of a certificate.

    Read with the package's own bounded DER reader rather than ``cryptography``, which refuses
    the NULL ECDSA algorithm parameters that mbedTLS (and so Gramine) writes.
    """
    der = _der_certificate(data)
    tag, cert, _ = _der.read_tlv(der, 0)
    if tag != _der.SEQUENCE:
        raise FormatError("certificate is not a DER SEQUENCE")
    tbs_tag, tbs = _der.children(cert)[0]
    if tbs_tag != _der.SEQUENCE:
        raise FormatError("TBSCertificate is not a SEQUENCE")
    items = _der.children(tbs)
    if items and items[0][0] == 0xA0:  # explicit version
        items = items[1:]
    if len(items) < 6:
        raise FormatError("TBSCertificate too short")
    spki = _der.encode(_der.SEQUENCE, items[5][1])
    exts: dict[str, bytes] = {}
    for tag, value in items[6:]:
        if tag != 0xA3:
            continue
        ((_seq_tag, seq),) = _der.children(value)
        for ext_tag, ext in _der.children(seq):
            parts = _der.children(ext)
            if ext_tag != _der.SEQUENCE or len(parts) not in (2, 3) or parts[0][0] != _der.OID:
                raise FormatError("malformed certificate extension")
            if parts[-1][0] != _der.OCTET_STRING:
                raise FormatError("certificate extension value is not an OCTET STRING")
            exts[_der.decode_oid(parts[0][1])] = parts[-1][1]
    return spki, exts


def extract(data: bytes) -> RaTlsEvidence:
    """Parse an RA-TLS certificate (PEM or DER), return its quote once the binding holds."""
    try:
        spki, exts = parse_certificate(data)
    except (FormatError, IndexError, ValueError) as e:
        raise FormatError(f"not an X.509 certificate: {e}") from e
    tcg = exts.get(TCG_OID)
    if tcg is not None:
        return _tcg(tcg, spki)
    raw = next((exts[o] for o in LEGACY_OIDS if o in exts), None)
    if raw is None:
        raise FormatError("certificate carries no RA-TLS evidence extension")
    quote = Quote.from_bytes(raw)
    want = hashlib.sha256(spki).digest()
    if quote.body.report_data[:32] != want:
        raise AttestationError(
            "RA-TLS binding",
            "the quote does not bind the certificate's public key",
            expected=want.hex(),
            found=quote.body.report_data[:32].hex(),
        )
    return RaTlsEvidence(spki, raw, "legacy", "REPORTDATA[0:32] = SHA-256(SubjectPublicKeyInfo)")


def _tcg(value: bytes, spki: bytes) -> RaTlsEvidence:
    try:
        tagged = cbor2.loads(value)
        if not isinstance(tagged, cbor2.CBORTag) or tagged.tag != CBOR_TAG_INTEL_QUOTE:
            raise FormatError("TCG evidence is not CBOR tag 60000 (Intel TEE quote)")
        quote_raw, claims_buf = tagged.value
        claims = cbor2.loads(claims_buf)
        alg, digest = cbor2.loads(claims["pubkey-hash"])
    except (cbor2.CBORDecodeError, ValueError, TypeError, KeyError) as e:
        raise FormatError(f"malformed TCG tagged evidence: {e}") from e
    if not isinstance(quote_raw, bytes) or not isinstance(claims_buf, bytes):
        raise FormatError("TCG tagged evidence must hold two byte strings")
    name = _HASHES.get(alg) if isinstance(alg, int) else None
    if name is None:
        raise FormatError(f"unsupported pubkey-hash algorithm {alg!r}")
    if hashlib.new(name, spki).digest() != digest:
        raise AttestationError(
            "RA-TLS binding", "pubkey-hash claim does not match the certificate's key"
        )
    quote = Quote.from_bytes(quote_raw)
    want = hashlib.sha256(claims_buf).digest()
    if quote.body.report_data[:32] != want:
        raise AttestationError(
            "RA-TLS binding",
            "the quote does not bind the evidence claims",
            expected=want.hex(),
            found=quote.body.report_data[:32].hex(),
        )
    return RaTlsEvidence(
        spki,
        quote_raw,
        "tcg",
        f"pubkey-hash ({name}) = SPKI hash; REPORTDATA[0:32] = SHA-256(claims)",
    )
