"""Running the broker: state directory, TLS (self-signed on first start, pinned by fingerprint)."""

from __future__ import annotations

import datetime as dt
import gc
import ipaddress
import json
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from fastapi import FastAPI

from shieldml.attest import CrlSource, IntelCollateral, Quote, TrustAnchors
from shieldml.broker.server.app import Settings, create_app
from shieldml.broker.server.release import CHALLENGE_BURST, CHALLENGE_RATE
from shieldml.broker.server.storage import Store
from shieldml.broker.tls import cert_fingerprint
from shieldml.errors import InputReadError

log = logging.getLogger("shieldml.broker")


@dataclass(frozen=True)
class TlsFiles:
    cert: Path
    key: Path

    @property
    def fingerprint(self) -> str:
        return cert_fingerprint(self.cert.read_bytes())


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


_ANNOUNCED: set[str] = set()


@dataclass(frozen=True, kw_only=True)
class BrokerConfig:
    """What ``shieldml broker serve`` starts with (passed to worker processes as JSON)."""

    database: str
    state_dir: str
    trust_roots: tuple[str, ...] = ()
    insecure_custom_root: bool = False
    simulated_platforms: tuple[str, ...] = ()
    nonce_ttl_s: float = 60.0
    pccs_url: str | None = None
    #: AMD's key distribution service, for the CRL of SEV-SNP evidence sent without one
    amd_kds_url: str | None = None
    secret_prov_port: int | None = None
    secret_prov_key: str | None = None
    body_timeout_s: float = 10.0
    header_timeout_s: float = 10.0
    #: ``/v1/challenge`` per client address and worker: sustained per second, burst (0: no limit)
    challenge_rate: float = CHALLENGE_RATE
    challenge_burst: float = CHALLENGE_BURST

    def to_env(self) -> str:
        return json.dumps(self.__dict__)

    @classmethod
    def from_env(cls) -> BrokerConfig:
        d = json.loads(os.environ["SHIELDML_BROKER_CONFIG"])
        d["trust_roots"] = tuple(d["trust_roots"])
        d["simulated_platforms"] = tuple(d["simulated_platforms"])
        return cls(**d)

    def trust(self, *, announce: bool = True) -> TrustAnchors:
        """The roots evidence is checked against; ``announce``: log each insecure one (the
        process that serves does; ``serve``'s early check does not, so it is said once)."""
        from shieldml.attest import anchors_from_files
        from shieldml.testing.simulated import SimulatedPlatform, system_clock
        from shieldml.testing.simulated_gpu import open_gpus

        anchors = anchors_from_files(
            self.trust_roots, insecure_custom_root=self.insecure_custom_root
        )
        for d in self.simulated_platforms:
            if announce and d not in _ANNOUNCED:
                _ANNOUNCED.add(d)  # once per process, however many settings are built
                log.warning("insecure: trusting the simulated platform in %s", d)
            anchors = SimulatedPlatform.open(d, clock=system_clock).trust(anchors)
            # its simulated GPUs (one family: one device root and one RIM root); a platform
            # directory the broker may only read, without them, still serves CPU evidence
            try:
                anchors = open_gpus(d, clock=system_clock)[0].trust(anchors)
            except InputReadError as e:
                if announce and f"gpu {d}" not in _ANNOUNCED:
                    _ANNOUNCED.add(f"gpu {d}")
                    log.warning("no simulated GPUs trusted: %s", e.message)
        return anchors

    def settings(self) -> Settings:
        return Settings(
            nonce_ttl=dt.timedelta(seconds=self.nonce_ttl_s),
            body_timeout=self.body_timeout_s,
            challenge_rate=self.challenge_rate,
            challenge_burst=self.challenge_burst,
            trust=self.trust(),
            collateral_for=self.collateral_source(),
            own_collateral=self.own_collateral(),
            amd_crl_for=self.amd_crl_source(),
        )

    def collateral_source(self) -> Callable[[bytes], IntelCollateral]:
        """Collateral for a quote: a trusted simulated platform's own, else the on-disk cache,
        refreshed from the PCCS/PCS at ``pccs_url`` when configured."""
        from shieldml.attest import CollateralCache, fingerprint, http_fetcher, load_pem_chain
        from shieldml.testing.simulated import SimulatedPlatform, system_clock

        sims = [SimulatedPlatform.open(d, clock=system_clock) for d in self.simulated_platforms]
        cache = CollateralCache(Path(self.state_dir) / "collateral")
        fetch = http_fetcher() if self.pccs_url else None

        def source(quote_bytes: bytes) -> IntelCollateral:
            q = Quote.from_bytes(quote_bytes)
            root = load_pem_chain(q.certification.cert_data, "PCK chain")[-1]
            for sim in sims:
                if fingerprint(sim.intel_root) == fingerprint(root):
                    return sim.collateral("tdx" if q.is_tdx else "sgx")
            now = dt.datetime.now(dt.UTC)
            if self.pccs_url:
                return cache.intel(quote_bytes, now=now, fetch=fetch, base_url=self.pccs_url)
            return cache.intel(quote_bytes, now=now)

        return source

    def own_collateral(self) -> Callable[[bytes], IntelCollateral | None]:
        """The collateral this broker has at hand for a quote, asking no one: a trusted simulated
        platform's, else what the on-disk cache holds (what runners' collateral is compared with)."""
        from shieldml.attest import CollateralCache, fingerprint, load_pem_chain
        from shieldml.testing.simulated import SimulatedPlatform, system_clock

        sims = [SimulatedPlatform.open(d, clock=system_clock) for d in self.simulated_platforms]
        cache = CollateralCache(Path(self.state_dir) / "collateral")

        def own(quote_bytes: bytes) -> IntelCollateral | None:
            q = Quote.from_bytes(quote_bytes)
            root = load_pem_chain(q.certification.cert_data, "PCK chain")[-1]
            for sim in sims:
                if fingerprint(sim.intel_root) == fingerprint(root):
                    return sim.collateral("tdx" if q.is_tdx else "sgx")
            return cache.cached_intel(quote_bytes, now=dt.datetime.now(dt.UTC))

        return own

    def amd_crl_source(self) -> CrlSource:
        """AMD's CRL for verified SEV-SNP evidence sent without one: a trusted simulated
        platform's own (its ARK signed the chain), else the on-disk cache while current,
        refreshed from AMD's KDS at ``amd_kds_url`` when configured. Without any, None: the
        claims say revocation was not checked, and policies refuse that unless they allow it."""
        from shieldml.attest import CollateralCache, http_fetcher
        from shieldml.testing.simulated import SimulatedPlatform, system_clock

        sims = [
            SimulatedPlatform.open(d, clock=system_clock).crl_source()
            for d in self.simulated_platforms
        ]
        cache = CollateralCache(Path(self.state_dir) / "collateral")
        fetch = http_fetcher() if self.amd_kds_url else None

        def source(
            product: str, ark: x509.Certificate, now: dt.datetime
        ) -> x509.CertificateRevocationList | None:
            for sim in sims:
                crl = sim(product, ark, now)
                if crl is not None:
                    return crl
            if self.amd_kds_url:
                return cache.amd_crl(product, ark, now=now, fetch=fetch, base_url=self.amd_kds_url)
            return cache.amd_crl(product, ark, now=now)

        return source

    def app(self) -> FastAPI:
        return create_app(Store(self.database, Path(self.state_dir)), self.settings())


def app_from_env() -> FastAPI:
    """uvicorn factory for worker processes (``--workers``)."""
    access = logging.getLogger("shieldml.broker.access")
    if not access.handlers:  # one JSON line per request (and per denial) on stderr
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        access.addHandler(handler)
        access.setLevel(logging.INFO)
        access.propagate = False
    app = BrokerConfig.from_env().app()
    # The long-lived objects made at start-up never become garbage: keep the cyclic collector
    # from re-scanning them (fewer, shorter pauses under load).
    gc.collect()
    gc.freeze()
    return app
