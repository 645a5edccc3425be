"""Outputs sealed to a recipient's public key (HPKE) instead of a key held by a broker.

The runner encrypts the output under a fresh random key and writes that key, sealed with HPKE
(X25519, HKDF-SHA256, AES-256-GCM, ``info = "shieldml/v1 key output:" || in-TEE path``), to
``<ciphertext>.sealed-key``. Only the holder of the private key can open it.

HPKE's base mode does not authenticate the sender: anyone who has the recipient's *public* key
can seal a key of their own and encrypt a forged "output" under it. So an output is opened only
together with the run's receipt (:func:`open_output_key`): the receipt must verify (genuine
evidence that binds it, accepted by the owner's policy: the approved workload on an approved
TEE), and it must list this very sealed key (by SHA-256) for this in-TEE path. A forger can seal
a key, but cannot get it into a receipt that a TEE running the approved workload signed; and the
ciphertext, encrypted under the key only that TEE knew, authenticates itself when decrypted.
``shieldml decrypt OUT.enc result --recipient-key recipient.key --receipt run.receipt --policy
policy.toml``.
"""

from __future__ import annotations

import hashlib
import os
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography.hazmat.primitives.asymmetric import x25519

from shieldml.broker import protocol
from shieldml.errors import KeyFileError, OutputExistsError, ReceiptError
from shieldml.files import write_key_file

if TYPE_CHECKING:
    from shieldml.attest import TrustAnchors
    from shieldml.policy import Policy
    from shieldml.runner.receipt import VerifiedReceipt

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


def open_output_key(
    ciphertext: str | os.PathLike[str],
    private_key_file: str | os.PathLike[str],
    *,
    receipt: str | os.PathLike[str],
    policy: Policy,
    trust: TrustAnchors | None = None,
    now: datetime | None = None,
    bind: str | None = None,
) -> tuple[bytes, str, VerifiedReceipt]:
    """The key of a recipient output, opened only if the run's receipt vouches for it.

    Verifies ``receipt`` against ``policy`` (as :func:`~shieldml.runner.verify_receipt` does,
    without comparing the files), finds the output whose ``sealed_key_sha256`` is the SHA-256 of
    ``<ciphertext>.sealed-key``, and opens that key for the output's in-TEE path (which ``bind``,
    when given, must equal). Returns the key, the in-TEE path to decrypt with, and the verified
    receipt. Raises :class:`~shieldml.errors.ReceiptError` when the receipt lists no such sealed
    key, plus whatever receipt verification raises.
    """
    from shieldml.runner.receipt import verify_receipt

    sealed_path = sealed_key_path(ciphertext)
    try:
        sealed = sealed_path.read_bytes()
    except OSError as e:
        raise KeyFileError(f"{sealed_path}: cannot read the sealed key: {e.strerror}") from e
    verified = verify_receipt(
        os.fspath(receipt), policy=policy, trust=trust, now=now, check_files=False
    )
    digest = hashlib.sha256(sealed).hexdigest()
    outputs = verified.body.get("outputs")
    entry = next(
        (
            o
            for o in (outputs if isinstance(outputs, list) else [])
            if isinstance(o, dict) and o.get("sealed_key_sha256") == digest
        ),
        None,
    )
    if entry is None or not isinstance(entry.get("path"), str):
        raise ReceiptError(
            f"{sealed_path}: the receipt {os.fspath(receipt)} lists no output with this sealed key:"
            " not sealed by the run the receipt describes (anyone with the public key can seal one)"
        )
    tee_path = str(entry["path"]).rstrip("/")
    if bind is not None and bind.rstrip("/") != tee_path:
        raise ReceiptError(
            f"{sealed_path}: the receipt says this output was written at {tee_path}, not {bind}"
        )
    return open_key(private_key_file, tee_path, sealed), tee_path, verified
