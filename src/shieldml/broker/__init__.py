"""Talking to key brokers: the client, the wire protocol, TLS pinning, the audit log (cloud side).

Everything here runs inside the TEE or on an owner's laptop and needs no server stack. The broker
itself (HTTP app, storage, key-encryption key, Gramine secret provisioning) is
:mod:`shieldml.broker.server`, installed with the ``[broker]`` extra.

Names load on first use, so that the decrypted view, which needs only :mod:`.protocol` (to seal
an output's key to a recipient), does not import the HTTP client.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from shieldml.broker.audit import AuditRecord, ChainHead, verify_chain, verify_log
    from shieldml.broker.client import BrokerClient, ReleasedKeys
    from shieldml.broker.tls import cert_fingerprint, pinned_context
    from shieldml.errors import BrokerError

_WHERE = {
    "AuditRecord": "shieldml.broker.audit",
    "ChainHead": "shieldml.broker.audit",
    "verify_chain": "shieldml.broker.audit",
    "verify_log": "shieldml.broker.audit",
    "BrokerClient": "shieldml.broker.client",
    "ReleasedKeys": "shieldml.broker.client",
    "cert_fingerprint": "shieldml.broker.tls",
    "pinned_context": "shieldml.broker.tls",
    "BrokerError": "shieldml.errors",
}

__all__ = [
    "AuditRecord",
    "BrokerClient",
    "BrokerError",
    "ChainHead",
    "ReleasedKeys",
    "cert_fingerprint",
    "pinned_context",
    "verify_chain",
    "verify_log",
]
assert sorted(__all__) == sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'shieldml.broker' has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name]), name)


def __dir__() -> list[str]:
    return __all__
