"""The server's TLS identity, made inside the TEE: a key that never leaves the process's memory,
an RA-TLS certificate for it, and an ``ssl`` context holding both.

``ssl.SSLContext.load_cert_chain`` reads files. The key is written to an anonymous memory file
(``memfd_create``, close-on-exec, sealed against growth and writes) and read back through
``/proc/self/fd/N``: no directory entry, no disk, nothing another mount namespace can open by name,
and the descriptor is closed as soon as OpenSSL has read it. A private tmpfs would serve as well,
but would be a mount the host's namespace can see the mount point of; a memfd is simpler.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from shieldml.client import certificate_report_data
from shieldml.runner.evidence import Evidence, Provider

#: Gramine's legacy RA-TLS extension, as Gramine writes the OID on the wire
RATLS_OID = "0.6.9.42.840.113741.1337.6"
_SEALS = getattr(fcntl, "F_SEAL_SEAL", 1) | getattr(fcntl, "F_SEAL_SHRINK", 2)
_SEALS |= getattr(fcntl, "F_SEAL_GROW", 4) | getattr(fcntl, "F_SEAL_WRITE", 8)


@contextlib.contextmanager
def memory_file(name: str, data: bytes) -> Iterator[str]:
    """A path (``/proc/self/fd/N``) to ``data`` in an anonymous, sealed memory file; closed on exit."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
        yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)


@dataclass(frozen=True)
class TlsIdentity:
    """A TLS key pair made in this process, and its certificate."""

    key: ec.EllipticCurvePrivateKey
    certificate: bytes  # PEM
    spki: bytes  # DER SubjectPublicKeyInfo
    evidence: Evidence | None  # the evidence in the certificate (None: no quote to carry)

    @property
    def spki_sha256(self) -> str:
        return hashlib.sha256(self.spki).hexdigest()

    @classmethod
    def generate(
        cls, provider: Provider | None, workload_digest: str, *, now: datetime | None = None
    ) -> TlsIdentity:
        """A fresh P-256 key and a self-signed certificate for it. With a ``provider`` whose
        evidence is an Intel quote (SGX, TDX), the certificate carries that quote in Gramine's
        RA-TLS extension, binding the key and the workload (:func:`certificate_report_data`);
        SEV-SNP reports are not quotes, and a client uses the fresh evidence only."""
        key = ec.generate_private_key(ec.SECP256R1())
        spki = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        at = now or datetime.now(UTC)
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.COMMON_NAME, "shieldml serve"),
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "shieldml"),
            ]
        )
        b = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(at - timedelta(hours=1))
            .not_valid_after(at + timedelta(days=365))
        )
        ev = None
        if provider is not None:
            ev = provider.evidence(certificate_report_data(spki, workload_digest))
            if ev.tee in ("sgx", "tdx"):
                b = b.add_extension(
                    x509.UnrecognizedExtension(x509.ObjectIdentifier(RATLS_OID), ev.data),
                    critical=False,
                )
            else:
                ev = None
        cert = b.sign(key, hashes.SHA256())
        return cls(key, cert.public_bytes(serialization.Encoding.PEM), spki, ev)

    def server_context(self) -> ssl.SSLContext:
        """TLS 1.3, HTTP/1.1, no session tickets (every connection shows the certificate)."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.set_alpn_protocols(["http/1.1"])
        ctx.num_tickets = 0
        pem_key = self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        with (
            memory_file("shieldml-tls-cert", self.certificate) as cert_path,
            memory_file("shieldml-tls-key", pem_key) as key_path,
        ):
            ctx.load_cert_chain(cert_path, key_path)
        return ctx
