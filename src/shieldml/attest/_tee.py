"""The names of the TEEs: what every command, manifest and policy spells, and nothing else.

Kept apart from the verifiers, so that reading a name (``shieldml run``'s manifest, the CLI's
options) loads no X.509 or verification code.
"""

from __future__ import annotations

import enum
import warnings

from shieldml.errors import ShieldDeprecationWarning

__all__ = ["DEPRECATED_TEE_NAMES", "TEE_NAMES", "TeeKind", "canonical_tee"]


class TeeKind(enum.StrEnum):
    SGX = "sgx"
    TDX = "tdx"
    SNP = "snp"


#: The TEE names of every command and file (``job``, ``policy``, ``attest``, ``run``): the three
#: hardware TEEs, with ``auto`` (detect) and ``simulated`` (test machinery) where they apply.
TEE_NAMES = tuple(k.value for k in TeeKind)

#: Older spellings, still accepted with a deprecation warning: the name each means, and why.
DEPRECATED_TEE_NAMES = {
    "gramine": ("sgx", "Gramine runs the job in an SGX enclave"),
    "ratls": ("sgx", "an RA-TLS certificate carries an SGX quote, and sgx reads both"),
}


def canonical_tee(name: str, where: str = "tee") -> str:
    """``name``, or the canonical name of a deprecated spelling (with a
    :class:`~shieldml.errors.ShieldDeprecationWarning` naming ``where`` it was given)."""
    old = DEPRECATED_TEE_NAMES.get(name)
    if old is None:
        return name
    new, why = old
    warnings.warn(
        ShieldDeprecationWarning(f"{where} {name!r} is deprecated, use {new!r} ({why})"),
        stacklevel=2,
    )
    return new
