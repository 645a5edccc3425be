"""Running the broker: state directory, TLS (self-signed on first start, pinned by fingerprint)."""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import json
import logging
import os
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from fastapi import FastAPI

from shieldml.attest import TrustAnchors
from shieldml.broker.service import Settings, create_app
from shieldml.broker.storage import Store

log = logging.getLogger("shieldml.broker")


@dataclass(frozen=True)
class TlsFiles:
    cert: Path
    key: Path

    @property
    def fingerprint(self) -> str:
        return cert_fingerprint(self.cert.read_bytes())


def cert_fingerprint(pem_or_der: bytes) -> str:
    """SHA-256 over the certificate's DER encoding, lower-case hex (what clients pin)."""
    der = (
        ssl.PEM_cert_to_DER_cert(pem_or_der.decode())
        if pem_or_der.lstrip().startswith(b"-----")
        else pem_or_der
    )
    return hashlib.sha256(der).hexdigest()


def self_signed(state_dir: Path, hosts: list[str]) -> TlsFiles:
    """The broker's self-signed certificate, created on first start and kept (key mode 0600)."""
    cert_path, key_path = state_dir / "tls-cert.pem", state_dir / "tls-key.pem"
    if cert_path.exists() and key_path.exists():
        return TlsFiles(cert_path, key_path)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    sans: list[x509.GeneralName] = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "shieldml key broker")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=825))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return TlsFiles(cert_path, key_path)


@dataclass(frozen=True)
class BrokerConfig:
    """What ``shieldml broker serve`` starts with (passed to worker processes as JSON)."""

    database: str
    state_dir: str
    trust_roots: tuple[str, ...] = ()
    insecure_custom_root: bool = False
    simulated_platforms: tuple[str, ...] = ()
    nonce_ttl_s: float = 60.0

    def to_env(self) -> str:
        return json.dumps(self.__dict__)

    @classmethod
    def from_env(cls) -> BrokerConfig:
        d = json.loads(os.environ["SHIELDML_BROKER_CONFIG"])
        d["trust_roots"] = tuple(d["trust_roots"])
        d["simulated_platforms"] = tuple(d["simulated_platforms"])
        return cls(**d)

    def trust(self) -> TrustAnchors:
        from shieldml.attest.simulated import SimulatedPlatform
        from shieldml.cli_attest import _trust

        anchors = _trust(self.trust_roots, self.insecure_custom_root)
        for d in self.simulated_platforms:
            log.warning("insecure: trusting the simulated platform in %s", d)
            anchors = SimulatedPlatform.open(d).trust(anchors)
        return anchors

    def app(self) -> FastAPI:
        store = Store(self.database, Path(self.state_dir))
        return create_app(
            store, Settings(nonce_ttl=dt.timedelta(seconds=self.nonce_ttl_s), trust=self.trust())
        )


def app_from_env() -> FastAPI:
    """uvicorn factory for worker processes (``--workers``)."""
    return BrokerConfig.from_env().app()
