"""RA-TLS certificates: the quote inside binds the certificate key, on every Gramine certificate."""

from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shieldml.attest import Quote, extract
from shieldml.attest._ratls import TCG_OID, parse_certificate
from shieldml.errors import AttestationError, FormatError
from tests.conftest import fuzz_examples

GRAMINE = {
    "konvera_legacy_ratls_cert_rsa.pem": "legacy",  # Gramine <= 1.3, RSA
    "konvera_legacy_ratls_cert.pem": "legacy",  # Gramine 1.4-1.7, P-384
    "konvera_tls_cert.der": "legacy",
    "ccc_gramine-cert.pem": "tcg",  # Gramine 1.8+: both extensions, TCG preferred
}
INTEROP = ["ccc_intel-sgxsdk-cert.pem", "ccc_rats-tls-cert.pem"]


@pytest.mark.parametrize(("name", "ext"), sorted(GRAMINE.items()))
def test_gramine_certificates_bind_their_key(att: Path, name: str, ext: str):
    data = (att / "ratls" / name).read_bytes()
    ev = extract(data)
    assert ev.extension == ext
    quote = Quote.from_bytes(ev.quote)
    assert quote.header.version == 3
    if ext == "legacy":
        assert quote.body.report_data[:32] == hashlib.sha256(ev.spki).digest()


def test_gramine_18_certificate_legacy_extension_binds_too(att: Path):
    spki, exts = parse_certificate((att / "ratls" / "ccc_gramine-cert.pem").read_bytes())
    legacy = Quote.from_bytes(exts["0.6.9.42.840.113741.1337.6"])
    assert legacy.body.report_data[:32] == hashlib.sha256(spki).digest()
    assert legacy.body.debug  # that enclave ran in debug mode: a policy must refuse it


@pytest.mark.parametrize("name", INTEROP)
def test_interop_certificates(att: Path, name: str):
    ev = extract((att / "ratls" / name).read_bytes())
    assert ev.extension == "tcg"


def test_swapped_key_breaks_the_binding(att: Path):
    """A quote lifted into a certificate for another key must not verify."""
    _, exts = parse_certificate((att / "ratls" / "ccc_gramine-cert.pem").read_bytes())
    tagged = cbor2.loads(exts[TCG_OID])
    quote, claims = tagged.value
    other = cbor2.dumps({"pubkey-hash": cbor2.dumps([1, bytes(32)])})
    spki, _ = parse_certificate((att / "ratls" / "konvera_tls_cert.der").read_bytes())
    from shieldml.attest._ratls import _tcg

    with pytest.raises(AttestationError, match="pubkey-hash"):
        _tcg(cbor2.dumps(cbor2.CBORTag(60000, [quote, claims])), spki)
    with pytest.raises(AttestationError):
        _tcg(cbor2.dumps(cbor2.CBORTag(60000, [quote, other])), spki)


def test_not_an_ratls_certificate(att: Path):
    pem = (att / "amd" / "virtee" / "cert_chain_milan.pem").read_bytes()
    with pytest.raises(FormatError, match="no RA-TLS evidence"):
        extract(pem)


@settings(max_examples=fuzz_examples(200), deadline=None)
@given(st.binary(max_size=3000))
def test_parser_raises_only_format_errors(data: bytes):
    with contextlib.suppress(FormatError):
        extract(data)
