"""Intel DCAP quotes v3 (SGX), v4 (SGX or TDX) and v5 (TD 1.0 / TD 1.5 bodies): bytes -> types.

Layouts: ``shared/docs/specs/attestation-evidence.md`` §4.1-4.6 (Intel QVL ``QuoteStructures.h``).
No trust decisions here: a :class:`Quote` is unverified data.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from shieldml.errors import FormatError, UnsupportedVersionError

MAX_QUOTE_SIZE = 64 * 1024
MAX_CERT_DATA = 32 * 1024
MAX_AUTH_DATA = 1024

HEADER = struct.Struct("<HHIHH16s20s")  # §4.1, 48 bytes
HEADER_SIZE = HEADER.size
SGX_REPORT_SIZE = 384
TD10_SIZE = 584
TD15_SIZE = 648
ATT_KEY_ECDSA_P256 = 2
TEE_SGX = 0x00000000
TEE_TDX = 0x00000081
INTEL_QE_VENDOR_ID = bytes.fromhex("939a7233f79c4ca9940a0db3957f0607")
CERT_PCK_CHAIN = 5
CERT_QE_REPORT = 6
BODY_SGX, BODY_TD10, BODY_TD15 = 1, 2, 3


def _need(data: bytes, end: int, what: str) -> None:
    if end > len(data):
        raise FormatError(f"quote truncated in {what} (needs {end} bytes, has {len(data)})")


@dataclass(frozen=True)
class QuoteHeader:
    """§4.1."""

    version: int
    att_key_type: int
    tee_type: int
    qe_svn: int
    pce_svn: int
    qe_vendor_id: bytes
    user_data: bytes

    @classmethod
    def from_bytes(cls, data: bytes) -> QuoteHeader:
        _need(data, HEADER_SIZE, "header")
        return cls(*HEADER.unpack_from(data))

    def to_bytes(self) -> bytes:
        return HEADER.pack(
            self.version,
            self.att_key_type,
            self.tee_type,
            self.qe_svn,
            self.pce_svn,
            self.qe_vendor_id,
            self.user_data,
        )


@dataclass(frozen=True)
class SgxReportBody:
    """§4.2: an enclave report (also the QE report), 384 bytes."""

    raw: bytes

    @classmethod
    def from_bytes(cls, data: bytes) -> SgxReportBody:
        if len(data) != SGX_REPORT_SIZE:
            raise FormatError(f"SGX report must be {SGX_REPORT_SIZE} bytes, not {len(data)}")
        return cls(bytes(data))

    def to_bytes(self) -> bytes:
        return self.raw

    cpu_svn = property(lambda self: self.raw[0:16])
    misc_select = property(lambda self: int.from_bytes(self.raw[16:20], "little"))
    isv_ext_prod_id = property(lambda self: self.raw[32:48])
    attributes = property(lambda self: self.raw[48:64])
    mr_enclave = property(lambda self: self.raw[64:96])
    mr_signer = property(lambda self: self.raw[128:160])
    config_id = property(lambda self: self.raw[192:256])
    isv_prod_id = property(lambda self: int.from_bytes(self.raw[256:258], "little"))
    isv_svn = property(lambda self: int.from_bytes(self.raw[258:260], "little"))
    config_svn = property(lambda self: int.from_bytes(self.raw[260:262], "little"))
    isv_family_id = property(lambda self: self.raw[304:320])
    report_data = property(lambda self: self.raw[320:384])

    @property
    def debug(self) -> bool:
        return bool(self.raw[48] & 0x02)


@dataclass(frozen=True)
class TdReportBody:
    """§4.5 TD 1.0 body (584 bytes) or, with ``tee_tcb_svn2`` and ``mr_service_td``, TD 1.5 (648)."""

    raw: bytes

    @classmethod
    def from_bytes(cls, data: bytes) -> TdReportBody:
        if len(data) not in (TD10_SIZE, TD15_SIZE):
            raise FormatError(f"TD report body must be {TD10_SIZE} or {TD15_SIZE} bytes")
        return cls(bytes(data))

    def to_bytes(self) -> bytes:
        return self.raw

    tee_tcb_svn = property(lambda self: self.raw[0:16])
    mr_seam = property(lambda self: self.raw[16:64])
    mr_signer_seam = property(lambda self: self.raw[64:112])
    seam_attributes = property(lambda self: self.raw[112:120])
    td_attributes = property(lambda self: self.raw[120:128])
    xfam = property(lambda self: self.raw[128:136])
    mr_td = property(lambda self: self.raw[136:184])
    mr_config_id = property(lambda self: self.raw[184:232])
    mr_owner = property(lambda self: self.raw[232:280])
    mr_owner_config = property(lambda self: self.raw[280:328])
    rtmrs = property(lambda self: tuple(self.raw[328 + 48 * i : 376 + 48 * i] for i in range(4)))
    report_data = property(lambda self: self.raw[520:584])

    @property
    def is_td15(self) -> bool:
        return len(self.raw) == TD15_SIZE

    @property
    def tee_tcb_svn2(self) -> bytes | None:
        return self.raw[584:600] if self.is_td15 else None

    @property
    def mr_service_td(self) -> bytes | None:
        return self.raw[600:648] if self.is_td15 else None

    @property
    def debug(self) -> bool:
        return bool(self.raw[120] & 0x01)

    @property
    def sept_ve_disable(self) -> bool:
        return bool(int.from_bytes(self.td_attributes, "little") >> 28 & 1)


@dataclass(frozen=True)
class QeCertificationData:
    """What certifies the attestation key: the QE report, its PCK signature, the PCK chain."""

    qe_report: SgxReportBody
    qe_report_signature: bytes
    qe_auth_data: bytes
    cert_type: int
    cert_data: bytes

    @classmethod
    def parse(cls, data: bytes, pos: int) -> tuple[QeCertificationData, int]:
        _need(data, pos + SGX_REPORT_SIZE + 64 + 2, "QE report")
        qe_report = SgxReportBody.from_bytes(data[pos : pos + SGX_REPORT_SIZE])
        pos += SGX_REPORT_SIZE
        sig = data[pos : pos + 64]
        pos += 64
        (auth_len,) = struct.unpack_from("<H", data, pos)
        pos += 2
        if auth_len > MAX_AUTH_DATA:
            raise FormatError(f"QE auth data too large ({auth_len} bytes)")
        _need(data, pos + auth_len + 6, "QE auth data")
        auth = data[pos : pos + auth_len]
        pos += auth_len
        cert_type, cert_size = struct.unpack_from("<HI", data, pos)
        pos += 6
        if cert_size > MAX_CERT_DATA:
            raise FormatError(f"certification data too large ({cert_size} bytes)")
        _need(data, pos + cert_size, "certification data")
        cert = data[pos : pos + cert_size]
        return cls(qe_report, sig, auth, cert_type, cert), pos + cert_size


@dataclass(frozen=True)
class Quote:
    """An unverified DCAP quote. ``signed_bytes`` is exactly what the attestation key signed."""

    header: QuoteHeader
    body: SgxReportBody | TdReportBody
    body_type: int
    signature: bytes
    attestation_key: bytes
    certification: QeCertificationData
    signed_bytes: bytes
    raw: bytes

    @property
    def is_tdx(self) -> bool:
        return isinstance(self.body, TdReportBody)

    @classmethod
    def from_bytes(cls, data: bytes) -> Quote:
        data = bytes(data)
        if len(data) > MAX_QUOTE_SIZE:
            raise FormatError(f"quote too large ({len(data)} bytes, limit {MAX_QUOTE_SIZE})")
        header = QuoteHeader.from_bytes(data)
        try:
            return cls._parse(header, data)
        except struct.error as e:
            raise FormatError(f"quote truncated: {e}") from e

    @classmethod
    def _parse(cls, header: QuoteHeader, data: bytes) -> Quote:
        pos = HEADER_SIZE
        if header.version == 3:
            if header.tee_type != TEE_SGX:
                raise FormatError(f"quote v3 must have tee_type 0, not {header.tee_type:#x}")
            body_type, size = BODY_SGX, SGX_REPORT_SIZE
        elif header.version == 4:
            if header.tee_type == TEE_SGX:
                body_type, size = BODY_SGX, SGX_REPORT_SIZE
            elif header.tee_type == TEE_TDX:
                body_type, size = BODY_TD10, TD10_SIZE
            else:
                raise FormatError(f"unknown tee_type {header.tee_type:#x}")
        elif header.version == 5:
            _need(data, pos + 6, "body descriptor")
            body_type, size = struct.unpack_from("<HI", data, pos)
            pos += 6
            expected = {BODY_SGX: SGX_REPORT_SIZE, BODY_TD10: TD10_SIZE, BODY_TD15: TD15_SIZE}
            if expected.get(body_type) != size:
                raise FormatError(
                    f"quote v5 body type {body_type} with size {size} is not supported"
                )
            if (body_type == BODY_SGX) != (header.tee_type == TEE_SGX):
                raise FormatError("quote v5 body type does not match tee_type")
        else:
            raise UnsupportedVersionError(f"quote version {header.version} is not supported (3-5)")
        _need(data, pos + size + 4, "report body")
        raw_body = data[pos : pos + size]
        body: SgxReportBody | TdReportBody
        body = (
            SgxReportBody.from_bytes(raw_body)
            if body_type == BODY_SGX
            else TdReportBody.from_bytes(raw_body)
        )
        signed_end = pos + size
        (sig_len,) = struct.unpack_from("<I", data, signed_end)
        sig_start = signed_end + 4
        _need(data, sig_start + sig_len, "signature data")
        sig_data = data[sig_start : sig_start + sig_len]  # anything after it is padding
        if len(sig_data) < 128:
            raise FormatError("signature data too short")
        signature, att_key = sig_data[:64], sig_data[64:128]
        if header.version == 3:
            cert, end = QeCertificationData.parse(sig_data, 128)
        else:
            _need(sig_data, 134, "certification data header")
            outer_type, outer_size = struct.unpack_from("<HI", sig_data, 128)
            if outer_type != CERT_QE_REPORT:
                raise FormatError(f"outer certification data type {outer_type}, expected 6")
            _need(sig_data, 134 + outer_size, "QE report certification data")
            cert, end = QeCertificationData.parse(sig_data[: 134 + outer_size], 134)
        if end != len(sig_data) and header.version == 3:
            raise FormatError("trailing bytes inside the signature data")
        return cls(header, body, body_type, signature, att_key, cert, data[:signed_end], data)
