"""Loading certificates and CRLs from untrusted bytes, with every field decoded at load time.

``cryptography`` decodes a certificate's subject, issuer and extensions lazily, on first access. A
certificate whose subject is malformed therefore loads fine and raises ``ValueError`` later, deep
inside a verification step that only expected a bad signature (coverage-guided fuzzing found this:
a quote whose PCK chain had such a certificate made the broker answer 500). It also raises
exceptions that are not ``ValueError`` (``InvalidVersion``, ``DuplicateExtension``, even
``TypeError``). These
loaders decode every field verification reads, up front, and raise ``ValueError`` for all of it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm

_ERRORS = (
    ValueError,
    x509.InvalidVersion,
    x509.DuplicateExtension,
    x509.UnsupportedGeneralNameType,
    UnsupportedAlgorithm,
    TypeError,  # e.g. a Name attribute encoded as a BIT STRING under any OID but one
)
T = TypeVar("T")


def _decoded(cert: x509.Certificate) -> x509.Certificate:
    _ = (cert.subject, cert.issuer, cert.serial_number, cert.extensions)
    _ = (cert.not_valid_before_utc, cert.not_valid_after_utc, cert.signature_algorithm_oid)
    cert.public_key()
    return cert


def _decoded_crl(crl: x509.CertificateRevocationList) -> x509.CertificateRevocationList:
    _ = (crl.issuer, crl.last_update_utc, crl.next_update_utc, crl.extensions)
    _ = crl.signature_algorithm_oid
    for entry in crl:  # entries are decoded lazily too; verification looks serials up
        _ = (entry.serial_number, entry.revocation_date_utc)
    return crl


def _strict(load: Callable[[], T]) -> T:
    try:
        return load()
    except _ERRORS as e:
        raise ValueError(str(e) or type(e).__name__) from e


def pem_certificates(data: bytes) -> list[x509.Certificate]:
    """Every certificate of a PEM bundle; ``ValueError`` if any is malformed anywhere."""
    return _strict(lambda: [_decoded(c) for c in x509.load_pem_x509_certificates(data)])


def pem_certificate(data: bytes) -> x509.Certificate:
    return _strict(lambda: _decoded(x509.load_pem_x509_certificate(data)))


def der_certificate(data: bytes) -> x509.Certificate:
    return _strict(lambda: _decoded(x509.load_der_x509_certificate(data)))


def der_crl(data: bytes) -> x509.CertificateRevocationList:
    return _strict(lambda: _decoded_crl(x509.load_der_x509_crl(data)))


def pem_crl(data: bytes) -> x509.CertificateRevocationList:
    return _strict(lambda: _decoded_crl(x509.load_pem_x509_crl(data)))
