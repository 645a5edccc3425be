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
