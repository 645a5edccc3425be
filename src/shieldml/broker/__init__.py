"""Talking to key brokers: the client, the wire protocol, TLS pinning, the audit log (cloud side).

Everything here runs inside the TEE or on an owner's laptop and needs no server stack. The broker
itself (HTTP app, storage, key-encryption key, Gramine secret provisioning) is
:mod:`shieldml.broker.server`, installed with the ``[broker]`` extra.
"""

from __future__ import annotations

from shieldml.broker.audit import AuditRecord, ChainHead, verify_chain, verify_log
from shieldml.broker.client import BrokerClient, ReleasedKeys
from shieldml.broker.tls import cert_fingerprint, pinned_context
from shieldml.errors import BrokerError

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
