"""Clients of an attested model server (``shieldml serve``): nothing is sent before the server
proved, on that very connection, that it is the TEE and the program a policy accepts.

- :class:`AttestedTransport` / :class:`AsyncAttestedTransport`: httpx transports; every new
  connection fetches fresh evidence bound to its TLS key and a fresh nonce, verified against a
  release policy (the broker's TOML format, workload digest pinned) before the first request.
- :class:`Verifier`: that check on its own; raises the refusal (``AttestationError`` or
  ``PolicyDenied`` with its verdict; the CLI lays them out as ``attest explain`` does).
- :func:`attestation_report_data`, :func:`certificate_report_data`: the bindings
  (``docs/protocol.md``); the server side (:mod:`shieldml.serve`) uses the same functions.
- :mod:`shieldml.client.proxy`: ``shieldml proxy``, plain HTTP on localhost to an attested upstream.
"""

from __future__ import annotations

from shieldml.client._attest import (
    ATTESTATION_PATH,
    NONCE_SIZE,
    AttestedPeer,
    ResponseReader,
    Verifier,
    attestation_report_data,
    attestation_request,
    certificate_report_data,
    spki_of,
)
from shieldml.client._transport import (
    AsyncAttestedTransport,
    AsyncAttestingBackend,
    AttestedTransport,
    AttestingBackend,
    client_ssl_context,
)

__all__ = [
    "ATTESTATION_PATH",
    "NONCE_SIZE",
    "AsyncAttestedTransport",
    "AsyncAttestingBackend",
    "AttestedPeer",
    "AttestedTransport",
    "AttestingBackend",
    "ResponseReader",
    "Verifier",
    "attestation_report_data",
    "attestation_request",
    "certificate_report_data",
    "client_ssl_context",
    "spki_of",
]
