"""Outputs sealed to a recipient's public key (HPKE) instead of a key held by a broker.

The runner encrypts the output under a fresh random key and writes that key, sealed with HPKE
(X25519, HKDF-SHA256, AES-256-GCM, ``info = "shieldml/v1 key output:" || in-TEE path``), to
``<ciphertext>.sealed-key``. Only the holder of the private key can open it:
``shieldml decrypt OUT.enc result --recipient-key recipient.key --bind /in/tee/path``.
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import x25519

from shieldml.broker import protocol
from shieldml.errors import KeyFileError, OutputExistsError
from shieldml.files import write_key_file

SUFFIX = ".sealed-key"


def sealed_key_path(ciphertext: str | os.PathLike[str]) -> Path:
    return Path(str(ciphertext).rstrip("/") + SUFFIX)


def new_recipient(path: str | os.PathLike[str]) -> Path:
    """Write a private key (mode 0600) at ``path`` and its public key at ``path.pub``."""
    pub = Path(str(path) + ".pub")
    if pub.exists():
        raise OutputExistsError(f"{pub}: already exists")
    key = x25519.X25519PrivateKey.generate()
    write_key_file(path, key.private_bytes_raw())
    pub.write_bytes(key.public_key().public_bytes_raw())
    return pub


def seal_key(public_key: bytes, tee_path: str, key: bytes) -> bytes:
    return protocol.seal(protocol.KEM_X25519, public_key, f"output:{tee_path}", key)


def open_key(private_key_file: str | os.PathLike[str], tee_path: str, sealed: bytes) -> bytes:
    raw = Path(private_key_file).read_bytes()
    if len(raw) != 32:
        raise KeyFileError(f"{private_key_file}: a recipient key has 32 bytes")
    priv = x25519.X25519PrivateKey.from_private_bytes(raw)
    rk = protocol.RunnerKey(protocol.KEM_X25519, priv, priv.public_key().public_bytes_raw())
    return rk.open(f"output:{tee_path}", sealed)
