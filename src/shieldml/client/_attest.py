"""The attested-connection protocol, without I/O: the bindings, the evidence request on a fresh
TLS connection, reading its answer, and verifying it against a release policy.

Binding of the fresh evidence (``GET /.well-known/shieldml/attestation?nonce=<64 hex>``)::

    REPORTDATA = SHA-512( "shieldml/v1 serve\\0" || nonce[32] || SHA-256(SPKI)[32] || workload_digest[32] )

Binding of the RA-TLS certificate's quote (Gramine's legacy shape: the first half is what
Gramine's verifiers compare)::

    REPORTDATA = SHA-256(SPKI)[32] || SHA-256( "shieldml/v1 serve certificate\\0" || workload_digest[32] )[32]

``SPKI`` is the DER SubjectPublicKeyInfo of the TLS certificate's key; ``workload_digest`` the 32
raw bytes of the ``sha256:<hex>`` digest. Specified in ``docs/protocol.md``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from shieldml.attest import (
    Check,
    Claims,
    IntelCollateral,
    TeeKind,
    TrustAnchors,
    VerificationCache,
    verify_evidence,
)
from shieldml.errors import AttestationError, FormatError, PolicyError
from shieldml.policy import Policy, Verdict, require

SERVE_DOMAIN = b"shieldml/v1 serve\0"
CERT_DOMAIN = b"shieldml/v1 serve certificate\0"
ATTESTATION_PATH = "/.well-known/shieldml/attestation"
NONCE_SIZE = 32
MAX_HEAD = 16 * 1024
MAX_BODY = 1 << 20
_WORKLOAD = re.compile(r"sha256:[0-9a-f]{64}")
_HOST = re.compile(r"[A-Za-z0-9.\-:\[\]_%]{1,300}")


def _digest_bytes(workload_digest: str) -> bytes:
    if not isinstance(workload_digest, str) or not _WORKLOAD.fullmatch(workload_digest):
        raise FormatError(
            f"workload digest must be sha256:<64 hex digits>, not {workload_digest!r}"
        )
    return bytes.fromhex(workload_digest[7:])


def attestation_report_data(nonce: bytes, spki: bytes, workload_digest: str) -> bytes:
    """The 64 bytes of report data that bind fresh evidence to the client's ``nonce``, the TLS
    key (its DER SubjectPublicKeyInfo ``spki``) and the workload."""
    if len(nonce) != NONCE_SIZE:
        raise FormatError(f"the nonce must be {NONCE_SIZE} bytes")
    return hashlib.sha512(
        SERVE_DOMAIN + nonce + hashlib.sha256(spki).digest() + _digest_bytes(workload_digest)
    ).digest()


def certificate_report_data(spki: bytes, workload_digest: str) -> bytes:
    """The report data of the RA-TLS certificate's quote: Gramine's key binding, then the workload."""
    return (
        hashlib.sha256(spki).digest()
        + hashlib.sha256(CERT_DOMAIN + _digest_bytes(workload_digest)).digest()
    )


def spki_of(der_certificate: bytes) -> bytes:
    """The DER SubjectPublicKeyInfo of a certificate (what the TLS handshake proved possession of)."""
    try:
        cert = x509.load_der_x509_certificate(der_certificate)
        return cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    except ValueError as e:
        raise FormatError(f"the server's TLS certificate does not parse: {e}") from e


def attestation_request(host: str, nonce: bytes) -> bytes:
    """The evidence request, the first bytes sent on a new connection."""
    if not _HOST.fullmatch(host):
        raise FormatError(f"not a host name: {host!r}")
    return (
        f"GET {ATTESTATION_PATH}?nonce={nonce.hex()} HTTP/1.1\r\nHost: {host}\r\n"
        "Accept: application/json\r\nUser-Agent: shieldml-client\r\n\r\n"
    ).encode("ascii")


class ResponseReader:
    """Reads one HTTP/1.1 response with a Content-Length body (bounded); nothing may follow it."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.status: int | None = None
        self._body_at = 0
        self._length = 0

    def feed(self, data: bytes) -> bool:
        """Add received bytes; True once the whole response is there."""
        if not data:
            raise FormatError(
                "the server closed the connection before answering the attestation request"
            )
        self.buf += data
        if self.status is None:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buf) > MAX_HEAD:
                    raise FormatError("the attestation answer's header is too large")
                return False
            self._head(bytes(self.buf[:end]).decode("latin-1"))
            self._body_at = end + 4
        have = len(self.buf) - self._body_at
        if have > self._length:
            raise FormatError("the server sent more than the attestation answer")
        return have == self._length

    def _head(self, head: str) -> None:
        lines = head.split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
            raise FormatError(f"not an HTTP/1.1 answer: {lines[0][:80]!r}")
        length = None
        for line in lines[1:]:
            name, _, value = line.partition(":")
            key = name.strip().lower()
            if key == "transfer-encoding":
                raise FormatError("the attestation answer must have a Content-Length")
            if key == "content-length":
                if not value.strip().isdigit() or (length is not None and int(value) != length):
                    raise FormatError("malformed Content-Length in the attestation answer")
                length = int(value)
        if length is None or length > MAX_BODY:
            raise FormatError("the attestation answer has no Content-Length, or too large a body")
        self.status, self._length = int(parts[1]), length

    @property
    def body(self) -> bytes:
        return bytes(self.buf[self._body_at :])


@dataclass(frozen=True)
class AttestedPeer:
    """What one connection's verification established."""

    claims: Claims
    verdict: Verdict
    workload_digest: str
    spki_sha256: str
    verified_at: datetime

    def to_dict(self) -> dict[str, Any]:
        return {
            "tee": self.claims.tee.value,
            "workload_digest": self.workload_digest,
            "spki_sha256": self.spki_sha256,
            "verified_at": self.verified_at.isoformat(),
            "claims": self.claims.to_dict(),
            "verdict": self.verdict.to_dict(),
        }


def _now() -> datetime:
    return datetime.now(UTC)


def _fail(check: str, message: str, passed: list[Check], **kw: Any) -> AttestationError:
    e = AttestationError(check, message, **kw)
    e.checks = [*passed, Check(check, False, e.message, e.expected, e.found, e.hint)]
    return e


class Verifier:
    """Checks a connection's fresh evidence against a release policy (the broker's TOML format).

    Every profile of ``policy`` must pin ``workload_digest``: the policy says which program the
    client trusts with its requests, not only which TEE. ``trust``: the roots the evidence must
    chain to (default: the pinned vendor roots; a simulated platform's only when added, and then
    only with the policy's ``insecure_allow_simulated``). ``clock``: the verification time.
    """

    def __init__(
        self,
        policy: Policy,
        *,
        trust: TrustAnchors | None = None,
        clock: Callable[[], datetime] = _now,
        cache: VerificationCache | None = None,
    ) -> None:
        unpinned = [i + 1 for i, p in enumerate(policy.profiles) if p.workload_digests is None]
        if unpinned:
            raise PolicyError(
                f"profile {', '.join(map(str, unpinned))} of the policy does not pin "
                "workload_digest: a client must name the program it sends requests to",
                hint='set workload_digest = ["sha256:..."] (`shieldml job measure job.toml`)',
            )
        self.policy = policy
        self.trust = trust
        self.clock = clock
        self.cache = cache or VerificationCache()

    def verify(self, status: int, body: bytes, nonce: bytes, peer_der: bytes) -> AttestedPeer:
        """Raise :class:`AttestationError` (not genuine, or not bound to this nonce and this
        connection's key) or :class:`~shieldml.errors.PolicyDenied` (the verdict); else return
        what was verified."""
        spki = spki_of(peer_der)
        live = hashlib.sha256(spki).hexdigest()
        if status != 200:
            raise _fail(
                "attestation endpoint",
                f"the server answered {status} to the evidence request: it is not a shieldml "
                "serve front in a TEE",
                [],
                expected=f"200 from {ATTESTATION_PATH}",
                found=str(status),
                hint="the server may run outside any TEE; never send it a request",
            )
        try:
            doc = json.loads(body)
            data = base64.b64decode(doc["evidence"], validate=True)
            tee = doc["tee"]
            digest = doc["workload_digest"]
            col_doc, vcek_b64 = doc.get("collateral"), doc.get("vcek")
            col = IntelCollateral.from_json(json.dumps(col_doc)) if col_doc else None
            vcek = base64.b64decode(vcek_b64, validate=True) if vcek_b64 else None
            claimed_nonce, claimed_key = str(doc.get("nonce", "")), str(doc.get("spki_sha256", ""))
        except (ValueError, KeyError, TypeError, binascii.Error) as e:
            raise FormatError(f"the attestation answer is malformed: {e}") from e
        if tee not in tuple(k.value for k in TeeKind):
            raise FormatError(f"the attestation answer names an unknown TEE {tee!r}")
        _digest_bytes(digest)
        at = self.clock()
        claims = verify_evidence(
            data, tee=tee, collateral=col, vcek=vcek, now=at, trust=self.trust, cache=self.cache
        )
        expected = attestation_report_data(nonce, spki, digest)
        if not hmac.compare_digest(expected, claims.report_data):
            passed = list(claims.checks)
            if claimed_nonce != nonce.hex():
                raise _fail(
                    "fresh evidence",
                    "the evidence was made for another nonce than this connection's (replayed)",
                    passed,
                    expected=nonce.hex(),
                    found=claimed_nonce or "none stated",
                    hint="someone between client and server replays old evidence",
                )
            if claimed_key != live:
                raise _fail(
                    "TLS key binding",
                    "the evidence binds another TLS key than the one this connection was "
                    "made with (relayed by a man in the middle)",
                    passed,
                    expected=f"SPKI SHA-256 {live}",
                    found=f"SPKI SHA-256 {claimed_key or 'none stated'}",
                    hint="the server that answered is not the attested TEE; never send it a request",
                )
            raise _fail(
                "report data binding",
                "the evidence's report data does not bind this nonce, this TLS key and the "
                "stated workload digest",
                passed,
                expected=expected.hex(),
                found=claims.report_data.hex(),
            )
        verdict = require(self.policy, claims, digest)
        return AttestedPeer(claims, verdict, digest, live, at)
