"""NVIDIA confidential-computing GPU and NVSwitch evidence: verify offline, get :class:`GpuClaims`.

Evidence is an SPDM GET_MEASUREMENTS request + response (:mod:`shieldml.attest._spdm`) and the
device's certificate chain (leaf first: "GH100 A01 GSP FMC LF" <- "... GSP BROM" <-
"NVIDIA GH100 Provisioner ICA 1" <- "NVIDIA GH100 Identity" <- "NVIDIA Device Identity CA").

Verification pipeline (:func:`verify_gpu_evidence`), every step in the check log:
 1. parse the report and the chain (2..5 certificates)                 AttestationError (format)
 2. chain: each link signed by the next, the root the pinned
    "NVIDIA Device Identity CA" (or an explicitly trusted simulated
    root), each certificate valid at the verification time             UntrustedRootError / ExpiredError
 3. OCSP responses (collateral) for the CA certificates between
    leaf and root, when given: revoked/unknown fail; age recorded        RevokedError
 4. FWID: the leaf's TCG DICE extension holds the firmware id
    (2.23.133.5.4.1: last 48 bytes; Blackwell 2.23.133.5.4.1.1:
    TcbInfo, first fwids digest)                                         AttestationError
    the chip one this verifier knows (GH100, GB100, LS_10)              AttestationError
 5. SPDM signature: ECDSA P-384 / SHA-384 by the leaf's key over
    request ‖ response up to the signature                              AttestationError
 6. the report's FWID (opaque field 20, when present) = the leaf's       AttestationError
 7. the request nonce = the expected nonce, when one is given            AttestationError
 8. RIMs, when given: each verified (chain to the pinned NVIDIA RIM
    root, OCSP, XML-DSig), its version equal to the report's driver
    or VBIOS version, its product the device's; then every active
    golden measurement equal to the runtime block of the same index
    (but NVDEC0's, index 35, when the report says NVDEC0 is disabled)  MeasurementError

Judging what verified (CC mode, versions, OCSP freshness, RIMs required) is the policy's job.
"""

from __future__ import annotations

import base64
import binascii
import itertools
import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from shieldml.attest import _certs, _der
from shieldml.attest._checks import Check, CheckLog, VerificationCache
from shieldml.attest._claims import iso_utc
from shieldml.attest._nvidia_rim import NVDEC_INDEX, Mismatch, VerifiedRim, compare, verify_rim
from shieldml.attest._ocsp import OcspStatus, check_ocsp, load_responses
from shieldml.attest._spdm import NONCE_SIZE, NVDEC_DISABLED, GpuReport
from shieldml.attest._trust import RootKind, TrustAnchors, Vendor, weakest
from shieldml.attest._x509 import MAX_CHAIN, cn, verify_chain
from shieldml.errors import AttestationError, FormatError, MeasurementError

FWID_OID = "2.23.133.5.4.1"  # tcg-dice-TcbInfo (Hopper, LS10: NVIDIA's layout)
FWID_OID_BLACKWELL = "2.23.133.5.4.1.1"  # tcg-dice-TcbInfo as DICE defines it
FWID_SIZE = 48
MAX_CHAIN_PEM = 64 * 1024
#: the leaf issuer's CN prefix -> architecture, RIM product
ARCHITECTURES = {
    "GH100": ("hopper", "GH100"),
    "GB100": ("blackwell", "GB100"),
    "LS_10": ("nvswitch", "LS10"),
}


@dataclass(frozen=True, kw_only=True)
class GpuClaims:
    """Verified facts about one NVIDIA GPU or NVSwitch: identity, firmware versions, OCSP
    results and (when RIMs were given) that every golden measurement matched."""

    arch: str  # hopper, blackwell, nvswitch
    hwmodel: str  # the BROM certificate's CN
    ueid: str  # the leaf certificate's serial, decimal (NVIDIA's ueid claim)
    nonce: bytes
    driver_version: str | None
    vbios_version: str | None
    project: str | None
    project_sku: str | None
    chip_sku: str | None
    fwid: bytes | None
    feature_flag: str | None  # SPT, MPT, PPCIE (None: not in the report)
    nvdec0_enabled: bool | None
    measurements: dict[int, bytes]  # by RIM index
    ocsp: tuple[OcspStatus, ...]
    rims: tuple[VerifiedRim, ...]
    measurements_matched: bool  # True only when RIMs were given and every active index matched
    root: RootKind
    verified_at: datetime
    checks: tuple[Check, ...]
    opaque: dict[str, str] = field(default_factory=dict)
    #: the CC mode the runner read through NVML for this GPU; it is part of the GPU's session
    #: nonce (:func:`shieldml.broker.protocol.gpu_nonce`), so set only by a binding check
    cc_mode: str | None = None

    @property
    def rim_ids(self) -> tuple[str, ...]:
        return tuple(
            vbios_rim_id(self) if r.rim.kind == "vbios" else driver_rim_id(self) for r in self.rims
        )

    def summary(self) -> dict[str, Any]:
        """Identity and versions: what an audit record and a receipt list per GPU."""
        return {
            "arch": self.arch,
            "ueid": self.ueid,
            "hwmodel": self.hwmodel,
            "driver_version": self.driver_version,
            "vbios_version": self.vbios_version,
            "rim_ids": list(self.rim_ids),
            "rim_kinds": sorted({r.rim.kind for r in self.rims}),
            "measurements_matched": self.measurements_matched,
            "cc_mode": self.cc_mode,
            "root": self.root.value,
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "genuine": True,
            "tee": "nvidia-gpu",
            "arch": self.arch,
            "hwmodel": self.hwmodel,
            "ueid": self.ueid,
            "nonce": self.nonce.hex(),
            "driver_version": self.driver_version,
            "vbios_version": self.vbios_version,
            "project": self.project,
            "project_sku": self.project_sku,
            "chip_sku": self.chip_sku,
            "fwid": self.fwid.hex() if self.fwid else None,
            "feature_flag": self.feature_flag,
            "nvdec0_enabled": self.nvdec0_enabled,
            "ocsp": [o.to_dict() for o in self.ocsp],
            "rims": [r.to_dict() for r in self.rims],
            "measurements_matched": self.measurements_matched,
            "rim_ids": list(self.rim_ids),
            "cc_mode": self.cc_mode,
            "root": self.root.value,
            "verified_at": iso_utc(self.verified_at),
            "reasons": [c.detail for c in self.checks],
        }


def vbios_rim_id(c: GpuClaims) -> str:
    """NVIDIA's RIM id for the report's VBIOS: ``NV_GPU_VBIOS_1010_0200_882_96005E0001``."""
    version = (c.vbios_version or "").replace(".", "").upper()
    if c.arch == "nvswitch":  # the report names no project/SKU: the version identifies it
        return f"NV_SWITCH_BIOS_{version}"
    return f"NV_GPU_VBIOS_{c.project}_{c.project_sku}_{c.chip_sku}_{version}"


def driver_rim_id(c: GpuClaims) -> str:
    chip = c.opaque.get("chip_info")
    if c.arch == "blackwell" and chip:
        name = bytes.fromhex(chip).split(b"\0")[0].decode("ascii", "replace")
        return f"NV_GPU_CC_DRIVER_{name}_{c.driver_version}"
    return f"NV_GPU_DRIVER_GH100_{c.driver_version}"


def load_chain(data: bytes) -> list[x509.Certificate]:
    """A PEM bundle (NVIDIA's chain text, leaf first); :class:`FormatError` otherwise."""
    if len(data) > MAX_CHAIN_PEM:
        raise FormatError("GPU certificate chain too large")
    try:
        certs = _certs.pem_certificates(data)
    except ValueError as e:
        raise FormatError(f"GPU certificate chain is not a PEM bundle: {e}") from None
    if not certs:
        raise FormatError("GPU certificate chain holds no certificate")
    return certs


def not_in_cc_mode(index: int, cc_mode: str, has_report: bool) -> AttestationError:
    """The failure for a GPU the runner found outside confidential-computing mode."""
    return CheckLog().fail(
        AttestationError(
            "gpu cc_mode",
            f"GPU {index} not in confidential-computing mode"
            + ("" if has_report else ": it gave no attestation report"),
            expected="on",
            found=cc_mode,
            hint="enable CC mode on the GPU (NVIDIA's gpu-admin-tools: --set-cc-mode on), "
            "reset it, and run again",
        )
    )


def _leaf_fwid(leaf: x509.Certificate, log: CheckLog) -> bytes:
    exts = {e.oid.dotted_string: e.value for e in leaf.extensions}
    try:
        if FWID_OID in exts:
            raw = getattr(exts[FWID_OID], "value", b"")
            tag, body, _ = _der.read_tlv(raw, 0)
            items = _der.children(body) if tag == _der.SEQUENCE else []
            last = _der.children(items[-1][1]) if items and items[-1][0] == _der.SEQUENCE else []
            if len(last) == 2 and last[1][0] == _der.OCTET_STRING and len(last[1][1]) == FWID_SIZE:
                return last[1][1]
        elif FWID_OID_BLACKWELL in exts:
            raw = getattr(exts[FWID_OID_BLACKWELL], "value", b"")
            tag, body, _ = _der.read_tlv(raw, 0)
            fwids = [v for t, v in _der.children(body) if t == 0xA6] if tag == _der.SEQUENCE else []
            if fwids:
                first = _der.children(fwids[0])
                parts = _der.children(first[0][1]) if first and first[0][0] == _der.SEQUENCE else []
                if len(parts) == 2 and parts[1][0] == _der.OCTET_STRING:
                    return parts[1][1]
    except FormatError:
        pass
    raise log.fail(
        AttestationError(
            "FWID",
            f"the signing certificate '{cn(leaf.subject)}' has no FWID extension "
            f"({FWID_OID} or {FWID_OID_BLACKWELL})",
            hint="the chain must start with the device's leaf (its FMC alias certificate)",
        )
    )


def _arch(chain: list[x509.Certificate]) -> tuple[str, str]:
    issuer = cn(chain[0].issuer)
    for prefix, value in ARCHITECTURES.items():
        if issuer.startswith(prefix):
            return value
    return "unknown", ""


def verify_gpu_evidence(
    report: bytes,
    chain: list[x509.Certificate],
    *,
    now: datetime,
    trust: TrustAnchors,
    nonce: bytes | None = None,
    ocsp_responses: list[bytes] | None = None,
    rims: list[bytes] | None = None,
    cache: VerificationCache | None = None,
) -> GpuClaims:
    """Verify one GPU's (or NVSwitch's) attestation report; raise the failing check.

    ``nonce``: the 32 bytes the verifier expects in the request (checked when given).
    ``ocsp_responses``: DER OCSP responses for the device chain and the RIM chains (offline
    collateral; without them revocation is recorded as not checked). ``rims``: driver and/or
    VBIOS RIMs (SWID XML); with them every active golden measurement must match.
    """
    log = CheckLog(cache=cache)
    try:  # 1
        parsed = GpuReport.from_bytes(report)
        responses = load_responses(ocsp_responses) if ocsp_responses is not None else None
    except FormatError as e:
        raise log.fail(AttestationError("report format", e.message, hint=e.hint)) from None
    if not 2 <= len(chain) <= MAX_CHAIN:
        raise log.fail(
            AttestationError(
                "certificate chain",
                "the chain must hold the signing certificate and the root CA "
                f"(2 to {MAX_CHAIN} certificates, leaf first)",
                found=f"{len(chain)} certificate(s)",
            )
        )
    trailing = (
        f", {len(parsed.trailing)} zero byte(s) after the signature ignored"
        if parsed.trailing
        else ""
    )
    log.ok(
        "report format",
        f"SPDM 1.1 GET_MEASUREMENTS: {len(parsed.response.blocks)} blocks, "
        f"{len(parsed.response.opaque)} opaque fields{trailing}",
    )
    arch, product = _arch(chain)
    root = verify_chain(chain, Vendor.NVIDIA, trust, now, log, "GPU device chain")  # 2
    if responses is not None:  # 3: the CA certificates between leaf and root
        statuses = tuple(
            check_ocsp(cert, issuer, responses, now, log, "GPU device chain")
            for cert, issuer in itertools.pairwise(chain[1:])
        )
    else:
        statuses = tuple(
            OcspStatus(cn(c.subject), c.serial_number, "not checked") for c in chain[1:-1]
        )
        log.ok("OCSP", "GPU device chain: revocation not checked (no OCSP responses given)")
    leaf = chain[0]
    cert_fwid = _leaf_fwid(leaf, log)  # 4
    if arch == "unknown":  # fail closed: whose RIMs and rules would apply is not known
        raise log.fail(
            AttestationError(
                "device",
                "the device is not a GPU or switch this verifier knows",
                expected="a GH100, GB100 or LS_10 device certificate",
                found=f"leaf issued by '{cn(leaf.issuer)}'",
            )
        )
    key = leaf.public_key()  # 5
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp384r1":
        raise log.fail(AttestationError("report signature", "the leaf key is not ECDSA P-384"))
    sig = parsed.response.signature
    r, s = int.from_bytes(sig[:48], "big"), int.from_bytes(sig[48:], "big")
    try:
        key.verify(encode_dss_signature(r, s), parsed.signed_bytes(), ec.ECDSA(hashes.SHA384()))
    except (InvalidSignature, ValueError):
        raise log.fail(
            AttestationError(
                "report signature",
                f"the report is not signed by the device key of '{cn(leaf.subject)}'",
                hint="the report and the certificate chain must come from the same GPU",
            )
        ) from None
    log.ok("report signature", f"SPDM response signed by '{cn(leaf.subject)}' (ECDSA P-384)")
    fwid = parsed.fwid  # 6
    if fwid is not None and fwid != cert_fwid:
        raise log.fail(
            AttestationError(
                "FWID",
                "the report's FWID differs from its certificate's: the chain is another device's",
                expected=cert_fwid.hex(),
                found=fwid.hex(),
            )
        )
    log.ok("FWID", f"FWID {cert_fwid.hex()[:16]}… " + ("= report" if fwid else "(report has none)"))
    if nonce is not None:  # 7
        if len(nonce) != NONCE_SIZE or nonce != parsed.nonce:
            raise log.fail(
                AttestationError(
                    "nonce",
                    "the report was made for another nonce (replayed or from another session)",
                    expected=nonce.hex(),
                    found=parsed.nonce.hex(),
                )
            )
        log.ok("nonce", f"request nonce {parsed.nonce.hex()[:16]}… as expected")
    verified: list[VerifiedRim] = []
    for raw in rims or ():  # 8
        v = verify_rim(raw, now=now, trust=trust, log=log, ocsp_responses=responses)
        mine = parsed.vbios_version if v.rim.kind == "vbios" else parsed.driver_version
        if mine is None or v.rim.version.upper() != mine.upper():
            raise log.fail(
                AttestationError(
                    "RIM version",
                    f"the {v.rim.kind} RIM is for another version than the report's",
                    expected=mine or "(none in the report)",
                    found=v.rim.version,
                    hint=f"use NVIDIA's {v.rim.kind} RIM for version {mine}",
                )
            )
        if v.rim.product and product and v.rim.product != product:
            raise log.fail(
                AttestationError(
                    "RIM version",
                    f"the {v.rim.kind} RIM is for another product",
                    expected=product,
                    found=v.rim.product,
                )
            )
        log.ok("RIM version", f"{v.rim.kind} RIM {v.rim.version} = report ({v.rim.product})")
        verified.append(v)
        root = weakest(root, v.root)
    runtime = parsed.measurements()
    if verified:
        skip = frozenset({NVDEC_INDEX}) if parsed.nvdec0_status == NVDEC_DISABLED else frozenset()
        try:
            mismatches = compare(runtime, [v.rim for v in verified], skip=skip)
        except MeasurementError as e:
            raise log.fail(e) from None
        if mismatches:
            raise log.fail(_mismatch_error(mismatches))
        active = {i for v in verified for i in v.rim.active()}
        n = len(active - skip)
        skipped = " (index 35 not compared: NVDEC0 disabled)" if skip & active else ""
        log.ok("RIM measurements", f"all {n} active golden measurements match the report{skipped}")
    return GpuClaims(
        arch=arch,
        hwmodel=cn(leaf.issuer),
        ueid=str(leaf.serial_number),
        nonce=parsed.nonce,
        driver_version=parsed.driver_version,
        vbios_version=parsed.vbios_version,
        project=parsed.project,
        project_sku=parsed.project_sku,
        chip_sku=parsed.chip_sku,
        fwid=fwid or cert_fwid,
        feature_flag=parsed.feature_flag,
        nvdec0_enabled=None
        if parsed.nvdec0_status is None
        else parsed.nvdec0_status != NVDEC_DISABLED,
        measurements=runtime,
        ocsp=statuses + tuple(o for v in verified for o in v.ocsp),
        rims=tuple(verified),
        measurements_matched=bool(verified),
        root=root,
        verified_at=now,
        checks=tuple(log.checks),
        opaque=parsed.opaque_dict(),
    )


def _mismatch_error(mismatches: list[Mismatch]) -> MeasurementError:
    err = MeasurementError(
        "RIM measurements",
        f"{len(mismatches)} golden measurement(s) differ from the report: "
        + ", ".join(f"index {m.index} ({m.rim})" for m in mismatches),
        expected="; ".join(f"index {m.index}: {' or '.join(m.expected)}" for m in mismatches),
        found="; ".join(
            f"index {m.index}: {m.found or 'no runtime measurement'}" for m in mismatches
        ),
        hint="the GPU runs firmware other than the RIMs describe: update it, or use the RIMs "
        "NVIDIA publishes for these versions",
    )
    err.mismatches = tuple(mismatches)
    return err


# -- serialized evidence (NVIDIA's JSON form; shieldml's release requests use the same) -------
@dataclass(frozen=True)
class GpuEvidence:
    """One device's evidence as it travels: report bytes, its chain, the architecture named."""

    report: bytes
    chain_pem: bytes
    arch: str = ""

    def to_dict(self) -> dict[str, str]:
        return {
            "arch": self.arch,
            "evidence": base64.b64encode(self.report).decode(),
            "certificate": base64.b64encode(self.chain_pem).decode(),
        }

    @classmethod
    def from_dict(cls, d: object) -> GpuEvidence:
        if not isinstance(d, dict):
            raise FormatError("GPU evidence must be an object with evidence and certificate")
        try:
            report = base64.b64decode(str(d["evidence"]), validate=True)
            chain = base64.b64decode(str(d["certificate"]), validate=True)
        except (KeyError, binascii.Error, ValueError):
            raise FormatError("GPU evidence needs base64 'evidence' and 'certificate'") from None
        return cls(report, chain, str(d.get("arch", "")))


def load_evidence_json(data: bytes) -> list[GpuEvidence]:
    """NVIDIA's serialized evidence: a JSON list of ``{arch, evidence, certificate, nonce}``."""
    if len(data) > 1 << 20:
        raise FormatError("GPU evidence JSON too large")
    try:
        items = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise FormatError("GPU evidence is not JSON") from None
    if isinstance(items, dict):
        items = [items]
    if not isinstance(items, list) or not 1 <= len(items) <= 16:
        raise FormatError("GPU evidence JSON must be a list of 1 to 16 devices")
    return [GpuEvidence.from_dict(i) for i in items]


__all__ = [
    "GpuClaims",
    "GpuEvidence",
    "load_chain",
    "load_evidence_json",
    "verify_gpu_evidence",
]
