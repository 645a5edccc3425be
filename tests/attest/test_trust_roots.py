"""Roots given on the command line (``--trust-root``): refused with TrustRootError, a
configuration error, never an AttestationError about evidence nobody has looked at yet."""

from __future__ import annotations

from pathlib import Path

import pytest

from shieldml.attest import anchors_from_files, fingerprint
from shieldml.attest._certs import pem_certificates
from shieldml.errors import AttestationError, FormatError, TrustRootError

CUSTOM = ("intel", "qvl-synthetic", "trustedRootCaCert.pem")


def _refused(path: Path, message: str, **kw: bool) -> TrustRootError:
    with pytest.raises(TrustRootError, match=message) as e:
        anchors_from_files([str(path)], **kw)
    assert not isinstance(e.value, AttestationError | FormatError)
    return e.value


def test_an_unreadable_root_file(tmp_path: Path):
    _refused(tmp_path / "missing.pem", "missing.pem: cannot read trust root: No such file")


def test_a_file_that_is_not_a_certificate(tmp_path: Path):
    (tmp_path / "junk.der").write_bytes(b"\x30\x03junk")
    _refused(tmp_path / "junk.der", "junk.der: not a certificate")


def test_a_custom_root_needs_the_insecure_switch(att: Path):
    path = att.joinpath(*CUSTOM)
    e = _refused(path, "is not a pinned vendor root")
    assert "--insecure-custom-root" in (e.hint or "")
    anchors = anchors_from_files([str(path)], insecure_custom_root=True)
    assert anchors.custom == {fingerprint(pem_certificates(path.read_bytes())[0])}


def _named_simulated_root(path: Path) -> Path:
    """A self-signed root anyone can make, named like the simulated platform's."""
    from datetime import UTC, datetime, timedelta

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import Encoding
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, "Intel SGX Root CA"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "shieldml simulated"),
        ]
    )
    start = datetime(2025, 1, 1, tzinfo=UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(start)
        .not_valid_after(start + timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    path.write_bytes(cert.public_bytes(Encoding.PEM))
    return path


def test_trust_root_named_shieldml_simulated_is_a_custom_root(tmp_path: Path):
    """The attack: a --trust-root certificate whose subject says O=shieldml simulated was trusted
    as the simulated platform's root without --insecure-custom-root. What a root is trusted as
    follows where it came from (--simulated-platform or --trust-root), never its name."""
    path = _named_simulated_root(tmp_path / "root.pem")
    _refused(path, "is not a pinned vendor root")
    anchors = anchors_from_files([str(path)], insecure_custom_root=True)
    assert anchors.simulated == frozenset() and len(anchors.custom) == 1
