"""The public front of ``shieldml serve``: TLS with the in-TEE key, the fresh-evidence endpoint,
and a byte pipe to the program's loopback port (in its own network namespace: each connection
comes from the view's connector, ``shieldml.runner.view``).

Per connection, after the TLS handshake, the front reads request heads (at most 64 KiB each)
while they ask for ``GET /.well-known/shieldml/attestation?nonce=<64 hex>`` and answers those
itself, with evidence made for that nonce, the TLS key and the workload. The first other request
opens a connection to the program and from then on the front copies bytes both ways until
either side closes: keep-alive, chunked and streaming responses (tokens, server-sent events) pass
as they are. Buffers are bounded (64 KiB per read; a write blocks until the peer takes it); no
request or response byte is logged or parsed after the switch.

One thread per connection, which alone touches that connection's TLS object (OpenSSL objects
are not for concurrent use): it waits on both sockets with ``select`` and copies whichever is
readable, draining what OpenSSL already decrypted (``pending``) before waiting again. Blocking
``ssl`` sockets do the record work in C without the GIL; asyncio's TLS (memory BIOs driven from
Python) measured about half the throughput here.
"""

from __future__ import annotations

import base64
import contextlib
import json
import re
import select
import socket
import ssl
import threading
from collections.abc import Callable
from typing import Any

from shieldml.client import ATTESTATION_PATH, attestation_report_data
from shieldml.runner.evidence import Provider
from shieldml.serve._identity import TlsIdentity

CHUNK = 64 * 1024
MAX_HEAD = 64 * 1024
HANDSHAKE_TIMEOUT = 30.0
#: a connection must send its first request head within this (later: the program's own timeouts)
HEAD_TIMEOUT = 60.0
#: connections served at once; beyond, new ones are closed at once (a thread each)
MAX_CONNECTIONS = 1024
_ATTEST = re.compile(
    rb"GET " + re.escape(ATTESTATION_PATH.encode()) + rb"\?nonce=([0-9a-f]{64}) HTTP/1\.1\r\n"
)


def _response(
    status: str, body: bytes, *, close: bool = False, kind: str = "application/json"
) -> bytes:
    head = (
        f"HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {len(body)}\r\n"
        "Cache-Control: no-store\r\n" + ("Connection: close\r\n" if close else "") + "\r\n"
    )
    return head.encode("ascii") + body


def _wants_close(head: bytes) -> bool:
    return re.search(rb"\r\nconnection:[ \t]*close", head.lower()) is not None


def _has_body(head: bytes) -> bool:
    low = head.lower()
    return (
        b"\r\ntransfer-encoding:" in low
        or re.search(rb"\r\ncontent-length:[ \t]*0*[1-9]", low) is not None
    )


class Front:
    """Accepts TLS connections on a listening socket and serves them (module docstring)."""

    def __init__(
        self,
        identity: TlsIdentity,
        provider: Provider,
        workload_digest: str,
        connect: Callable[[], socket.socket],
        *,
        log: Callable[[str], None],
        head_timeout: float = HEAD_TIMEOUT,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        self.identity = identity
        self.provider = provider
        self.digest = workload_digest
        self.connect = connect
        self.log = log
        self.ssl: ssl.SSLContext = identity.server_context()
        self.connections = 0
        self.evidence_served = 0
        self._sock: socket.socket | None = None
        self._closed = threading.Event()
        self.head_timeout = head_timeout
        self._slots = threading.BoundedSemaphore(max_connections)

    def start(self, host: str, port: int) -> tuple[str, int]:
        """Listen on ``host:port`` (0: any free port) and accept in a thread; the address."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._sock = socket.create_server((host, port), family=family, backlog=512)
        threading.Thread(target=self._accept, name="shieldml-front", daemon=True).start()
        name = self._sock.getsockname()
        return str(name[0]), int(name[1])

    def close(self) -> None:
        self._closed.set()
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
            self._sock.close()

    def _accept(self) -> None:
        assert self._sock is not None
        while not self._closed.is_set():
            try:
                raw, _ = self._sock.accept()
            except OSError:
                return
            if not self._slots.acquire(blocking=False):
                raw.close()
                continue
            self.connections += 1
            threading.Thread(target=self._connection, args=(raw,), daemon=True).start()

    def evidence_answer(self, nonce: bytes) -> bytes:
        """The JSON body of the attestation endpoint for ``nonce``."""
        rd = attestation_report_data(nonce, self.identity.spki, self.digest)
        ev = self.provider.evidence(rd)
        self.evidence_served += 1
        doc: dict[str, Any] = {
            "shieldml_attestation": 1,
            "tee": ev.tee,
            "evidence": base64.b64encode(ev.data).decode(),
            "collateral": ev.collateral,
            "vcek": base64.b64encode(ev.vcek).decode() if ev.vcek else None,
            "cert_chain": ev.cert_chain,
            "workload_digest": self.digest,
            "spki_sha256": self.identity.spki_sha256,
            "nonce": nonce.hex(),
        }
        return json.dumps(doc).encode()

    def _connection(self, raw: socket.socket) -> None:
        try:
            raw.settimeout(HANDSHAKE_TIMEOUT)
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self.ssl.wrap_socket(raw, server_side=True) as tls:
                tls.settimeout(self.head_timeout)
                self._serve(tls)
        except (OSError, ssl.SSLError, ValueError):
            pass
        finally:
            raw.close()
            self._slots.release()

    def _serve(self, tls: ssl.SSLSocket) -> None:
        buf = b""
        while True:
            while (end := buf.find(b"\r\n\r\n")) < 0:
                if len(buf) > MAX_HEAD:
                    return
                data = tls.recv(CHUNK)
                if not data:
                    return
                buf += data
            head, buf = buf[: end + 4], buf[end + 4 :]
            m = _ATTEST.match(head)
            if m is None:
                self._pipe(tls, head + buf)
                return
            if _has_body(head):
                tls.sendall(_response("400 Bad Request", b"{}", close=True))
                return
            try:
                body = self.evidence_answer(bytes.fromhex(m.group(1).decode()))
            except Exception as e:  # a TEE that cannot attest now: say so, serve nothing
                self.log(f"evidence failed: {type(e).__name__}: {e}")
                tls.sendall(_response("503 Service Unavailable", b"{}", close=True))
                return
            close = _wants_close(head)
            tls.sendall(_response("200 OK", body, close=close))
            if close:
                return

    def _pipe(self, tls: ssl.SSLSocket, first: bytes) -> None:
        try:
            up = self.connect()
        except OSError:
            tls.sendall(_response("502 Bad Gateway", b"", close=True, kind="text/plain"))
            return
        with up:
            up.settimeout(None)
            tls.settimeout(None)
            up.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            up.sendall(first)
            client_open = True
            while True:
                watch = [up, tls] if client_open else [up]
                readable, _, _ = select.select(watch, [], [])
                if tls in readable:
                    while True:  # what OpenSSL decrypted already is not visible to select
                        data = tls.recv(CHUNK)
                        if not data:
                            client_open = False
                            with contextlib.suppress(OSError):
                                up.shutdown(socket.SHUT_WR)  # the program answers, then closes
                            break
                        up.sendall(data)
                        if not tls.pending():
                            break
                if up in readable:
                    data = up.recv(CHUNK)
                    if not data:
                        return  # the program closed its side: done
                    tls.sendall(data)
