"""Gramine's secret provisioning protocol, served by the broker (``--secret-prov-port``).

An unmodified Gramine enclave (``SECRET_PROVISION_*`` variables, ``secret_prov`` library) connects
with mutual TLS, presenting its RA-TLS certificate as client certificate, and sends
``"SECRET_PROVISION_RA_TLS_REQUEST_V1\\0"`` (35 bytes). The broker verifies the quote inside the
certificate (and its binding to the certificate key) through the same release decision as
``/v1/release`` (:func:`shieldml.broker.server.release.decide`: one audit record, collateral
looked up only after the PCK chain verified, the key unwrapped only after its policy accepted),
with the configured ``gramine-pf`` key as the one key asked for, and answers
``"SECRET_PROVISION_RA_TLS_RESPONSE_V1:\\0"`` + ``u32be(len)`` (41 bytes) followed by the 16-byte
key, which Gramine writes to ``/dev/attestation/keys/<name>`` (``SECRET_PROVISION_SET_KEY``).
Spec: ``shared/docs/specs/gramine-formats.md`` §4.3. On refusal the connection is closed without
a response, as Gramine's server does, and the decision is audited.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace

from OpenSSL import SSL, crypto

from shieldml.attest import IntelCollateral
from shieldml.broker.server.release import ReleaseRequest, Settings, decide
from shieldml.broker.server.storage import Store
from shieldml.errors import BrokerError, ShieldError
from shieldml.files import Format

log = logging.getLogger("shieldml.broker.server.secret_prov")
REQUEST = b"SECRET_PROVISION_RA_TLS_REQUEST_V1\0"
RESPONSE = b"SECRET_PROVISION_RA_TLS_RESPONSE_V1:\0"
TIMEOUT = 30.0  # per read or write
DEADLINE = 30.0  # for the whole exchange: handshake, request, answer
MAX_CONNECTIONS = 64  # in progress at once; more are closed on accept
CHANNEL = "gramine secret provisioning"


@dataclass
class SecretProvServer:
    """A threaded TLS server; :meth:`start` returns once it listens."""

    store: Store
    settings: Settings
    key_name: str
    cert_file: str
    key_file: str
    collateral_for: Callable[[bytes], IntelCollateral]
    host: str = "127.0.0.1"
    port: int = 4433
    deadline: float = DEADLINE
    max_connections: int = MAX_CONNECTIONS

    def __post_init__(self) -> None:
        # the release core asks the settings' collateral source: make it this server's own
        self._settings = replace(self.settings, collateral_for=self.collateral_for)

    def start(self) -> None:
        ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
        ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
        ctx.use_certificate_file(self.cert_file)
        ctx.use_privatekey_file(self.key_file)
        # Demand a client certificate; its trust comes from the RA-TLS check after the handshake
        # (OpenSSL still verifies the client's proof of possession of the certificate key).
        ctx.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, lambda *_: True)
        self._ctx = ctx
        self._slots = threading.BoundedSemaphore(self.max_connections)
        self._sock = socket.create_server((self.host, self.port))
        self.port = self._sock.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, name="secret-prov", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._sock.close()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            if not self._slots.acquire(blocking=False):
                log.warning("secret provisioning: %d connections in progress, refusing one",
                            self.max_connections)  # fmt: skip
                conn.close()
                continue
            threading.Thread(target=self._bounded, args=(conn,), daemon=True).start()

    def _bounded(self, raw: socket.socket) -> None:
        """One connection, cut off at the deadline however slowly its peer trickles bytes
        (the per-read timeout alone restarts with every byte)."""
        timer = threading.Timer(self.deadline, _cut, args=(raw,))
        timer.start()
        try:
            self._handle(raw)
        finally:
            timer.cancel()
            self._slots.release()

    def _handle(self, raw: socket.socket) -> None:
        # pyOpenSSL needs a blocking socket; bound slow peers with kernel-level timeouts instead
        raw.settimeout(None)
        tv = struct.pack("ll", int(TIMEOUT), 0)
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)
        conn = SSL.Connection(self._ctx, raw)
        conn.set_accept_state()
        try:
            conn.do_handshake()
            request = _read_exact(conn, len(REQUEST))
            if request != REQUEST:
                self.store.audit(
                    "secret_prov",
                    {
                        "channel": CHANNEL,
                        "allowed": False,
                        "reason": "not a secret-provisioning request",
                    },
                )
                return
            peer = conn.get_peer_certificate()
            if peer is None:
                return
            secret = self.decide(crypto.dump_certificate(crypto.FILETYPE_ASN1, peer))
            if secret is not None:
                conn.sendall(RESPONSE + struct.pack(">I", len(secret)) + secret)
        except (SSL.Error, OSError, ShieldError) as e:
            log.warning("secret provisioning connection failed: %r", e)
        finally:
            with contextlib.suppress(SSL.Error):
                conn.shutdown()
            raw.close()

    def decide(self, cert_der: bytes) -> bytes | None:
        """The key for an RA-TLS certificate, or None (the decision audited either way)."""
        try:
            released = decide(
                self.store,
                self._settings,
                ReleaseRequest(
                    evidence=cert_der,
                    keys=[self.key_name],
                    binding=None,  # the RA-TLS certificate binds the key of this TLS connection
                    channel=CHANNEL,
                    event="secret_prov",
                    tee="ratls",
                    key_format=Format.GRAMINE_PF.value,
                ),
            )
        except BrokerError as e:  # refused: close without an answer, as Gramine's server does
            log.info("secret provisioning refused (%s): %s", e.status, type(e).__name__)
            return None
        return released.keys[self.key_name][1]


def _read_exact(conn: SSL.Connection, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        if not chunk:
            break
        buf += chunk
    return buf


def _cut(raw: socket.socket) -> None:
    """Unblock a thread stuck reading or writing ``raw``: its call fails, and it cleans up."""
    with contextlib.suppress(OSError):
        raw.shutdown(socket.SHUT_RDWR)
