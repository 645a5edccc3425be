"""AMD SEV-SNP attestation reports (versions 2, 3, 5): parse, then verify against the VCEK chain.

Layout: ``shared/docs/specs/attestation-evidence.md`` §4.8 (AMD SEV-SNP ABI 56860, Table 22).

Verification pipeline:
 1. parse the report (1184 bytes; or inside an Azure HCL report)     FormatError
 2. signing key: VCEK or VLEK; the endorsement certificate           CollateralError
 3. VCEK/VLEK <- ASK/ASVK <- ARK, RSA-PSS, ARK pinned, valid at now    UntrustedRootError / ExpiredError
 3b. AMD's CRL (KDS ``crl``, signed by the ARK) when given, or from    RevokedError / ExpiredError
    ``crl_for`` once the chain verified: current, and the ASK/ASVK not
    on it; without one the claims say so (``platform["revocation"]``)
 4. report signature: ECDSA P-384 / SHA-384 over bytes 0x000-0x29F    AttestationError
 5. REPORTED_TCB equals the certificate's SPL extensions              AttestationError
 6. CHIP_ID equals the VCEK's hwID (VCEK only)                        AttestationError
"""

from __future__ import annotations

import struct
import uuid
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from shieldml.attest import _certs, _der
from shieldml.attest._checks import CheckLog, VerificationCache
from shieldml.attest._claims import Claims, SnpMeasurements
from shieldml.attest._tee import TeeKind
from shieldml.attest._trust import TrustAnchors, Vendor
from shieldml.attest._x509 import check_crl, cn, verify_chain
from shieldml.errors import AttestationError, CollateralError, FormatError, UnsupportedVersionError

#: a verifier's own source of AMD's CRL: (product, verified ARK, verification time) -> the CRL,
#: or None when it has none
CrlSource = Callable[[str, x509.Certificate, datetime], x509.CertificateRevocationList | None]

REPORT_SIZE = 0x4A0
SIGNED_SIZE = 0x2A0
HCL_OFFSET = 0x20
VERSIONS = (2, 3, 4, 5)
POLICY_DEBUG = 1 << 19
SIG_ALGO_ECDSA_P384_SHA384 = 1
KEY_VCEK, KEY_VLEK = 0, 1
AMD_OID = "1.3.6.1.4.1.3704.1"
MAX_CERT = 16 * 1024

# TCB_VERSION byte positions per generation (spec §4.8)
_TCB_LAYOUT = {
    "Milan": {"bl": 0, "tee": 1, "snp": 6, "ucode": 7},
    "Genoa": {"bl": 0, "tee": 1, "snp": 6, "ucode": 7},
    "Turin": {"fmc": 0, "bl": 1, "tee": 2, "snp": 3, "ucode": 7},
}
#: the AMD product generations this verifier knows (VCEK productName, KDS URL component)
AMD_PRODUCTS = frozenset(_TCB_LAYOUT)
_SPL_OIDS = {"bl": "3.1", "tee": "3.2", "snp": "3.3", "ucode": "3.8", "fmc": "3.9"}


@dataclass(frozen=True)
class SnpReport:
    """An unverified SEV-SNP ATTESTATION_REPORT."""

    raw: bytes

    @classmethod
    def from_bytes(cls, data: bytes) -> SnpReport:
        data = bytes(data)
        if (
            len(data) != REPORT_SIZE
            and data[:4] == b"HCLA"
            and len(data) >= HCL_OFFSET + REPORT_SIZE
        ):
            data = data[HCL_OFFSET : HCL_OFFSET + REPORT_SIZE]  # Azure HCL wrapper
        if len(data) != REPORT_SIZE:
            raise FormatError(f"SEV-SNP report must be {REPORT_SIZE} bytes, not {len(data)}")
        report = cls(data)
        if report.version not in VERSIONS:
            raise UnsupportedVersionError(
                f"SEV-SNP report version {report.version} is not supported"
            )
        if report.signature_algo != SIG_ALGO_ECDSA_P384_SHA384:
            raise FormatError(f"unknown SEV-SNP signature algorithm {report.signature_algo}")
        if any(report.raw[SIGNED_SIZE + 144 :]):
            raise FormatError("SEV-SNP signature reserved bytes are not zero")
        return report

    def to_bytes(self) -> bytes:
        return self.raw

    def _u32(self, off: int) -> int:
        return int.from_bytes(self.raw[off : off + 4], "little")

    def _u64(self, off: int) -> int:
        return int.from_bytes(self.raw[off : off + 8], "little")

    version = property(lambda self: self._u32(0x000))
    guest_svn = property(lambda self: self._u32(0x004))
    policy = property(lambda self: self._u64(0x008))
    family_id = property(lambda self: self.raw[0x010:0x020])
    image_id = property(lambda self: self.raw[0x020:0x030])
    vmpl = property(lambda self: self._u32(0x030))
    signature_algo = property(lambda self: self._u32(0x034))
    current_tcb = property(lambda self: self._u64(0x038))
    platform_info = property(lambda self: self._u64(0x040))
    key_info = property(lambda self: self._u32(0x048))
    report_data = property(lambda self: self.raw[0x050:0x090])
    measurement = property(lambda self: self.raw[0x090:0x0C0])
    host_data = property(lambda self: self.raw[0x0C0:0x0E0])
    id_key_digest = property(lambda self: self.raw[0x0E0:0x110])
    author_key_digest = property(lambda self: self.raw[0x110:0x140])
    report_id = property(lambda self: self.raw[0x140:0x160])
    reported_tcb = property(lambda self: self._u64(0x180))
    cpuid = property(lambda self: (self.raw[0x188], self.raw[0x189], self.raw[0x18A]))
    chip_id = property(lambda self: self.raw[0x1A0:0x1E0])
    committed_tcb = property(lambda self: self._u64(0x1E0))
    launch_tcb = property(lambda self: self._u64(0x1F0))
    signed_bytes = property(lambda self: self.raw[:SIGNED_SIZE])

    @property
    def signing_key(self) -> int:
        return (self._u32(0x048) >> 2) & 0x7

    @property
    def debug(self) -> bool:
        return bool(self.policy & POLICY_DEBUG)

    def generation_from_cpuid(self) -> str | None:
        """Product generation from CPUID (report v3+), or None."""
        if self.version < 3:
            return None
        fam, model, _ = self.cpuid
        if fam == 0x19 and model <= 0x0F:
            return "Milan"
        if fam == 0x19 and (0x10 <= model <= 0x1F or 0xA0 <= model <= 0xAF):
            return "Genoa"
        if fam == 0x1A and model <= 0x11:
            return "Turin"
        return None


# SNP extended-report certificate table (GHCB spec, SNP_GET_EXT_REPORT; configfs-tsm "auxblob"):
# entries of GUID (16 bytes, little-endian mixed as in the spec) + offset u32 + length u32, ended by
# an all-zero entry; offsets are from the start of the table.
CERT_TABLE_GUIDS = {
    "vcek": "63da758d-e664-4564-adc5-f4b93be8accd",
    "vlek": "a8074bc2-a25a-483e-aae6-39c045a0b8a1",
    "ask": "4ab7b379-bbac-4fe4-a02f-05aef327c782",
    "ark": "c0b406a4-a803-4952-9743-3fb6014cd0ae",
}
_TABLE_ENTRY = struct.Struct("<16sII")
MAX_TABLE_ENTRIES = 16


def parse_cert_table(blob: bytes) -> dict[str, bytes]:
    """The certificates an SEV-SNP extended report carries, by name (vcek, vlek, ask, ark)."""

    names = {uuid.UUID(v).bytes_le: k for k, v in CERT_TABLE_GUIDS.items()}
    out: dict[str, bytes] = {}
    for i in range(MAX_TABLE_ENTRIES + 1):
        pos = i * _TABLE_ENTRY.size
        if pos + _TABLE_ENTRY.size > len(blob):
            raise FormatError("SEV-SNP certificate table is not terminated")
        guid, offset, length = _TABLE_ENTRY.unpack_from(blob, pos)
        if guid == bytes(16) and offset == 0 and length == 0:
            return out
        if offset + length > len(blob) or length > MAX_CERT:
            raise FormatError("SEV-SNP certificate table entry runs past the end")
        name = names.get(guid)
        if name is not None:
            out[name] = blob[offset : offset + length]
    raise FormatError(f"SEV-SNP certificate table has more than {MAX_TABLE_ENTRIES} entries")


def build_cert_table(certs: dict[str, bytes]) -> bytes:
    """The inverse of :func:`parse_cert_table` (used by the simulated platform)."""

    header = _TABLE_ENTRY.size * (len(certs) + 1)
    entries, body = b"", b""
    for name, der in certs.items():
        entries += _TABLE_ENTRY.pack(
            uuid.UUID(CERT_TABLE_GUIDS[name]).bytes_le, header + len(body), len(der)
        )
        body += der
    return entries + bytes(_TABLE_ENTRY.size) + body


def load_certificate(data: bytes) -> x509.Certificate:
    """A DER or PEM certificate; AMD's serial-0 VCEKs load without a warning escaping."""
    if len(data) > MAX_CERT:
        raise FormatError("certificate too large")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*serial number.*")
        try:
            if data.lstrip().startswith(b"-----BEGIN"):
                return _certs.pem_certificate(data)
            return _certs.der_certificate(data)
        except ValueError as e:
            raise FormatError(f"not a certificate: {e}") from e


@dataclass(frozen=True)
class Endorsement:
    """What a VCEK/VLEK certifies: its generation, TCB SPLs and (VCEK) hardware id."""

    product: str
    spl: dict[str, int]
    hwid: bytes | None

    @classmethod
    def from_certificate(cls, cert: x509.Certificate) -> Endorsement:
        exts: dict[str, bytes] = {}
        for ext in cert.extensions:
            oid = ext.oid.dotted_string
            if oid.startswith(AMD_OID + "."):
                exts[oid[len(AMD_OID) + 1 :]] = getattr(ext.value, "value", b"")
        name = exts.get("2")
        if name is None:
            raise FormatError("VCEK/VLEK has no productName extension")
        tag, value, _ = _der.read_tlv(name, 0)
        if tag != _der.IA5STRING:
            raise FormatError("VCEK productName is not an IA5String")
        product = value.decode("ascii", errors="replace").split("-")[0]
        if product not in _TCB_LAYOUT:
            raise FormatError(f"unknown AMD product {product!r}")
        spl = {}
        for field, suffix in _SPL_OIDS.items():
            raw = exts.get(suffix)
            if raw is not None:
                tag, value, _ = _der.read_tlv(raw, 0)
                if tag != _der.INTEGER:
                    raise FormatError(f"VCEK {field} SPL is not an INTEGER")
                spl[field] = _der.decode_int(value)
        hwid = exts.get("4")
        if hwid is not None and len(hwid) in (66, 10) and hwid[0] == _der.OCTET_STRING:
            hwid = _der.read_tlv(hwid, 0)[1]  # the variant that wraps hwID in an OCTET STRING
        return cls(product, spl, hwid)


def tcb_parts(tcb: int, product: str) -> dict[str, int]:
    raw = tcb.to_bytes(8, "little")
    return {name: raw[pos] for name, pos in _TCB_LAYOUT[product].items()}


def verify_report(
    raw: bytes,
    endorsement_cert: bytes,
    chain_certs: list[x509.Certificate],
    *,
    now: datetime,
    trust: TrustAnchors,
    cache: VerificationCache | None = None,
    crl: x509.CertificateRevocationList | None = None,
    crl_for: CrlSource | None = None,
) -> Claims:
    """Verify an SEV-SNP report with its VCEK/VLEK and the ASK/ASVK + ARK certificates.

    ``crl`` is AMD's CRL for the product (KDS ``/vcek/v1/{product}/crl``: DER, signed by the
    ARK): when given, it must be current and must not list the ASK/ASVK. It covers what the ARK
    issued, so the VCEK/VLEK (issued by the ASK, AMD serial 0) is not looked up in it; a revoked
    ASK takes every VCEK under it along. Without it the claims say revocation was not checked.

    ``crl_for`` is where a verifier gets the CRL itself when none was given (the broker: its
    cache or AMD's KDS). It is asked only after the VCEK/VLEK chain verified up to a pinned ARK,
    with that product name and ARK, so nobody can make the verifier fetch for a chain it does not
    trust; what it returns is checked like a CRL that came with the evidence.
    """
    log = CheckLog(cache=cache)
    try:  # 1
        report = SnpReport.from_bytes(raw)
        cert = load_certificate(endorsement_cert)
        endorse = Endorsement.from_certificate(cert)
    except FormatError as e:
        raise log.fail(AttestationError("report format", e.message)) from e
    log.ok("report format", f"SEV-SNP report v{report.version}, {endorse.product}")
    kind = {KEY_VCEK: "VCEK", KEY_VLEK: "VLEK"}.get(report.signing_key)  # 2
    if kind is None:
        raise log.fail(
            AttestationError(
                "signing key",
                "report is not signed by a VCEK or VLEK",
                found=f"SIGNING_KEY {report.signing_key}",
            )
        )
    gen = report.generation_from_cpuid()
    if gen is not None and gen != endorse.product:
        raise log.fail(
            CollateralError(
                "signing key",
                f"{kind} is for another product generation",
                expected=gen,
                found=endorse.product,
            )
        )
    ca_name = f"SEV-{endorse.product}" if kind == "VCEK" else f"SEV-VLEK-{endorse.product}"
    ca = next((c for c in chain_certs if cn(c.subject) == ca_name), None)
    ark = next((c for c in chain_certs if cn(c.subject) == f"ARK-{endorse.product}"), None)
    if ca is None or ark is None:
        raise log.fail(
            CollateralError(
                "certificate chain",
                f"need {ca_name} and ARK-{endorse.product} certificates",
                hint="pass the AMD ASK/ARK chain (--cert-chain)",
            )
        )
    root = verify_chain([cert, ca, ark], Vendor.AMD, trust, now, log, f"{kind} chain")  # 3
    if crl is None and crl_for is not None:
        crl = crl_for(endorse.product, ark, now)
    if crl is not None:  # 3b
        check_crl(crl, ark, [ca], now, log, f"AMD CRL of ARK-{endorse.product}")
        revocation = f"checked: {ca_name} is not on the AMD CRL"
    else:
        revocation = "not checked: no AMD CRL given"
        log.ok("revocation list", f"{ca_name} revocation not checked: no AMD CRL given")
    key = cert.public_key()  # 4
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp384r1":
        raise log.fail(AttestationError("report signature", f"{kind} key is not ECDSA P-384"))
    r = int.from_bytes(report.raw[SIGNED_SIZE : SIGNED_SIZE + 72], "little")
    s = int.from_bytes(report.raw[SIGNED_SIZE + 72 : SIGNED_SIZE + 144], "little")
    try:
        key.verify(encode_dss_signature(r, s), report.signed_bytes, ec.ECDSA(hashes.SHA384()))
    except InvalidSignature:
        raise log.fail(
            AttestationError("report signature", f"report is not signed by this {kind}")
        ) from None
    log.ok("report signature", f"report signed by the {kind} (ECDSA P-384)")
    reported = tcb_parts(report.reported_tcb, endorse.product)  # 5
    diffs = [
        f"{k}: report {reported[k]} != {kind} {v}"
        for k, v in endorse.spl.items()
        if k in reported and reported[k] != v
    ]
    if diffs:
        raise log.fail(
            AttestationError(
                "reported TCB",
                f"REPORTED_TCB does not match the {kind}",
                found="; ".join(diffs),
                hint=f"fetch the {kind} for this TCB from AMD's key distribution service",
            )
        )
    log.ok(
        "reported TCB",
        "REPORTED_TCB " + ", ".join(f"{k}={v}" for k, v in reported.items()) + f" = {kind} SPLs",
    )
    if kind == "VCEK":  # 6
        hwid = endorse.hwid or b""
        chip = report.chip_id[: len(hwid)] if len(hwid) == 8 else report.chip_id
        if hwid != chip:
            raise log.fail(
                AttestationError(
                    "chip id",
                    "CHIP_ID does not match the VCEK's hwID",
                    expected=hwid.hex(),
                    found=report.chip_id.hex(),
                )
            )
        log.ok("chip id", "CHIP_ID = VCEK hwID")
    return Claims(
        tee=TeeKind.SNP,
        tcb_status=None,
        advisory_ids=(),
        debug=report.debug,
        report_data=report.report_data,
        measurements=SnpMeasurements(
            measurement=report.measurement,
            host_data=report.host_data,
            guest_policy=report.policy,
            vmpl=report.vmpl,
            guest_svn=report.guest_svn,
            family_id=report.family_id,
            image_id=report.image_id,
            id_key_digest=report.id_key_digest,
            author_key_digest=report.author_key_digest,
            reported_tcb=report.reported_tcb,
            signing_key=kind.lower(),
        ),
        platform={
            "product": endorse.product,
            "chip_id": report.chip_id.hex(),
            **{f"reported_tcb_{k}": str(v) for k, v in reported.items()},
            "revocation": revocation,
        },
        root=root,
        verified_at=now,
        checks=tuple(log.checks),
    )
