"""The broker protocol's bytes: report-data binding and HPKE sealing of released keys.

Specified with test vectors in ``docs/protocol.md``.

Binding (the 64 bytes of REPORTDATA the TEE must produce)::

    SHA-512( "shieldml/v1\\0" || nonce[32] || u16be(kem_id) || u16be(len(pk)) || pk || workload_digest[32] )

where ``pk`` is the runner's ephemeral HPKE public key (X25519: 32 bytes; ML-KEM-768+X25519:
the 1184-byte ML-KEM public key followed by the 32-byte X25519 key) and ``workload_digest`` the
32 raw bytes of the ``sha256:<hex>`` workload digest.

Sealing: RFC 9180 HPKE base mode, KEM X25519 (0x0020) or ML-KEM-768+X25519 (0x647a), KDF
HKDF-SHA256, AEAD AES-256-GCM, ``info = "shieldml/v1 key " || key name``; the sealed value is
``enc || ciphertext`` as ``cryptography``'s single-shot API returns it.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric import mlkem, x25519

from shieldml.errors import FormatError, IntegrityError

DOMAIN = b"shieldml/v1\0"
NONCE_SIZE = 32
#: challenges per second (sustained) and at once (burst) per client address and broker worker
#: process before ``/v1/challenge`` answers 429 (``broker serve --challenge-rate/--challenge-burst``)
CHALLENGE_RATE = 200.0
CHALLENGE_BURST = 400.0
KEM_X25519 = 0x0020
KEM_MLKEM768_X25519 = 0x647A
KEMS = {"X25519": KEM_X25519, "MLKEM768-X25519": KEM_MLKEM768_X25519}
_SUITES = {
    KEM_X25519: hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM),
    KEM_MLKEM768_X25519: hpke.Suite(
        hpke.KEM.MLKEM768_X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM
    ),
}
MLKEM768_PK = 1184
WORKLOAD_PREFIX = "sha256:"


def parse_workload_digest(text: str) -> bytes:
    """``sha256:<64 hex>`` -> 32 bytes."""
    if not isinstance(text, str) or not text.startswith(WORKLOAD_PREFIX):
        raise FormatError(f"workload digest must look like sha256:<64 hex digits>, not {text!r}")
    try:
        raw = bytes.fromhex(text[len(WORKLOAD_PREFIX) :])
    except ValueError:
        raise FormatError("workload digest is not hex") from None
    if len(raw) != 32:
        raise FormatError("workload digest must be 32 bytes")
    return raw


def report_data(nonce: bytes, kem_id: int, public_key: bytes, workload_digest: str) -> bytes:
    """The 64-byte REPORTDATA that binds the evidence to this nonce, HPKE key and workload."""
    if len(nonce) != NONCE_SIZE:
        raise FormatError(f"nonce must be {NONCE_SIZE} bytes")
    if kem_id not in _SUITES or len(public_key) > 0xFFFF:
        raise FormatError("unsupported HPKE key")
    wd = parse_workload_digest(workload_digest)
    data = DOMAIN + nonce + struct.pack(">HH", kem_id, len(public_key)) + public_key + wd
    return hashlib.sha512(data).digest()


GPU_DOMAIN = b"shieldml/v1/gpu\0"
CC_MODES = ("on", "off", "devtools")
MAX_GPUS = 16
#: a release's refusal ``reason`` when the CPU's evidence, or a GPU's, failed verification
NOT_GENUINE = "evidence is not genuine"
GPU_NOT_GENUINE = "GPU evidence is not genuine or not bound to this session"


def gpu_nonce(report_data: bytes, index: int, count: int, cc_mode: str) -> bytes:
    """The 32-byte SPDM nonce GPU ``index`` of ``count`` answers in this session.

    ``SHA-256(GPU_DOMAIN ‖ report_data ‖ u8 index ‖ u8 count ‖ cc_mode)``, ``report_data`` being
    the 64 bytes the CPU evidence binds (:func:`report_data`: the broker's nonce, the runner's
    HPKE key, the workload digest). So a GPU report is bound to this CPU evidence's session and
    to its position among the GPUs the runner saw: one from another session or machine, or a
    set with a GPU left out or reordered, does not verify; the CC mode the runner read through
    NVML cannot be edited on the way either.
    """
    if len(report_data) != 64:
        raise FormatError("report data must be 64 bytes")
    if not 0 <= index < count <= MAX_GPUS:
        raise FormatError(f"GPU index {index} of {count} (at most {MAX_GPUS} GPUs)")
    if cc_mode not in CC_MODES:
        raise FormatError(f"cc_mode must be one of {', '.join(CC_MODES)}")
    data = GPU_DOMAIN + report_data + bytes([index, count]) + cc_mode.encode()
    return hashlib.sha256(data).digest()


def binding_matches(expected: bytes, actual: bytes) -> bool:
    return hmac.compare_digest(expected, actual)


@dataclass(frozen=True)
class RunnerKey:
    """An ephemeral HPKE key pair of the runner (the private half never leaves the TEE)."""

    kem_id: int
    private: x25519.X25519PrivateKey | hpke.MLKEM768X25519PrivateKey
    public_bytes: bytes

    @classmethod
    def generate(cls, kem: str = "X25519") -> RunnerKey:
        kem_id = KEMS[kem]
        if kem_id == KEM_X25519:
            k = x25519.X25519PrivateKey.generate()
            return cls(kem_id, k, k.public_key().public_bytes_raw())
        m, x = mlkem.MLKEM768PrivateKey.generate(), x25519.X25519PrivateKey.generate()
        pub = m.public_key().public_bytes_raw() + x.public_key().public_bytes_raw()
        return cls(kem_id, hpke.MLKEM768X25519PrivateKey(m, x), pub)

    @property
    def kem(self) -> str:
        return next(k for k, v in KEMS.items() if v == self.kem_id)

    def open(self, key_name: str, sealed: bytes) -> bytes:
        """Unseal a key the broker released to this runner (IntegrityError if it does not open)."""
        try:
            return _SUITES[self.kem_id].decrypt(sealed, self.private, info=_info(key_name))
        except (InvalidTag, ValueError):
            raise IntegrityError(f"sealed key {key_name!r}", "HPKE") from None


def _info(key_name: str) -> bytes:
    return b"shieldml/v1 key " + key_name.encode()


def load_public_key(
    kem_id: int, raw: bytes
) -> x25519.X25519PublicKey | hpke.MLKEM768X25519PublicKey:
    try:
        if kem_id == KEM_X25519:
            return x25519.X25519PublicKey.from_public_bytes(raw)
        if kem_id == KEM_MLKEM768_X25519 and len(raw) == MLKEM768_PK + 32:
            return hpke.MLKEM768X25519PublicKey(
                mlkem.MLKEM768PublicKey.from_public_bytes(raw[:MLKEM768_PK]),
                x25519.X25519PublicKey.from_public_bytes(raw[MLKEM768_PK:]),
            )
    except ValueError as e:
        raise FormatError(f"invalid HPKE public key: {e}") from e
    raise FormatError("invalid HPKE public key for this KEM")


def seal(kem_id: int, public_key: bytes, key_name: str, secret: bytes) -> bytes:
    """Seal ``secret`` to the runner's HPKE key, bound to the key's name."""
    pk = load_public_key(kem_id, public_key)
    return _SUITES[kem_id].encrypt(secret, pk, info=_info(key_name))
