"""TLS certificate pinning: what a broker client checks instead of a CA (no server imports).

A broker serves a self-signed certificate; each owner hands its SHA-256 fingerprint to whoever
connects (the runner's manifest, ``--fingerprint``). The client fetches the certificate, compares
the fingerprint, and then trusts exactly that certificate for the TLS handshake.
"""

from __future__ import annotations

import hashlib
import ssl
import urllib.parse

from shieldml.errors import BrokerUnavailable, FingerprintMismatchError

__all__ = ["cert_fingerprint", "pinned_context"]


def cert_fingerprint(pem_or_der: bytes) -> str:
    """SHA-256 over the certificate's DER encoding, lower-case hex (what clients pin)."""
    der = (
        ssl.PEM_cert_to_DER_cert(pem_or_der.decode())
        if pem_or_der.lstrip().startswith(b"-----")
        else pem_or_der
    )
    return hashlib.sha256(der).hexdigest()


def pinned_context(url: str, fingerprint: str) -> ssl.SSLContext:
    """An SSL context that trusts only the certificate with ``fingerprint`` at ``url``."""
    u = urllib.parse.urlsplit(url)
    try:
        pem = ssl.get_server_certificate((u.hostname or "localhost", u.port or 443), timeout=10)
    except OSError as e:
        raise BrokerUnavailable(None, f"{url}: cannot reach the broker: {e}") from e
    got = cert_fingerprint(pem.encode())
    pinned = fingerprint.lower().replace(":", "")
    if got != pinned:
        raise FingerprintMismatchError(
            url,
            pinned=pinned,
            found=got,
            hint="check --fingerprint; a different certificate may mean an impostor",
        )
    ctx = ssl.create_default_context(cadata=pem)
    ctx.check_hostname = False  # the pin replaces the name check; the chain is verified against it
    return ctx
