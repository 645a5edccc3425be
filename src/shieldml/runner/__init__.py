"""``shieldml run``: a job manifest, attestation to the owners' brokers, the decrypted view, receipts.

Cloud side: this package runs inside the TEE and imports no server stack. Its public API:

- :func:`run_job` runs a job manifest end to end (:mod:`.run`);
- :class:`JobManifest` parses, checks and measures one (:mod:`.manifest`);
- :func:`verify_receipt` checks a run receipt against a release policy (:mod:`.receipt`);
- :func:`new_recipient` / :func:`open_key`: an owner's HPKE recipient key for outputs sealed to
  a public key instead of a broker's key (:mod:`.recipient`);
- :func:`provider_for` finds where evidence comes from (:mod:`.evidence`).

Names load on first use, so that the decrypted view (``shieldml.runner.view``, started
in the private root) imports only what it needs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from shieldml.runner.evidence import Evidence, Provider, provider_for
    from shieldml.runner.manifest import HashCache, JobManifest, ciphertext_digest
    from shieldml.runner.receipt import VerifiedReceipt, verify_receipt, write_receipt
    from shieldml.runner.recipient import new_recipient, open_key, open_output_key, sealed_key_path
    from shieldml.runner.run import RunTimes, run_job

_WHERE = {
    "Evidence": "evidence",
    "Provider": "evidence",
    "provider_for": "evidence",
    "HashCache": "manifest",
    "JobManifest": "manifest",
    "ciphertext_digest": "manifest",
    "VerifiedReceipt": "receipt",
    "verify_receipt": "receipt",
    "write_receipt": "receipt",
    "new_recipient": "recipient",
    "open_key": "recipient",
    "open_output_key": "recipient",
    "sealed_key_path": "recipient",
    "RunTimes": "run",
    "run_job": "run",
}

__all__ = [
    "Evidence",
    "HashCache",
    "JobManifest",
    "Provider",
    "RunTimes",
    "VerifiedReceipt",
    "ciphertext_digest",
    "new_recipient",
    "open_key",
    "open_output_key",
    "provider_for",
    "run_job",
    "sealed_key_path",
    "verify_receipt",
    "write_receipt",
]
assert sorted(__all__) == sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'shieldml.runner' has no attribute {name!r}")
    return getattr(importlib.import_module(f"shieldml.runner.{_WHERE[name]}"), name)


def __dir__() -> list[str]:
    return __all__
