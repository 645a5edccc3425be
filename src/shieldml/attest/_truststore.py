"""A local store of vendor certificates, filled only with what chains to a pinned root.

``shieldml trust import FILE`` and ``shieldml trust fetch`` put the Intel SGX root and AMD's ARK,
ASK and ASVK certificates here, so SEV-SNP verification can build the chain when the evidence
brings only a VCEK. Nothing enters the store unless it is a pinned root or is signed by one.
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives.serialization import Encoding

from shieldml.attest import _certs
from shieldml.attest._fetch import AMD_KDS_URL, INTEL_ROOT_CA_URL, Fetcher, _get
from shieldml.attest._intel_collateral import load_pem_chain
from shieldml.attest._snp import load_certificate
from shieldml.attest._trust import AMD_ARK_SHA256, INTEL_SGX_ROOT_SHA256, fingerprint
from shieldml.attest._x509 import cn
from shieldml.errors import UntrustedRootError

GENERATIONS = ("Milan", "Genoa", "Turin")


def default_store() -> Path:
    home = os.environ.get("SHIELDML_HOME")
    return (Path(home) if home else Path.home() / ".shieldml") / "trust"


def _signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    return True


class TrustStore:
    def __init__(self, directory: str | os.PathLike[str] | None = None) -> None:
        self.dir = Path(directory) if directory is not None else default_store()

    def certificates(self) -> list[x509.Certificate]:
        if not self.dir.is_dir():
            return []
        return [_certs.pem_certificate(p.read_bytes()) for p in sorted(self.dir.glob("*.pem"))]

    def classify(self, cert: x509.Certificate, batch: list[x509.Certificate]) -> str:
        """The store name for ``cert`` if it may enter; :class:`UntrustedRootError` otherwise."""
        fp = fingerprint(cert)
        if fp == INTEL_SGX_ROOT_SHA256:
            return "intel-sgx-root"
        for gen, ark_fp in AMD_ARK_SHA256.items():
            if fp == ark_fp:
                return f"amd-ark-{gen.lower()}"
        arks = [c for c in batch + self.certificates() if fingerprint(c) in AMD_ARK_SHA256.values()]
        if any(_signed_by(cert, ark) for ark in arks):
            return f"amd-{cn(cert.subject).lower()}"
        raise UntrustedRootError(
            "trust store",
            f"'{cn(cert.subject)}' is neither a pinned vendor root nor signed by one",
            found=f"SHA-256 {fp}",
            hint="only Intel's SGX root and AMD's ARK/ASK/ASVK certificates can be imported",
        )

    def import_certificates(self, certs: list[x509.Certificate]) -> list[str]:
        """Store every certificate, or none if any of them fails :meth:`classify`."""
        names = [self.classify(c, certs) for c in certs]
        self.dir.mkdir(parents=True, exist_ok=True)
        for name, cert in zip(names, certs, strict=True):
            tmp = self.dir / f".{name}.pem.tmp"
            tmp.write_bytes(cert.public_bytes(Encoding.PEM))
            tmp.replace(self.dir / f"{name}.pem")
        return names

    def import_file(self, path: str | os.PathLike[str]) -> list[str]:
        data = Path(path).read_bytes()
        certs = (
            load_pem_chain(data, str(path)) if b"-----BEGIN" in data else [load_certificate(data)]
        )
        return self.import_certificates(certs)

    def fetch(self, fetch: Fetcher) -> list[str]:
        """Download Intel's root and AMD's chains for every generation, then import them."""
        certs = [load_certificate(_get(fetch, INTEL_ROOT_CA_URL, "Intel SGX root").body)]
        for gen in GENERATIONS:
            for kind in ("vcek", "vlek"):
                pem = _get(
                    fetch, f"{AMD_KDS_URL}/{kind}/v1/{gen}/cert_chain", f"AMD {gen} chain"
                ).body
                certs += load_pem_chain(pem, f"AMD {gen} {kind} chain")
        unique = {fingerprint(c): c for c in certs}
        return self.import_certificates(list(unique.values()))
