"""A simulated NVIDIA confidential-computing GPU whose evidence goes through the real verifier.

It has its own device-identity chain (root -> identity -> provisioner ICA -> BROM -> FMC leaf,
ECDSA P-384, NVIDIA's names with ``O=shieldml simulated``), signs SPDM 1.1 GET_MEASUREMENTS
responses for any nonce with the measurements and firmware versions the caller chooses,
issues OCSP responses (good, revoked, on hold; any dates) for its CA certificates, and signs
driver and VBIOS RIMs (XML-DSig, as NVIDIA's) under its own RIM root. Nothing is special-cased
in verification: the evidence verifies only when :meth:`SimulatedGpu.trust` adds its two roots
to the anchors (the claims then say ``root: simulated``, which a policy accepts only with
``insecure_allow_simulated``), and is otherwise refused as "untrusted root (simulated)".

Time is a parameter (``now``): certificates, OCSP responses and RIM chains are dated from it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509 import ocsp
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from shieldml.attest import _der, iso_utc
from shieldml.attest._nvidia import FWID_OID
from shieldml.attest._spdm import (
    GET_MEASUREMENTS,
    MEASUREMENTS,
    SPDM_VERSION,
    GpuReport,
    MeasurementBlock,
    OpaqueField,
    SpdmRequest,
    SpdmResponse,
)
from shieldml.attest._trust import TrustAnchors
from shieldml.attest._x509 import cn
from shieldml.errors import ExpiredError, FormatError, InputReadError

ORG = "shieldml simulated"
SWID_NS = "http://standards.iso.org/iso/19770/-2/2015/schema.xsd"
HASH_NS = "http://www.w3.org/2001/04/xmlenc#sha384"
TCG_NS = "https://trustedcomputinggroup.org/resource/tcg-reference-integrity-manifest-rim-information-model/"
#: RIM indices NVIDIA's Hopper RIMs mark active: VBIOS 0-6 and 8-12, driver 7 and 21-40
VBIOS_INDICES = (*range(7), *range(8, 13))
DRIVER_INDICES = (7, *range(21, 41))


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORG),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP384R1())


@dataclass
class _Ca:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate


def _issue(
    common_name: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: _Ca | None,
    now: datetime,
    *,
    ca: bool,
    days: int,
    extensions: tuple[x509.ExtensionType, ...] = (),
) -> _Ca:
    subject = _name(common_name)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.cert.subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    for ext in extensions:
        builder = builder.add_extension(ext, critical=False)
    signer = issuer.key if issuer else key
    return _Ca(key, builder.sign(signer, hashes.SHA384()))


def _rim_chain(now: datetime, *, signer_days: int, ca_days: int = 730) -> list[_Ca]:
    """The RIM signer, its L3 and GH100 CAs and the RIM root (signer first)."""
    rim_root = _issue(
        "NVIDIA CoRIM signing Root CA", _key(), None, now, ca=True, days=max(3650, ca_days)
    )
    rim_ca = _issue("NVIDIA Reference Value GH100 CA", _key(), rim_root, now, ca=True, days=ca_days)
    rim_l3 = _issue(
        "NVIDIA Reference Value L3 GH100 001", _key(), rim_ca, now, ca=True, days=ca_days
    )
    signer = _issue("HCC RIM L4 Signer", _key(), rim_l3, now, ca=False, days=signer_days)
    return [signer, rim_l3, rim_ca, rim_root]


@dataclass
class SimulatedGpu:
    """One simulated Hopper GPU (in CC mode) with its chains; see the module docstring."""

    now: datetime
    driver_version: str = "550.90.07"
    vbios_version: str = "96.00.9F.00.01"
    project: str = "1010"
    project_sku: str = "0200"
    chip_sku: str = "882"
    chip: str = "GH100"  # the device certificates' chip name (GH100 = Hopper)
    nvdec0: int = 0x55  # opaque NVDEC0_STATUS: 0x55 disabled, 0xAA enabled
    measurements: dict[int, bytes] = field(default_factory=dict)  # by RIM index (0-based)
    chain: list[_Ca] = field(default_factory=list)
    rim_chain: list[_Ca] = field(default_factory=list)
    fwid: bytes = b""

    def __post_init__(self) -> None:
        if not self.measurements:
            self.measurements = {
                i: hashlib.sha384(b"shieldml simulated GPU measurement %d" % i).digest()
                for i in range(64)
            }
        if not self.fwid:
            self.fwid = hashlib.sha384(b"shieldml simulated GPU FMC").digest()
        if not self.chain:
            self.chain = self._device_chain(self.now, [])
        if not self.rim_chain:
            self.rim_chain = _rim_chain(self.now, signer_days=365)

    def _device_chain(self, now: datetime, cas: list[_Ca], days: int = 3650) -> list[_Ca]:
        """leaf, BROM, provisioner ICA, identity CA, root; ``cas`` = [ICA, identity, root] to
        issue under (GPUs of one family share them), else new ones."""
        if not cas:
            root = _issue("NVIDIA Device Identity CA", _key(), None, now, ca=True, days=days)
            ident = _issue("NVIDIA GH100 Identity", _key(), root, now, ca=True, days=days)
            ica = _issue("NVIDIA GH100 Provisioner ICA 1", _key(), ident, now, ca=True, days=days)
            cas = [ica, ident, root]
        brom = _issue(f"{self.chip} A01 GSP BROM", _key(), cas[0], now, ca=True, days=days)
        tcb = _der.encode_seq(
            _der.encode_int(1),
            _der.encode_seq(_der.encode_oid("2.16.840.1.101.3.4.2.2"), _der.encode(4, self.fwid)),
        )
        fwid_ext = x509.UnrecognizedExtension(x509.ObjectIdentifier(FWID_OID), tcb)
        leaf = _issue(
            f"{self.chip} A01 GSP FMC LF",
            _key(),
            brom,
            now,
            ca=False,
            days=days,
            extensions=(fwid_ext,),
        )
        return [leaf, brom, *cas]

    @classmethod
    def family(cls, count: int, now: datetime, *, days: int = 3650) -> list[SimulatedGpu]:
        """``count`` GPUs of one make, as in one machine: one device root, identity CA and
        provisioner ICA, one RIM chain; each GPU its own BROM and FMC certificates (and
        keys). Everything is valid from ``now`` - 1 day for ``days``."""
        rim_chain = _rim_chain(now, signer_days=days, ca_days=days)
        out: list[SimulatedGpu] = []
        for _ in range(count):
            # a placeholder chain keeps __post_init__ from issuing one, replaced at once
            g = cls(now=now, chain=rim_chain, rim_chain=rim_chain)
            g.chain = g._device_chain(now, out[0].chain[2:] if out else [], days)
            out.append(g)
        return out

    # -- keeping ----------------------------------------------------------------------------
    def to_json(self) -> dict[str, object]:
        """The GPU's make, keys and certificates (not its versions or measurements, which a
        run chooses), for :func:`open_gpus`."""

        def kept(chain: list[_Ca]) -> list[dict[str, str]]:
            return [
                {
                    "key": c.key.private_bytes(
                        serialization.Encoding.PEM,
                        serialization.PrivateFormat.PKCS8,
                        serialization.NoEncryption(),
                    ).decode(),
                    "cert": c.cert.public_bytes(serialization.Encoding.PEM).decode(),
                }
                for c in chain
            ]

        return {
            "chip": self.chip,
            "fwid": self.fwid.hex(),
            "chain": kept(self.chain),
            "rim_chain": kept(self.rim_chain),
        }

    @classmethod
    def from_json(cls, doc: dict[str, object], now: datetime, where: str) -> SimulatedGpu:
        def loaded(items: object, size: int) -> list[_Ca]:
            if not isinstance(items, list) or len(items) != size:
                raise FormatError(f"{where}: a simulated GPU chain needs {size} certificates")
            out = []
            for item in items:
                key = serialization.load_pem_private_key(item["key"].encode(), None)
                if not isinstance(key, ec.EllipticCurvePrivateKey):
                    raise FormatError(f"{where}: a simulated GPU key is not an EC key")
                out.append(_Ca(key, x509.load_pem_x509_certificate(item["cert"].encode())))
            return out

        try:
            return cls(
                now=now,
                chip=str(doc["chip"]),
                fwid=bytes.fromhex(str(doc["fwid"])),
                chain=loaded(doc["chain"], 5),
                rim_chain=loaded(doc["rim_chain"], 4),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise FormatError(f"{where}: not a kept simulated GPU ({e})") from None

    # -- trust ----------------------------------------------------------------------------
    @property
    def root(self) -> x509.Certificate:
        return self.chain[-1].cert

    @property
    def rim_root(self) -> x509.Certificate:
        return self.rim_chain[-1].cert

    def trust(self, anchors: TrustAnchors | None = None) -> TrustAnchors:
        """``anchors`` (default: the pinned roots) plus this GPU's device and RIM roots."""
        return (anchors or TrustAnchors()).with_simulated(self.root).with_simulated(self.rim_root)

    def certificates(self) -> list[x509.Certificate]:
        return [c.cert for c in self.chain]

    def chain_pem(self) -> bytes:
        return b"".join(c.cert.public_bytes(serialization.Encoding.PEM) for c in self.chain)

    # -- evidence -------------------------------------------------------------------------
    def _opaque(self) -> tuple[OpaqueField, ...]:
        parts = [int(p, 16) for p in self.vbios_version.split(".")]
        vbios = bytes([parts[3], parts[2], parts[1], parts[0], parts[4], 0, 0, 0])
        return (
            OpaqueField(3, self.driver_version.encode() + b"\0"),
            OpaqueField(6, vbios),
            OpaqueField(11, bytes([self.nvdec0])),
            OpaqueField(15, self.chip_sku.encode().ljust(9, b"\0")),
            OpaqueField(17, self.project.encode() + b"\0"),
            OpaqueField(18, self.project_sku.encode() + b"\0"),
            OpaqueField(20, self.fwid),
            OpaqueField(34, (1).to_bytes(2, "little")),
            OpaqueField(36, (0).to_bytes(2, "little")),
        )

    def report(self, nonce: bytes) -> bytes:
        """An attestation report (request ‖ signed response) for ``nonce`` (32 bytes)."""
        request = SpdmRequest(SPDM_VERSION, GET_MEASUREMENTS, 0x01, 0xFF, nonce, 0)
        blocks = tuple(
            MeasurementBlock(i + 1, 1, 1, v) for i, v in sorted(self.measurements.items())
        )
        unsigned = SpdmResponse(
            SPDM_VERSION, MEASUREMENTS, 0, 0, blocks, hashlib.sha256(nonce).digest(),
            self._opaque(), bytes(96),
        )  # fmt: skip
        message = request.to_bytes() + unsigned.unsigned_bytes()
        der = self.chain[0].key.sign(message, ec.ECDSA(hashes.SHA384()))
        r, s = decode_dss_signature(der)
        signature = r.to_bytes(48, "big") + s.to_bytes(48, "big")
        out = message + signature
        GpuReport.from_bytes(out)  # what it issues parses
        return out

    # -- OCSP -----------------------------------------------------------------------------
    def ocsp(
        self,
        position: int,
        *,
        status: str = "good",
        produced: datetime | None = None,
        valid_for: timedelta = timedelta(days=7),
        rim: bool = False,
        reason: x509.ReasonFlags | None = None,
        signer: ec.EllipticCurvePrivateKey | None = None,
        delegate: str | None = None,
    ) -> bytes:
        """A DER OCSP response for the certificate at ``position`` of the device chain (or the
        RIM chain), signed by its issuer (or by ``signer``, for tests of forged responses; or,
        with ``delegate`` = ``"ocsp-signing"`` / ``"no-eku"``, by a responder certificate the
        issuer signed, with or without the OCSP-signing extended key usage)."""
        chain = self.rim_chain if rim else self.chain
        cert, issuer = chain[position], chain[position + 1]
        at = produced or self.now
        states = {
            "good": ocsp.OCSPCertStatus.GOOD,
            "revoked": ocsp.OCSPCertStatus.REVOKED,
            "unknown": ocsp.OCSPCertStatus.UNKNOWN,
        }
        builder = ocsp.OCSPResponseBuilder().add_response(
            cert=cert.cert,
            issuer=issuer.cert,
            algorithm=hashes.SHA384(),
            cert_status=states[status],
            this_update=at,
            next_update=at + valid_for,
            revocation_time=at - timedelta(hours=1) if status == "revoked" else None,
            revocation_reason=reason if status == "revoked" else None,
        )
        if delegate is not None:
            eku = (
                (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.OCSP_SIGNING]),)
                if delegate == "ocsp-signing"
                else ()
            )
            resp_ca = _Ca(issuer.key, issuer.cert)
            responder = _issue("NVIDIA OCSP Responder", _key(), resp_ca, self.now, ca=False,
                               days=30, extensions=eku)  # fmt: skip
            builder = builder.responder_id(ocsp.OCSPResponderEncoding.HASH, responder.cert)
            resp = builder.certificates([responder.cert]).sign(responder.key, hashes.SHA384())
        elif signer is None:
            builder = builder.responder_id(ocsp.OCSPResponderEncoding.HASH, issuer.cert)
            resp = builder.sign(issuer.key, hashes.SHA384())
        else:  # a forger's own "responder" certificate, named like the issuer
            fake = _issue(cn(issuer.cert.subject), signer, None, self.now, ca=True, days=30)
            builder = builder.responder_id(ocsp.OCSPResponderEncoding.HASH, fake.cert)
            resp = builder.certificates([fake.cert]).sign(signer, hashes.SHA384())
        return resp.public_bytes(serialization.Encoding.DER)

    def ocsp_all(self, **kw: object) -> list[bytes]:
        """Good responses for every CA certificate of the device chain and the RIM chain."""
        out = [self.ocsp(i, **kw) for i in range(1, len(self.chain) - 1)]  # type: ignore[arg-type]
        out += [self.ocsp(i, rim=True, **kw) for i in range(len(self.rim_chain) - 1)]  # type: ignore[arg-type]
        return out

    # -- RIMs -----------------------------------------------------------------------------
    def rim(self, kind: str, *, golden: dict[int, bytes] | None = None) -> bytes:
        """A signed driver or VBIOS RIM whose golden values are this GPU's (or ``golden``)."""
        from lxml import etree
        from signxml import methods
        from signxml.algorithms import CanonicalizationMethod, DigestAlgorithm, SignatureMethod
        from signxml.signer import XMLSigner

        version = self.vbios_version if kind == "vbios" else self.driver_version
        indices = VBIOS_INDICES if kind == "vbios" else DRIVER_INDICES
        values = {**self.measurements, **(golden or {})}
        root = etree.Element(
            f"{{{SWID_NS}}}SoftwareIdentity", nsmap={None: SWID_NS, "ns2": HASH_NS}
        )
        root.set("name", "GH100")
        root.set("tagId", hashlib.sha384(f"{kind} {version}".encode()).hexdigest())
        root.set("version", "1.0")
        meta = etree.SubElement(root, f"{{{SWID_NS}}}Meta", nsmap={"ns1": TCG_NS})
        meta.set("colloquialVersion", version)
        meta.set("edition", "GPU")
        meta.set("product", "GH100")
        meta.set(f"{{{TCG_NS}}}FirmwareManufacturerId", "5703")
        payload = etree.SubElement(root, f"{{{SWID_NS}}}Payload")
        for i in range(64):
            res = etree.SubElement(payload, f"{{{SWID_NS}}}Resource")
            res.set("type", "Measurement")
            res.set("index", str(i))
            res.set("active", "True" if i in indices else "False")
            res.set("alternatives", "1")
            res.set(f"{{{HASH_NS}}}Hash0", values.get(i, bytes(48)).hex())
            res.set("name", f"Measurement_{i}")
            res.set("size", "48")
        signer = XMLSigner(
            method=methods.enveloped,
            signature_algorithm=SignatureMethod.ECDSA_SHA384,
            digest_algorithm=DigestAlgorithm.SHA384,
            c14n_algorithm=CanonicalizationMethod.CANONICAL_XML_1_1,
        )
        key = self.rim_chain[0].key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        certs = [c.cert.public_bytes(serialization.Encoding.PEM).decode() for c in self.rim_chain]
        signed = signer.sign(root, key=key, cert=certs)
        out: bytes = etree.tostring(signed)
        return out


#: how many GPUs a kept simulated platform has (a run uses the first ``[simulated] gpus``)
KEPT_GPUS = 16
GPUS_FILE = "gpus.json"


def open_gpus(
    directory: str | os.PathLike[str], *, clock: Callable[[], datetime]
) -> list[SimulatedGpu]:
    """The simulated GPUs kept in ``directory`` (a simulated platform's), made there on first
    use: :data:`KEPT_GPUS` GPUs of one family, valid for ten years from ``clock()``. Several
    processes (a runner, brokers) may open it at once: the first to link its file in wins, and
    the others load that one. A kept family whose certificates do not cover ``clock()`` is
    refused (its evidence could not verify). Each GPU's ``now`` is ``clock()``."""
    d = Path(directory)
    path = d / GPUS_FILE
    now = clock()
    if not path.exists():
        family = SimulatedGpu.family(KEPT_GPUS, now)
        try:
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd, tmp = tempfile.mkstemp(prefix=".gpus-", dir=d)
        except OSError as e:
            raise InputReadError(
                f"{d}: cannot keep simulated GPUs there: {e.strerror}",
                hint="a simulated platform directory the process can write, or one that already "
                "holds gpus.json",
            ) from None
        try:
            with os.fdopen(fd, "w") as f:
                json.dump({"gpus": [g.to_json() for g in family]}, f)
                f.flush()
                os.fsync(f.fileno())
            with contextlib.suppress(FileExistsError):  # another process kept its family first
                os.link(tmp, path)
        finally:
            Path(tmp).unlink()
    try:
        doc = json.loads(path.read_text())
        items = doc["gpus"]
        if not isinstance(items, list) or not items:
            raise TypeError("no GPUs")
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as e:
        raise FormatError(f"{path}: not a kept simulated GPU family ({e})") from None
    gpus = [SimulatedGpu.from_json(g, now, str(path)) for g in items]
    for g in gpus:
        for c in (*g.chain, *g.rim_chain):
            start, end = c.cert.not_valid_before_utc, c.cert.not_valid_after_utc
            if not start <= now <= end:
                raise ExpiredError(
                    str(path),
                    f"the simulated GPU certificate {cn(c.cert.subject)!r} is valid "
                    f"{iso_utc(start)} .. {iso_utc(end)}, but the clock reads {iso_utc(now)}",
                    hint=f"remove {path} to make new simulated GPUs",
                )
    return gpus


def responder_key() -> ec.EllipticCurvePrivateKey:
    """A key no certificate of the GPU's chains belongs to (to forge OCSP responses with)."""
    return _key()


__all__ = ["KEPT_GPUS", "SimulatedGpu", "open_gpus", "responder_key"]
