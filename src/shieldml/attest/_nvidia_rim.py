"""NVIDIA reference integrity manifests (RIMs): signed golden measurements for driver and VBIOS.

A RIM is an ISO/IEC 19770-2:2015 SWID tag: ``Meta`` gives the version (``colloquialVersion``)
and product (GH100, GB100, LS10); ``Payload`` lists ``Resource type="Measurement"`` elements
with a 0-based ``index``, ``active``, ``alternatives`` N, ``size`` and ``Hash0``..``Hash{N-1}``
(SHA-384, hex) in namespace ``http://www.w3.org/2001/04/xmlenc#sha384``. It is signed with an
enveloped XML-DSig (C14N 1.1, ECDSA-SHA384, SHA-384 digest) whose ``KeyInfo`` carries the
signer's chain, leaf first, ending at the "NVIDIA CoRIM signing Root CA".

Verification (:func:`verify_rim`), in this order:
 1. parse (bounded size, no DTD, no entities, no network)              FormatError
 2. the embedded chain: every link signed by the next, the last one
    the pinned NVIDIA RIM root, each valid at the verification time     UntrustedRootError / ExpiredError
 3. OCSP responses for the chain (collateral), when given               RevokedError
 4. the XML-DSig with the chain's leaf (signxml), ECDSA-SHA384 only      AttestationError
 5. the measurements are read from what the signature covers, never
    from the document as given.

The comparison with a report (:func:`compare`) is separate: RIM index *i* is SPDM block *i+1*;
every active golden measurement must equal the runtime value of its index (any alternative,
with the declared size), but index 35 (NVDEC0's firmware) when the signed report says NVDEC0 is
disabled, as NVIDIA's verifiers do; a driver and a VBIOS RIM may not both claim one index.

``signxml`` and ``lxml`` are the ``[gpu]`` extra (part of ``[broker]``): a verifier needs them,
the runner inside the TEE does not.
"""

from __future__ import annotations

import base64
import binascii
import itertools
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from cryptography import x509

from shieldml.attest import _certs
from shieldml.attest._checks import CheckLog
from shieldml.attest._claims import iso_utc
from shieldml.attest._ocsp import OcspStatus, check_ocsp
from shieldml.attest._trust import RootKind, TrustAnchors, Vendor
from shieldml.attest._x509 import cn, verify_chain
from shieldml.errors import AttestationError, FormatError, MeasurementError

MAX_RIM = 256 * 1024
MAX_MEASUREMENTS = 256
MAX_ALTERNATIVES = 16
SWID_NS = "http://standards.iso.org/iso/19770/-2/2015/schema.xsd"
HASH_NS = "http://www.w3.org/2001/04/xmlenc#sha384"
DSIG_NS = "http://www.w3.org/2000/09/xmldsig#"


def _xml() -> tuple[Any, Any]:
    try:
        from lxml import etree
        from signxml.verifier import XMLVerifier
    except ImportError as e:  # pragma: no cover - depends on the installation
        raise AttestationError(
            "RIM",
            "verifying NVIDIA RIMs needs signxml and lxml",
            hint="pip install 'shieldml[gpu]'",
        ) from e
    return etree, XMLVerifier


def _parser() -> Any:
    etree, _ = _xml()
    return etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False, huge_tree=False)


@dataclass(frozen=True)
class GoldenMeasurement:
    index: int  # 0-based RIM index = SPDM block index - 1
    name: str
    active: bool
    size: int
    values: tuple[bytes, ...]  # the alternatives


def _measurements(root: Any) -> tuple[GoldenMeasurement, ...]:
    out: list[GoldenMeasurement] = []
    seen: set[int] = set()
    resources = root.findall(f"{{{SWID_NS}}}Payload/{{{SWID_NS}}}Resource")
    if len(resources) > MAX_MEASUREMENTS:
        raise FormatError(f"RIM lists more than {MAX_MEASUREMENTS} measurements")
    for res in resources:
        if res.get("type") != "Measurement":
            continue
        try:
            index = int(res.get("index", ""))
            n = int(res.get("alternatives", ""))
            size = int(res.get("size", ""))
        except ValueError:
            raise FormatError("RIM measurement has a bad index, alternatives or size") from None
        active = res.get("active")
        if active not in ("True", "False"):
            raise FormatError(f"RIM measurement {index}: active is {active!r}, not True/False")
        if not 0 <= index < MAX_MEASUREMENTS or index in seen:
            raise FormatError(f"RIM measurement index {index} out of range or repeated")
        if not 1 <= n <= MAX_ALTERNATIVES or not 0 < size <= 64:
            raise FormatError(f"RIM measurement {index}: bad alternatives {n} or size {size}")
        seen.add(index)
        values = []
        for k in range(n):
            raw = res.get(f"{{{HASH_NS}}}Hash{k}")
            if raw is None:
                raise FormatError(f"RIM measurement {index}: Hash{k} missing")
            try:
                values.append(bytes.fromhex(raw))
            except ValueError:
                raise FormatError(f"RIM measurement {index}: Hash{k} is not hex") from None
        out.append(
            GoldenMeasurement(index, res.get("name", ""), active == "True", size, tuple(values))
        )
    return tuple(out)


@dataclass(frozen=True)
class Rim:
    """An unverified RIM: what it says about itself, and the chain it embeds."""

    raw: bytes
    tag_id: str
    version: str
    product: str
    edition: str
    manufacturer_id: str
    measurements: tuple[GoldenMeasurement, ...]
    chain: tuple[x509.Certificate, ...]

    @classmethod
    def from_bytes(cls, data: bytes) -> Rim:
        data = bytes(data)
        if len(data) > MAX_RIM:
            raise FormatError(f"RIM too large ({len(data)} bytes)")
        if b"<!DOCTYPE" in data or b"<!ENTITY" in data:
            raise FormatError("RIM has a DTD (not allowed)")
        etree, _ = _xml()
        try:
            root = etree.fromstring(data, _parser())
        except etree.XMLSyntaxError as e:
            raise FormatError(f"RIM is not XML: {e}") from None
        return cls._from_element(data, root)

    @classmethod
    def _from_element(
        cls, raw: bytes, root: Any, chain: tuple[x509.Certificate, ...] | None = None
    ) -> Rim:
        if root.tag != f"{{{SWID_NS}}}SoftwareIdentity":
            raise FormatError("not a SWID tag (SoftwareIdentity)")
        meta = root.find(f"{{{SWID_NS}}}Meta")
        if meta is None or not meta.get("colloquialVersion"):
            raise FormatError("RIM has no Meta colloquialVersion")
        tcg = "https://trustedcomputinggroup.org/resource/tcg-reference-integrity-manifest-rim-information-model/"
        certs: list[x509.Certificate] = []
        for el in root.iterfind(f"{{{DSIG_NS}}}Signature//{{{DSIG_NS}}}X509Certificate"):
            if len(certs) >= 5:
                raise FormatError("RIM embeds more than 5 certificates")
            try:
                certs.append(
                    _certs.der_certificate(base64.b64decode(el.text or "", validate=False))
                )
            except (ValueError, binascii.Error) as e:
                raise FormatError(f"RIM embeds a certificate that does not parse: {e}") from None
        return cls(
            raw=raw,
            tag_id=root.get("tagId", ""),
            version=meta.get("colloquialVersion"),
            product=meta.get("product", ""),
            edition=meta.get("edition", ""),
            manufacturer_id=meta.get(f"{{{tcg}}}FirmwareManufacturerId", ""),
            measurements=_measurements(root),
            chain=tuple(certs) if chain is None else chain,
        )

    @property
    def kind(self) -> str:
        """``vbios`` (five two-digit hex groups: 96.00.5E.00.01) or ``driver`` (550.90.07)."""
        parts = self.version.split(".")
        if len(parts) == 5 and all(len(p) == 2 for p in parts):
            return "vbios"
        return "driver"

    def active(self) -> dict[int, GoldenMeasurement]:
        return {m.index: m for m in self.measurements if m.active}


@dataclass(frozen=True)
class VerifiedRim:
    rim: Rim
    root: RootKind
    valid_from: datetime
    valid_until: datetime
    ocsp: tuple[OcspStatus, ...]

    def to_dict(self) -> dict[str, object]:
        return {
            "kind": self.rim.kind,
            "version": self.rim.version,
            "product": self.rim.product,
            "tag_id": self.rim.tag_id,
            "signer": cn(self.rim.chain[0].subject),
            "valid_from": iso_utc(self.valid_from),
            "valid_until": iso_utc(self.valid_until),
            "root": self.root.value,
            "ocsp": [o.to_dict() for o in self.ocsp],
        }


def verify_rim(
    data: bytes,
    *,
    now: datetime,
    trust: TrustAnchors,
    log: CheckLog,
    ocsp_responses: list[Any] | None = None,
    what: str = "RIM",
) -> VerifiedRim:
    """Parse ``data``, check its chain to the pinned RIM root at ``now`` and its signature; the
    returned :class:`Rim` is built from the signed XML only."""
    try:
        unsigned = Rim.from_bytes(data)
    except FormatError as e:
        raise log.fail(AttestationError("RIM format", f"{what}: {e.message}")) from None
    what = f"{unsigned.kind} RIM {unsigned.version}"
    if len(unsigned.chain) < 2:
        raise log.fail(
            AttestationError(
                "RIM chain",
                f"{what}: the signature embeds {len(unsigned.chain)} certificate(s); "
                "its signer's chain to the RIM root is needed",
            )
        )
    root = verify_chain(list(unsigned.chain), Vendor.NVIDIA_RIM, trust, now, log, f"{what} chain")
    statuses = (
        tuple(
            check_ocsp(cert, issuer, ocsp_responses, now, log, f"{what} chain")
            for cert, issuer in itertools.pairwise(unsigned.chain)
        )
        if ocsp_responses is not None
        else tuple(
            OcspStatus(cn(c.subject), c.serial_number, "not checked") for c in unsigned.chain[:-1]
        )
    )
    if ocsp_responses is None:
        log.ok("OCSP", f"{what} chain: revocation not checked (no OCSP responses given)")
    signed = _verify_signature(data, unsigned.chain[0], now, log, what)
    try:  # what is used is what was signed; the chain (KeyInfo) is outside it, verified above
        rim = Rim._from_element(data, signed, chain=unsigned.chain)
    except FormatError as e:
        raise log.fail(AttestationError("RIM format", f"{what}: {e.message}")) from None
    start = max(c.not_valid_before_utc for c in rim.chain)
    end = min(c.not_valid_after_utc for c in rim.chain)
    return VerifiedRim(rim, root, start, end, statuses)


def _verify_signature(
    data: bytes, leaf: x509.Certificate, now: datetime, log: CheckLog, what: str
) -> Any:
    etree, verifier_cls = _xml()
    from signxml.algorithms import DigestAlgorithm, SignatureMethod
    from signxml.exceptions import InvalidInput, InvalidSignature
    from signxml.verifier import SignatureConfiguration

    config = SignatureConfiguration(
        location="./",
        signature_methods=frozenset({SignatureMethod.ECDSA_SHA384}),
        digest_algorithms=frozenset({DigestAlgorithm.SHA384}),
        expect_references=1,
        verification_time=now,
    )
    try:
        result = verifier_cls().verify(data, x509_cert=leaf, expect_config=config, parser=_parser())
    except (InvalidSignature, InvalidInput, etree.XMLSyntaxError, ValueError) as e:
        raise log.fail(
            AttestationError(
                "RIM signature",
                f"{what}: XML signature does not verify with '{cn(leaf.subject)}'",
                found=f"{type(e).__name__}: {str(e)[:200]}",
                hint="the RIM was edited after NVIDIA signed it; fetch it again from NVIDIA's RIM service",
            )
        ) from None
    log.ok("RIM signature", f"{what}: XML-DSig (ECDSA-SHA384) by '{cn(leaf.subject)}'")
    return result.signed_xml


@dataclass(frozen=True)
class Mismatch:
    index: int
    rim: str
    expected: tuple[str, ...]
    found: str | None

    def __str__(self) -> str:
        return (
            f"index {self.index} ({self.rim}): expected {' or '.join(self.expected)}, "
            f"found {self.found or 'no runtime measurement'}"
        )


#: the RIM index of the NVDEC0 engine's firmware, not compared when the signed report says the
#: engine is disabled (opaque NVDEC0_STATUS 0x55), as NVIDIA's verifiers do
NVDEC_INDEX = 35


def compare(
    runtime: dict[int, bytes], rims: list[Rim], *, skip: frozenset[int] = frozenset()
) -> list[Mismatch]:
    """Every active golden measurement of ``rims`` against the runtime values (RIM index),
    but those in ``skip``; :class:`MeasurementError` when two RIMs claim one index."""
    golden: dict[int, tuple[GoldenMeasurement, Rim]] = {}
    for rim in rims:
        for index, m in rim.active().items():
            if index in golden:
                other = golden[index][1]
                raise MeasurementError(
                    "RIM measurements",
                    f"index {index} is active in both the {other.kind} RIM {other.version} and "
                    f"the {rim.kind} RIM {rim.version}",
                )
            golden[index] = (m, rim)
    out = []
    for index in sorted(golden):
        if index in skip:
            continue
        m, rim = golden[index]
        value = runtime.get(index)
        if value is None or len(value) != m.size or value not in m.values:
            out.append(
                Mismatch(
                    index,
                    f"{rim.kind} {rim.version}",
                    tuple(v.hex() for v in m.values),
                    value.hex() if value is not None else None,
                )
            )
    return out
