"""Certificates with a malformed field are refused at load, not deep inside verification.

Regression tests for the first atheris findings (scripts/fuzz_atheris.py): ``cryptography`` loads a
certificate whose subject is malformed and raises ``ValueError`` only when the subject is read, and
it raises ``InvalidVersion`` (not a ``ValueError``) for a bad version.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from datetime import UTC, datetime

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from shieldml.attest import _certs, _der, verify_evidence
from shieldml.attest._intel_collateral import load_pem_chain
from shieldml.errors import AttestationError, CollateralError, FormatError
from shieldml.testing.simulated import SimulatedPlatform, fixed_clock

NOW = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> SimulatedPlatform:
    return SimulatedPlatform.open(tmp_path_factory.mktemp("sim"), clock=fixed_clock(NOW))


def _tbs_fields(der: bytes) -> tuple[int, list[int]]:
    """Offset of the TBS certificate's content and the offsets of its fields."""
    _tag, _cert, cert_end = _der.read_tlv(der, 0)
    cert_start = cert_end - len(_cert)
    _tag, tbs, tbs_end = _der.read_tlv(der, cert_start)
    pos = tbs_end - len(tbs)
    starts = []
    while pos < tbs_end:
        starts.append(pos)
        _tag, _value, pos = _der.read_tlv(der, pos)
    return tbs_end - len(tbs), starts


def _subject_cn(der: bytes) -> int:
    """Offset of the tag of the subject's CN value (a UTF8String in the simulated certificates)."""
    _, fields = _tbs_fields(der)
    _tag, value, end = _der.read_tlv(der, fields[5])  # [0] version, serial, sig, issuer, validity
    return der.index(b"\x06\x03\x55\x04\x03\x0c", end - len(value), end) + 5


def bad_subject(der: bytes) -> bytes:
    """The same certificate, same length, with the subject's CN value tagged [25] constructed
    (what atheris found first: a well-formed Name whose attribute value is not a string)."""
    cn = _subject_cn(der)
    return der[:cn] + b"\xb9" + der[cn + 1 :]


def bitstring_subject(der: bytes) -> bytes:
    """The subject's CN as a BIT STRING: cryptography raises TypeError on reading the subject."""
    cn = _subject_cn(der)
    return der[:cn] + b"\x03" + der[cn + 1 : cn + 2] + b"\x00" + der[cn + 3 :]


def bad_version(der: bytes) -> bytes:
    _, fields = _tbs_fields(der)
    version = fields[0]
    assert der[version : version + 5] == b"\xa0\x03\x02\x01\x02"  # [0] INTEGER 2 (v3)
    return der[: version + 4] + b"\x26" + der[version + 5 :]


def pem(der: bytes) -> bytes:
    b64 = base64.encodebytes(der).replace(b"\n", b"")
    lines = [b64[i : i + 64] for i in range(0, len(b64), 64)]
    return b"-----BEGIN CERTIFICATE-----\n" + b"\n".join(lines) + b"\n-----END CERTIFICATE-----\n"


@pytest.mark.parametrize(
    ("mutate", "late"), [(bad_subject, ValueError), (bitstring_subject, TypeError)]
)
def test_cryptography_defers_the_error_and_our_loader_does_not(
    platform: SimulatedPlatform, mutate: Callable[[bytes], bytes], late: type[Exception]
):
    der = mutate(platform.intel_root.public_bytes(Encoding.DER))
    lazy = x509.load_der_x509_certificate(der)  # the premise: this loads...
    with pytest.raises(late):
        _ = lazy.subject  # ...and fails later
    with pytest.raises(ValueError):
        _certs.der_certificate(der)
    with pytest.raises(ValueError):
        _certs.pem_certificates(pem(der))


def test_bad_version_is_a_value_error(platform: SimulatedPlatform):
    der = bad_version(platform.intel_root.public_bytes(Encoding.DER))
    with pytest.raises(x509.InvalidVersion):  # not a ValueError in cryptography
        x509.load_der_x509_certificate(der)
    with pytest.raises(ValueError, match="version"):
        _certs.der_certificate(der)
    with pytest.raises(CollateralError, match="not a certificate chain"):
        load_pem_chain(pem(der), "PCK CRL chain")


@pytest.mark.parametrize("mutate", [bad_subject, bitstring_subject, bad_version])
def test_quote_whose_pck_chain_has_a_malformed_certificate(
    platform: SimulatedPlatform, mutate: Callable[[bytes], bytes]
):
    quote, col = platform.sgx_quote(now=NOW)
    good = pem(platform.intel_root.public_bytes(Encoding.DER))
    assert good in quote  # the chain inside the quote ends with the root, PEM, 64-char lines
    bad = pem(mutate(platform.intel_root.public_bytes(Encoding.DER)))
    assert len(bad) == len(good)
    with pytest.raises((AttestationError, FormatError)) as e:
        verify_evidence(quote.replace(good, bad), collateral=col, now=NOW, trust=platform.trust())
    assert "PCK chain" in str(e.value)


def test_crl_entries_are_decoded_at_load(platform: SimulatedPlatform):
    col = platform.collateral("sgx", now=NOW)
    der = col.pck_crl.public_bytes(Encoding.DER)
    assert _certs.der_crl(der).issuer == col.pck_crl.issuer
    with pytest.raises(ValueError):
        _certs.der_crl(der[:-1])


def test_a_crl_issuer_whose_key_cannot_sign_is_refused_not_a_type_error():
    """A certificate may carry an X25519 key; as a CRL's issuer it signed nothing (cryptography
    raised TypeError for it in the middle of verification)."""
    from datetime import timedelta

    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, x25519

    from shieldml.attest._checks import CheckLog
    from shieldml.attest._x509 import check_crl

    ca_key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "no signer")])
    issuer = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(x25519.X25519PrivateKey.generate().public_key())
        .serial_number(1)
        .not_valid_before(NOW - timedelta(days=1))
        .not_valid_after(NOW + timedelta(days=1))
        .sign(ca_key, hashes.SHA256())
    )
    crl = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(name)
        .last_update(NOW - timedelta(hours=1))
        .next_update(NOW + timedelta(hours=1))
        .sign(ca_key, hashes.SHA256())
    )
    with pytest.raises(AttestationError, match="is not signed by 'no signer'"):
        check_crl(crl, issuer, [], NOW, CheckLog(), "test CRL")
