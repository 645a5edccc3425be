"""SGX SIGSTRUCT (``app.sig``, 1808 bytes): parse, verify the signature, derive the policy profile.

Layout: ``shared/docs/specs/gramine-formats.md`` §5 (Intel SDM; Gramine ``sigstruct.py``).
MRSIGNER is SHA-256 of the 384-byte little-endian modulus as stored.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from shieldml.errors import FormatError, IntegrityError

SIZE = 1808
HEADER = bytes.fromhex("06000000e10000000000010000000000")
HEADER2 = bytes.fromhex("01010000600000006000000001000000")
KEY_BYTES = 384
DEBUG = 0x02


@dataclass(frozen=True)
class Sigstruct:
    raw: bytes

    @classmethod
    def from_bytes(cls, data: bytes, name: str = "SIGSTRUCT") -> Sigstruct:
        if len(data) != SIZE:
            raise FormatError(f"{name}: a SIGSTRUCT has {SIZE} bytes, not {len(data)}")
        if data[0:16] != HEADER or data[24:40] != HEADER2:
            raise FormatError(f"{name}: not a SIGSTRUCT (header)")
        s = cls(bytes(data))
        if s.exponent != 3:
            raise FormatError(f"{name}: RSA exponent must be 3")
        return s

    def _u(self, fmt: str, off: int) -> int:
        return int(struct.unpack_from(fmt, self.raw, off)[0])

    @property
    def vendor(self) -> int:
        return self._u("<I", 16)

    @property
    def date(self) -> str:
        return f"{self._u('<I', 20):08x}"  # BCD yyyymmdd

    @property
    def modulus(self) -> bytes:
        return self.raw[128 : 128 + KEY_BYTES]

    @property
    def exponent(self) -> int:
        return self._u("<I", 512)

    @property
    def signature(self) -> bytes:
        return self.raw[516 : 516 + KEY_BYTES]

    @property
    def attributes(self) -> bytes:
        return self.raw[928:944]

    @property
    def debug(self) -> bool:
        return bool(self.raw[928] & DEBUG)

    @property
    def mrenclave(self) -> bytes:
        return self.raw[960:992]

    @property
    def isv_prod_id(self) -> int:
        return self._u("<H", 1024)

    @property
    def isv_svn(self) -> int:
        return self._u("<H", 1026)

    @property
    def mrsigner(self) -> bytes:
        return hashlib.sha256(self.modulus).digest()

    def signed_bytes(self) -> bytes:
        return self.raw[0:128] + self.raw[900:1028]

    def verify(self, name: str = "SIGSTRUCT") -> None:
        """The enclave signer's RSA-3072 (e=3) PKCS#1 v1.5 SHA-256 signature; raises if invalid."""
        n = int.from_bytes(self.modulus, "little")
        try:
            key = rsa.RSAPublicNumbers(3, n).public_key()
            key.verify(
                int.from_bytes(self.signature, "little").to_bytes(KEY_BYTES, "big"),
                self.signed_bytes(),
                padding.PKCS1v15(),
                hashes.SHA256(),
            )
        except (InvalidSignature, ValueError):
            raise IntegrityError(
                name, "signature", reason="SIGSTRUCT signature does not verify"
            ) from None

    def policy_profile(self) -> str:
        """The TOML profile that accepts exactly this enclave (add it to a key's policy)."""
        return (
            "[[profile]]\n"
            'tee = "sgx"\n'
            f'mrenclave = ["{self.mrenclave.hex()}"]\n'
            f'mrsigner = "{self.mrsigner.hex()}"\n'
            f"isv_prod_id = {self.isv_prod_id}\n"
            f"min_isv_svn = {self.isv_svn}\n"
            'workload_digest = "any"  # Gramine measures the manifest into MRENCLAVE\n'
        )
