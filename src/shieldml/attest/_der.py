"""A minimal, bounded DER reader for the vendor extensions ``cryptography`` leaves opaque.

Only what the Intel PCK SGX extension and the AMD VCEK extensions need: TLV splitting, OIDs,
INTEGERs, OCTET STRINGs, IA5Strings. Every failure is a :class:`FormatError`.
"""

from __future__ import annotations

from shieldml.errors import FormatError

SEQUENCE = 0x30
INTEGER = 0x02
OCTET_STRING = 0x04
OID = 0x06
ENUMERATED = 0x0A
IA5STRING = 0x16
MAX_DEPTH = 8


def read_tlv(data: bytes, pos: int) -> tuple[int, bytes, int]:
    """Return ``(tag, value, next_position)`` of the TLV at ``pos``."""
    try:
        tag = data[pos]
        length = data[pos + 1]
        pos += 2
        if length & 0x80:
            n = length & 0x7F
            if n == 0 or n > 4:
                raise FormatError("DER: unsupported length encoding")
            length = int.from_bytes(data[pos : pos + n], "big")
            pos += n
    except IndexError:
        raise FormatError("DER: truncated") from None
    end = pos + length
    if end > len(data):
        raise FormatError("DER: value runs past the end")
    return tag, data[pos:end], end


def children(data: bytes) -> list[tuple[int, bytes]]:
    """Split the content of a constructed value into its ``(tag, value)`` elements."""
    out = []
    pos = 0
    while pos < len(data):
        tag, value, pos = read_tlv(data, pos)
        out.append((tag, value))
    return out


# decoded OIDs by their exact bytes (a pure function; the same few dozen OIDs recur in every
# PCK / VCEK extension). Bounded: what an attacker feeds in cannot grow it without limit.
_OIDS: dict[bytes, str] = {}
_OIDS_MAX = 512


def decode_oid(value: bytes) -> str:
    hit = _OIDS.get(value)
    if hit is not None:
        return hit
    text = _decode_oid(value)
    if len(_OIDS) < _OIDS_MAX:
        _OIDS[bytes(value)] = text
    return text


def _decode_oid(value: bytes) -> str:
    if not value:
        raise FormatError("DER: empty OID")
    first = value[0]
    parts = [min(first // 40, 2), first - 40 * min(first // 40, 2)]
    n = 0
    for b in value[1:]:
        n = (n << 7) | (b & 0x7F)
        if not b & 0x80:
            parts.append(n)
            n = 0
    return ".".join(map(str, parts))


def decode_int(value: bytes) -> int:
    if not value or len(value) > 9:
        raise FormatError("DER: bad INTEGER")
    return int.from_bytes(value, "big", signed=True)


def oid_map(seq_content: bytes, depth: int = 0) -> dict[str, tuple[int, bytes]]:
    """Flatten SEQUENCE { SEQUENCE { OID, value } ... } into ``{oid: (tag, value)}``, recursively."""
    if depth > MAX_DEPTH:
        raise FormatError("DER: nested too deeply")
    out: dict[str, tuple[int, bytes]] = {}
    for tag, value in children(seq_content):
        if tag != SEQUENCE:
            raise FormatError("DER: expected SEQUENCE")
        items = children(value)
        if len(items) != 2 or items[0][0] != OID:
            raise FormatError("DER: expected { OID, value }")
        oid = decode_oid(items[0][1])
        vtag, vval = items[1]
        out[oid] = (vtag, vval)
        if vtag == SEQUENCE:
            out.update(oid_map(vval, depth + 1))
    return out


# -- encoding (used by the simulated platform to build structurally real extensions) ----------
def encode(tag: int, value: bytes) -> bytes:
    n = len(value)
    if n < 0x80:
        length = bytes([n])
    else:
        raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
        length = bytes([0x80 | len(raw)]) + raw
    return bytes([tag]) + length + value


def encode_oid(oid: str) -> bytes:
    parts = [int(p) for p in oid.split(".")]
    body = bytearray([40 * parts[0] + parts[1]])
    for p in parts[2:]:
        chunk = [p & 0x7F]
        p >>= 7
        while p:
            chunk.append(0x80 | (p & 0x7F))
            p >>= 7
        body += bytes(reversed(chunk))
    return encode(OID, bytes(body))


def encode_int(value: int) -> bytes:
    raw = value.to_bytes(max(1, (value.bit_length() + 8) // 8), "big", signed=True)
    return encode(INTEGER, raw)


def encode_seq(*items: bytes) -> bytes:
    return encode(SEQUENCE, b"".join(items))
