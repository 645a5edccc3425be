"""``shieldml proxy``: plain HTTP on localhost, attested TLS to the upstream ``shieldml serve``.

For unmodified clients (curl, an SDK, a browser). Every connection accepted on the local address
gets its own new upstream TLS connection, which is attested (fresh evidence bound to a fresh nonce
and that connection's TLS key, verified against the policy) before a byte of the client's is
forwarded; then bytes are copied both ways, so keep-alive, chunked and streaming responses pass
as they are. A refusal answers the client ``502`` with the failed checks and closes.

Every ``reattest_interval`` seconds the proxy also attests a fresh connection on its own: if that
is refused (collateral expired, TCB revoked, another program now behind the address), every open
upstream connection is closed.

One thread per connection, which alone touches its TLS object (as the serve front does).
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import ssl
import threading
from collections.abc import Callable, Iterator

from shieldml.client._attest import AttestedPeer, ResponseReader, Verifier, attestation_request
from shieldml.client._transport import client_ssl_context
from shieldml.errors import PolicyDenied, ShieldError

CHUNK = 64 * 1024
#: local connections served at once (a thread each); beyond, new ones are closed at once
MAX_CONNECTIONS = 1024


def refusal_text(e: ShieldError) -> str:
    """A refusal as plain text: every failed check with what was expected and found."""
    if isinstance(e, PolicyDenied) and e.verdict is not None:
        return "policy denied:\n" + "\n".join(f"  {f}" for f in e.verdict.failures()) + "\n"
    return e.diagnostics() + "\n"


class Proxy:
    """The local proxy to one attested upstream (see the module docstring)."""

    def __init__(
        self,
        upstream_host: str,
        upstream_port: int,
        verifier: Verifier,
        *,
        reattest_interval: float | None = 300.0,
        log: Callable[[str], None] = lambda _s: None,
        on_refusal: Callable[[ShieldError], None] | None = None,
        timeout: float = 30.0,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        self.host, self.port = upstream_host, upstream_port
        self.verifier = verifier
        self.interval = reattest_interval
        self.log = log
        self.on_refusal = on_refusal
        self.timeout = timeout
        self.ssl: ssl.SSLContext = client_ssl_context()
        self.attested: list[AttestedPeer] = []
        self.refusals = 0
        self._open: set[ssl.SSLSocket] = set()
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._sock: socket.socket | None = None
        self._slots = threading.BoundedSemaphore(max_connections)

    def connect(self) -> tuple[ssl.SSLSocket, AttestedPeer]:
        """A new upstream TLS connection, attested; the refusal is raised (and it is closed)."""
        raw = socket.create_connection((self.host, self.port), timeout=self.timeout)
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            tls = self.ssl.wrap_socket(raw, server_hostname=self.host)
        except BaseException:
            raw.close()
            raise
        try:
            nonce = os.urandom(32)
            host = f"[{self.host}]" if ":" in self.host else self.host
            tls.sendall(attestation_request(f"{host}:{self.port}", nonce))
            reader = ResponseReader()
            while not reader.feed(tls.recv(65536)):
                pass
            der = tls.getpeercert(True)
            if not der:
                raise ShieldError("the upstream TLS connection has no peer certificate")
            assert reader.status is not None
            peer = self.verifier.verify(reader.status, reader.body, nonce, der)
        except BaseException:
            tls.close()
            raise
        tls.settimeout(None)
        self.attested.append(peer)
        return tls, peer

    def start(self, host: str, port: int) -> tuple[str, int]:
        """Listen on ``host:port`` and serve in threads; the address."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._sock = socket.create_server((host, port), family=family, backlog=512)
        threading.Thread(target=self._accept, name="shieldml-proxy", daemon=True).start()
        if self.interval:
            threading.Thread(target=self._reattest, name="shieldml-reattest", daemon=True).start()
        name = self._sock.getsockname()
        return str(name[0]), int(name[1])

    def close(self) -> None:
        self._closed.set()
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
            self._sock.close()
        self._close_upstreams()

    def _close_upstreams(self) -> None:
        with self._lock:
            for up in list(self._open):
                # the socket's own shutdown, not SSLSocket's: the pipe thread owns the TLS object
                with contextlib.suppress(OSError):
                    socket.socket.shutdown(up, socket.SHUT_RDWR)

    def _accept(self) -> None:
        assert self._sock is not None
        while not self._closed.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            if not self._slots.acquire(blocking=False):
                conn.close()
                continue
            threading.Thread(target=self._connection, args=(conn,), daemon=True).start()

    def _reattest(self) -> None:
        assert self.interval
        while not self._closed.wait(self.interval):
            try:
                tls, _peer = self.connect()
                tls.close()
            except ShieldError as e:
                self._refused(e)
                self._close_upstreams()
            except OSError as e:
                self.log(f"re-attestation: upstream unreachable: {e}")

    def _refused(self, e: ShieldError) -> None:
        self.refusals += 1
        if self.on_refusal is not None:
            self.on_refusal(e)
        else:
            self.log(refusal_text(e))

    def _connection(self, conn: socket.socket) -> None:
        with conn, _released(self._slots):
            try:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                try:
                    up, _peer = self.connect()
                except ShieldError as e:
                    self._refused(e)
                    body = ("upstream refused by shieldml proxy: " + refusal_text(e)).encode()
                    conn.sendall(
                        b"HTTP/1.1 502 Bad Gateway\r\nContent-Type: text/plain; charset=utf-8\r\n"
                        + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                        + body
                    )
                    return
                except OSError as e:
                    self.log(f"upstream unreachable: {e}")
                    conn.sendall(
                        b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                    )
                    return
                with self._lock:
                    self._open.add(up)
                try:
                    _pipe(conn, up)
                finally:
                    with self._lock:
                        self._open.discard(up)
                    up.close()
            except (OSError, ssl.SSLError, ValueError):
                return


@contextlib.contextmanager
def _released(slots: threading.BoundedSemaphore) -> Iterator[None]:
    try:
        yield
    finally:
        slots.release()


def _pipe(conn: socket.socket, up: ssl.SSLSocket) -> None:
    """Copy bytes both ways until either side closes (bounded: 64 KiB reads, blocking writes)."""
    while True:
        readable, _, _ = select.select([conn, up], [], [])
        if conn in readable:
            data = conn.recv(CHUNK)
            if not data:
                return
            up.sendall(data)
        if up in readable:
            while True:  # what OpenSSL decrypted already is not visible to select
                data = up.recv(CHUNK)
                if not data:
                    return
                conn.sendall(data)
                if not up.pending():
                    break
