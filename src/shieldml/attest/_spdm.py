"""NVIDIA GPU / NVSwitch attestation reports: SPDM 1.1 GET_MEASUREMENTS request + response.

The evidence an NVIDIA confidential-computing GPU (Hopper, Blackwell) or NVSwitch (LS10) returns
is the 37-byte GET_MEASUREMENTS request the verifier's nonce went into, followed by the device's
MEASUREMENTS response (DMTF DSP0274 1.1, §10.11), signed with the key of the device's
certificate-chain leaf. Multi-byte integers are little-endian.

Request: SPDMVersion 0x11, code 0xE0, Param1 (bit 0: signature requested), Param2 (0xFF: all
blocks), Nonce (32), SlotID (1).

Response: SPDMVersion 0x11, code 0x60, Param1, Param2, NumberOfBlocks (1),
MeasurementRecordLength (3), the record (NumberOfBlocks blocks of Index (1),
MeasurementSpecification (1, DMTF = 1), MeasurementSize (2), then the DMTF measurement:
ValueType (1), ValueSize (2), Value), the responder nonce (32), OpaqueLength (2), the opaque
data (NVIDIA TLVs: type (2), length (2), value), the signature (96: ECDSA P-384 r ‖ s, big-endian).

The signature covers request ‖ response up to (not including) the signature. Nothing after the
signature is signed: a blob may carry trailing zero padding (one of NVIDIA's own CoCo captures
has one 0x00), which is kept for the round trip and never read; anything else there is refused.

Every length is checked against the bytes that are there, and the parse of a valid report
round-trips exactly through :meth:`GpuReport.to_bytes`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from shieldml.errors import FormatError, UnsupportedVersionError

SPDM_VERSION = 0x11
GET_MEASUREMENTS = 0xE0
MEASUREMENTS = 0x60
REQUEST_SIZE = 37
NONCE_SIZE = 32
SIGNATURE_SIZE = 96
DMTF_SPEC = 1
MAX_REPORT = 32 * 1024
MAX_TRAILING = 64
MAX_OPAQUE_FIELDS = 64

# NVIDIA opaque-data field ids (GPU naming; NVSwitch renames 22-26)
OPAQUE_FIELDS = {
    1: "cert_issuer_name",
    2: "cert_authority_key_identifier",
    3: "driver_version",
    4: "gpu_info",
    5: "sku",
    6: "vbios_version",
    7: "manufacturer_id",
    8: "tamper_detection",
    9: "smc",
    10: "vpr",
    11: "nvdec0_status",
    12: "msrscnt",
    13: "cprinfo",
    14: "board_id",
    15: "chip_sku",
    16: "chip_sku_mod",
    17: "project",
    18: "project_sku",
    19: "project_sku_mod",
    20: "fwid",
    21: "protected_pcie_status",
    22: "switch_pdi",
    23: "floorswept_ports",
    24: "position_id",
    25: "lock_switch_status",
    32: "gpu_link_conn",
    33: "sys_enable_status",
    34: "opaque_data_version",
    35: "chip_info",
    36: "feature_flag",
    255: "invalid",
}
FIELD_IDS = {v: k for k, v in OPAQUE_FIELDS.items()}
NVDEC_ENABLED, NVDEC_DISABLED = 0xAA, 0x55
FEATURE_FLAGS = {0: "SPT", 1: "MPT", 2: "PPCIE"}


def _take(data: bytes, pos: int, n: int, what: str) -> tuple[bytes, int]:
    if n < 0 or pos + n > len(data):
        raise FormatError(
            f"GPU attestation report truncated in {what} "
            f"(needs {n} bytes at offset {pos}, report has {len(data)})"
        )
    return data[pos : pos + n], pos + n


def _ascii(value: bytes, what: str) -> str:
    text = value.split(b"\0", 1)[0]
    try:
        return text.decode("ascii")
    except UnicodeDecodeError:
        raise FormatError(f"GPU opaque field {what} is not ASCII") from None


@dataclass(frozen=True)
class SpdmRequest:
    """The GET_MEASUREMENTS request (37 bytes) that carried the verifier's nonce."""

    version: int
    code: int
    param1: int
    param2: int
    nonce: bytes
    slot_id: int

    @classmethod
    def from_bytes(cls, data: bytes) -> SpdmRequest:
        if len(data) != REQUEST_SIZE:
            raise FormatError(f"SPDM GET_MEASUREMENTS request must be {REQUEST_SIZE} bytes")
        version, code, p1, p2 = data[0], data[1], data[2], data[3]
        if version != SPDM_VERSION:
            raise UnsupportedVersionError(f"SPDM version 0x{version:02x} is not supported (0x11)")
        if code != GET_MEASUREMENTS:
            raise FormatError(f"not an SPDM GET_MEASUREMENTS request (code 0x{code:02x})")
        return cls(version, code, p1, p2, data[4:36], data[36])

    def to_bytes(self) -> bytes:
        head = bytes([self.version, self.code, self.param1, self.param2])
        return head + self.nonce + bytes([self.slot_id])


@dataclass(frozen=True)
class MeasurementBlock:
    """One DMTF measurement block; ``index`` is SPDM's 1-based index."""

    index: int
    spec: int
    value_type: int
    value: bytes

    def to_bytes(self) -> bytes:
        dmtf = struct.pack("<BH", self.value_type, len(self.value)) + self.value
        return struct.pack("<BBH", self.index, self.spec, len(dmtf)) + dmtf


@dataclass(frozen=True)
class OpaqueField:
    type: int
    value: bytes

    @property
    def name(self) -> str:
        return OPAQUE_FIELDS.get(self.type, f"unknown_{self.type}")

    def to_bytes(self) -> bytes:
        return struct.pack("<HH", self.type, len(self.value)) + self.value


def _parse_blocks(record: bytes, count: int) -> tuple[MeasurementBlock, ...]:
    blocks: list[MeasurementBlock] = []
    seen: set[int] = set()
    pos = 0
    for _ in range(count):
        head, pos = _take(record, pos, 4, "a measurement block header")
        index, spec, size = struct.unpack("<BBH", head)
        body, pos = _take(record, pos, size, f"measurement block {index}")
        if index in seen or index == 0:
            raise FormatError(f"measurement block index {index} repeated or zero")
        seen.add(index)
        if spec != DMTF_SPEC:
            raise FormatError(f"measurement block {index}: specification {spec} is not DMTF (1)")
        if size < 3:
            raise FormatError(f"measurement block {index}: DMTF measurement shorter than 3 bytes")
        value_type, value_size = struct.unpack_from("<BH", body)
        if 3 + value_size != size:
            raise FormatError(
                f"measurement block {index}: value size {value_size} does not fill the block "
                f"({size} bytes)"
            )
        blocks.append(MeasurementBlock(index, spec, value_type, body[3:]))
    if pos != len(record):
        raise FormatError(
            f"measurement record length {len(record)} does not equal its {count} blocks ({pos})"
        )
    return tuple(blocks)


def _parse_opaque(data: bytes) -> tuple[OpaqueField, ...]:
    fields: list[OpaqueField] = []
    seen: set[int] = set()
    pos = 0
    while pos < len(data):
        if len(fields) >= MAX_OPAQUE_FIELDS:
            raise FormatError(f"GPU opaque data has more than {MAX_OPAQUE_FIELDS} fields")
        head, pos = _take(data, pos, 4, "an opaque field header")
        ftype, flen = struct.unpack("<HH", head)
        value, pos = _take(data, pos, flen, f"opaque field {ftype}")
        if ftype in seen:
            raise FormatError(f"GPU opaque field {OPAQUE_FIELDS.get(ftype, ftype)} repeated")
        seen.add(ftype)
        fields.append(OpaqueField(ftype, value))
    return tuple(fields)


@dataclass(frozen=True)
class SpdmResponse:
    """The MEASUREMENTS response: blocks, responder nonce, NVIDIA opaque fields, signature."""

    version: int
    code: int
    param1: int
    param2: int
    blocks: tuple[MeasurementBlock, ...]
    nonce: bytes
    opaque: tuple[OpaqueField, ...]
    signature: bytes

    @classmethod
    def parse(cls, data: bytes, pos: int = 0) -> tuple[SpdmResponse, int]:
        """The response starting at ``pos``, and the offset just after its signature."""
        head, pos = _take(data, pos, 8, "the response header")
        version, code, p1, p2, count = head[:5]
        record_len = int.from_bytes(head[5:8], "little")
        if version != SPDM_VERSION:
            raise UnsupportedVersionError(f"SPDM version 0x{version:02x} is not supported (0x11)")
        if code != MEASUREMENTS:
            raise FormatError(f"not an SPDM MEASUREMENTS response (code 0x{code:02x})")
        record, pos = _take(data, pos, record_len, "the measurement record")
        blocks = _parse_blocks(record, count)
        nonce, pos = _take(data, pos, NONCE_SIZE, "the responder nonce")
        olen_raw, pos = _take(data, pos, 2, "the opaque length")
        opaque_raw, pos = _take(data, pos, int.from_bytes(olen_raw, "little"), "the opaque data")
        opaque = _parse_opaque(opaque_raw)
        signature, pos = _take(data, pos, SIGNATURE_SIZE, "the signature")
        return cls(version, code, p1, p2, blocks, nonce, opaque, signature), pos

    def unsigned_bytes(self) -> bytes:
        record = b"".join(b.to_bytes() for b in self.blocks)
        opaque = b"".join(f.to_bytes() for f in self.opaque)
        return (
            bytes([self.version, self.code, self.param1, self.param2, len(self.blocks)])
            + len(record).to_bytes(3, "little")
            + record
            + self.nonce
            + len(opaque).to_bytes(2, "little")
            + opaque
        )

    def to_bytes(self) -> bytes:
        return self.unsigned_bytes() + self.signature

    def field(self, name: str) -> bytes | None:
        ftype = FIELD_IDS[name]
        return next((f.value for f in self.opaque if f.type == ftype), None)


@dataclass(frozen=True)
class GpuReport:
    """An unverified NVIDIA attestation report (request ‖ response [‖ zero padding])."""

    request: SpdmRequest
    response: SpdmResponse
    trailing: bytes = b""

    @classmethod
    def from_bytes(cls, data: bytes) -> GpuReport:
        data = bytes(data)
        if len(data) > MAX_REPORT:
            raise FormatError(f"GPU attestation report too large ({len(data)} bytes)")
        request = SpdmRequest.from_bytes(data[:REQUEST_SIZE])
        response, end = SpdmResponse.parse(data, REQUEST_SIZE)
        trailing = data[end:]
        if len(trailing) > MAX_TRAILING or any(trailing):
            raise FormatError(
                f"GPU attestation report has {len(trailing)} unsigned bytes after the signature",
                hint="a report ends at its signature (up to 64 zero bytes of padding are ignored)",
            )
        return cls(request, response, trailing)

    @classmethod
    def from_hex(cls, text: str | bytes) -> GpuReport:
        """A report as NVIDIA's tools write it: hex text (whitespace ignored)."""
        raw = text.decode("ascii", errors="replace") if isinstance(text, bytes) else text
        try:
            return cls.from_bytes(bytes.fromhex("".join(raw.split())))
        except ValueError:
            raise FormatError("GPU attestation report is not hex text") from None

    def to_bytes(self) -> bytes:
        return self.signed_bytes() + self.response.signature + self.trailing

    def signed_bytes(self) -> bytes:
        """request ‖ response without its signature: what the device key signed."""
        return self.request.to_bytes() + self.response.unsigned_bytes()

    # -- decoded opaque data -----------------------------------------------------------------
    def _text(self, name: str) -> str | None:
        value = self.response.field(name)
        return None if value is None else _ascii(value, name)

    @property
    def nonce(self) -> bytes:
        return self.request.nonce

    @property
    def driver_version(self) -> str | None:
        return self._text("driver_version")

    @property
    def vbios_version(self) -> str | None:
        """``96.00.9F.00.01``: GPUs carry 8 raw bytes (b3.b2.b1.b0.b4), NVSwitch ASCII."""
        value = self.response.field("vbios_version")
        if value is None:
            return None
        text = value.rstrip(b"\0")
        if b"." in text and all(0x20 <= b < 0x7F for b in text):
            return text.decode("ascii").upper()  # NVSwitch: ASCII
        if len(value) != 8:
            raise FormatError(f"GPU VBIOS version field has {len(value)} bytes, not 8")
        return ".".join(f"{value[i]:02X}" for i in (3, 2, 1, 0, 4))

    @property
    def project(self) -> str | None:
        return self._text("project")

    @property
    def project_sku(self) -> str | None:
        return self._text("project_sku")

    @property
    def chip_sku(self) -> str | None:
        return self._text("chip_sku")

    @property
    def chip_info(self) -> str | None:
        return self._text("chip_info")

    @property
    def fwid(self) -> bytes | None:
        return self.response.field("fwid")

    @property
    def nvdec0_status(self) -> int | None:
        value = self.response.field("nvdec0_status")
        return value[0] if value else None

    @property
    def opaque_data_version(self) -> int | None:
        value = self.response.field("opaque_data_version")
        return int.from_bytes(value, "little") if value else None

    @property
    def feature_flag(self) -> str | None:
        value = self.response.field("feature_flag")
        if not value:
            return None
        n = int.from_bytes(value, "little")
        return FEATURE_FLAGS.get(n, f"unknown ({n})")

    def measurements(self) -> dict[int, bytes]:
        """Runtime measurement values by **RIM** index (SPDM block index - 1)."""
        return {b.index - 1: b.value for b in self.response.blocks}

    def opaque_dict(self) -> dict[str, str]:
        return {f.name: f.value.hex() for f in self.response.opaque}
