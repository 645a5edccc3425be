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
from functools import lru_cache
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


#: PEM bundles up to this size are remembered once parsed (by their exact bytes); larger ones
#: are parsed every time
CACHE_MAX_BYTES = 64 * 1024


def pem_certificates(data: bytes) -> list[x509.Certificate]:
    """Every certificate of a PEM bundle; ``ValueError`` if any is malformed anywhere.

    The same chains come with every quote and every collateral document (a PCK chain, Intel's
    issuer chains), so a bundle parsed once is remembered by its exact bytes (LRU, at most 128
    bundles of at most CACHE_MAX_BYTES): the same bytes always parse to the same certificates,
    which are immutable, so nothing an attacker sends can make another bundle look cached. A
    bundle that fails to parse is never remembered."""
    if len(data) > CACHE_MAX_BYTES:
        return _parse_pem_certificates(data)
    return list(_pem_certificates_cached(bytes(data)))


def _parse_pem_certificates(data: bytes) -> list[x509.Certificate]:
    return _strict(lambda: [_decoded(c) for c in x509.load_pem_x509_certificates(data)])


@lru_cache(maxsize=128)
def _pem_certificates_cached(data: bytes) -> tuple[x509.Certificate, ...]:
    return tuple(_parse_pem_certificates(data))


def pem_certificate(data: bytes) -> x509.Certificate:
    return _strict(lambda: _decoded(x509.load_pem_x509_certificate(data)))


def der_certificate(data: bytes) -> x509.Certificate:
    return _strict(lambda: _decoded(x509.load_der_x509_certificate(data)))


def der_crl(data: bytes) -> x509.CertificateRevocationList:
    """A DER CRL, every entry decoded; remembered by its exact bytes like PEM bundles (LRU, at
    most 32 CRLs of at most CRL_CACHE_MAX_BYTES): the collateral sent with every quote carries
    the same two CRLs until Intel issues new ones."""
    if len(data) > CRL_CACHE_MAX_BYTES:
        return _parse_der_crl(data)
    return _der_crl_cached(bytes(data))


CRL_CACHE_MAX_BYTES = 256 * 1024


def _parse_der_crl(data: bytes) -> x509.CertificateRevocationList:
    return _strict(lambda: _decoded_crl(x509.load_der_x509_crl(data)))


@lru_cache(maxsize=32)
def _der_crl_cached(data: bytes) -> x509.CertificateRevocationList:
    return _parse_der_crl(data)


def pem_crl(data: bytes) -> x509.CertificateRevocationList:
    return _strict(lambda: _decoded_crl(x509.load_pem_x509_crl(data)))
