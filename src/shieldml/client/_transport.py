"""httpx transports that attest every connection before any request byte is sent on it.

How: httpcore opens each pool connection through a *network backend*
(``connect_tcp``, then ``start_tls`` on the stream). Our backend wraps the stream; right after the
TLS handshake, still inside ``start_tls``, it sends the evidence request on that very TLS stream,
reads the answer, takes the peer certificate from the live ``ssl`` object, and verifies the
evidence bound to the nonce and that certificate's key. Only then does httpcore get the stream,
and with it the first request of the caller. A connection that fails is closed; the caller gets
the refusal. The connection pool can reuse a connection only after that, so verification is per
connection, never per request, and a request never goes to a connection that was not attested.

TLS: 1.3 only, ALPN ``http/1.1`` only (the evidence exchange is HTTP/1.1), no CA check: the
evidence, not a CA, vouches for the key, and TLS 1.3's CertificateVerify proves the server holds
it. Session resumption is never offered by httpcore (each connection does a full handshake).
"""

from __future__ import annotations

import os
import ssl
import time
from typing import Any

import httpcore
import httpx

from shieldml.client._attest import AttestedPeer, ResponseReader, Verifier, attestation_request
from shieldml.errors import ShieldError


def client_ssl_context() -> ssl.SSLContext:
    """TLS 1.3, HTTP/1.1, no certificate authority: the evidence authenticates the key."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def _host_header(host: str, port: int) -> str:
    h = f"[{host}]" if ":" in host else host
    return f"{h}:{port}"


def _peer_der(ssl_object: Any) -> bytes:
    der = ssl_object.getpeercert(True) if ssl_object is not None else None
    if not der:
        raise ShieldError("the TLS connection has no peer certificate")
    return bytes(der)


class _AttestedStream(httpcore.NetworkStream):
    def __init__(
        self, inner: httpcore.NetworkStream, backend: AttestingBackend, host: str, port: int
    ):
        self._inner, self._backend, self._host, self._port = inner, backend, host, port
        self._since = time.monotonic()
        self.peer: AttestedPeer | None = None

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._inner.read(max_bytes, timeout)

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._inner.write(buffer, timeout)

    def close(self) -> None:
        self._inner.close()

    def start_tls(  # the backend's own context: TLS 1.3, http/1.1, no CA
        self,
        ssl_context: ssl.SSLContext,  # noqa: ARG002
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.NetworkStream:
        tls = self._inner.start_tls(self._backend.ssl_context, server_hostname, timeout)
        try:
            nonce = os.urandom(32)
            tls.write(attestation_request(_host_header(self._host, self._port), nonce), timeout)
            reader = ResponseReader()
            while not reader.feed(tls.read(65536, timeout)):
                pass
            assert reader.status is not None
            peer = self._backend.verifier.verify(
                reader.status, reader.body, nonce, _peer_der(tls.get_extra_info("ssl_object"))
            )
        except BaseException:
            tls.close()
            raise
        out = _AttestedStream(tls, self._backend, self._host, self._port)
        out.peer = peer
        self._backend.attested.append(peer)
        return out

    def get_extra_info(self, info: str) -> Any:
        if info == "shieldml_peer":
            return self.peer
        age = self._backend.max_age
        if info == "is_readable" and age is not None and time.monotonic() - self._since > age:
            # an idle connection older than max_age looks closed to the pool, which then
            # opens (and attests) a new one
            return True
        return self._inner.get_extra_info(info)


class AttestingBackend(httpcore.NetworkBackend):
    """httpcore's default backend, with :class:`_AttestedStream` around every connection."""

    def __init__(self, verifier: Verifier, *, max_age: float | None = None) -> None:
        self.inner = httpcore.SyncBackend()
        self.verifier = verifier
        self.ssl_context = client_ssl_context()
        self.max_age = max_age
        self.attested: list[AttestedPeer] = []

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Any = None,
    ) -> httpcore.NetworkStream:
        inner = self.inner.connect_tcp(host, port, timeout, local_address, socket_options)
        return _AttestedStream(inner, self, host, port)

    def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Any = None,
    ) -> httpcore.NetworkStream:
        del path, timeout, socket_options
        raise ShieldError("attested connections are TCP with TLS; a Unix socket cannot be attested")

    def sleep(self, seconds: float) -> None:
        self.inner.sleep(seconds)


class _AsyncAttestedStream(httpcore.AsyncNetworkStream):
    def __init__(
        self,
        inner: httpcore.AsyncNetworkStream,
        backend: AsyncAttestingBackend,
        host: str,
        port: int,
    ):
        self._inner, self._backend, self._host, self._port = inner, backend, host, port
        self._since = time.monotonic()
        self.peer: AttestedPeer | None = None

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return await self._inner.read(max_bytes, timeout)

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        await self._inner.write(buffer, timeout)

    async def aclose(self) -> None:
        await self._inner.aclose()

    async def start_tls(  # the backend's own context: TLS 1.3, http/1.1, no CA
        self,
        ssl_context: ssl.SSLContext,  # noqa: ARG002
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.AsyncNetworkStream:
        tls = await self._inner.start_tls(self._backend.ssl_context, server_hostname, timeout)
        try:
            nonce = os.urandom(32)
            await tls.write(
                attestation_request(_host_header(self._host, self._port), nonce), timeout
            )
            reader = ResponseReader()
            while not reader.feed(await tls.read(65536, timeout)):
                pass
            assert reader.status is not None
            peer = self._backend.verifier.verify(
                reader.status, reader.body, nonce, _peer_der(tls.get_extra_info("ssl_object"))
            )
        except BaseException:
            await tls.aclose()
            raise
        out = _AsyncAttestedStream(tls, self._backend, self._host, self._port)
        out.peer = peer
        self._backend.attested.append(peer)
        return out

    def get_extra_info(self, info: str) -> Any:
        if info == "shieldml_peer":
            return self.peer
        age = self._backend.max_age
        if info == "is_readable" and age is not None and time.monotonic() - self._since > age:
            return True
        return self._inner.get_extra_info(info)


class AsyncAttestingBackend(httpcore.AsyncNetworkBackend):
    """The asynchronous :class:`AttestingBackend` (asyncio or trio, as httpcore detects)."""

    def __init__(self, verifier: Verifier, *, max_age: float | None = None) -> None:
        from httpcore._backends.auto import AutoBackend

        self.inner = AutoBackend()
        self.verifier = verifier
        self.ssl_context = client_ssl_context()
        self.max_age = max_age
        self.attested: list[AttestedPeer] = []

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Any = None,
    ) -> httpcore.AsyncNetworkStream:
        inner = await self.inner.connect_tcp(host, port, timeout, local_address, socket_options)
        return _AsyncAttestedStream(inner, self, host, port)

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Any = None,
    ) -> httpcore.AsyncNetworkStream:
        del path, timeout, socket_options
        raise ShieldError("attested connections are TCP with TLS; a Unix socket cannot be attested")

    async def sleep(self, seconds: float) -> None:
        await self.inner.sleep(seconds)


def _https_only(request: httpx.Request) -> None:
    if request.url.scheme != "https":
        raise ShieldError(
            f"{request.url}: an attested transport sends requests over https only",
            hint="a plain http URL would reach the server without attestation",
        )


class AttestedTransport(httpx.HTTPTransport):
    """An httpx transport whose every connection is verified first (see the module docstring).

    ``max_age``: seconds after which an idle connection is replaced by a freshly attested one
    (None: only when the server closes it). ``attested`` lists what each new connection verified.
    """

    def __init__(
        self,
        verifier: Verifier,
        *,
        limits: httpx.Limits = httpx.Limits(max_connections=100, max_keepalive_connections=20),  # noqa: B008
        max_age: float | None = None,
    ) -> None:
        super().__init__(limits=limits)
        self.backend = AttestingBackend(verifier, max_age=max_age)
        self._pool = httpcore.ConnectionPool(
            ssl_context=self.backend.ssl_context,
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            http1=True,
            http2=False,
            network_backend=self.backend,
        )

    @property
    def attested(self) -> list[AttestedPeer]:
        return self.backend.attested

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        _https_only(request)
        return super().handle_request(request)


class AsyncAttestedTransport(httpx.AsyncHTTPTransport):
    """The asynchronous :class:`AttestedTransport`."""

    def __init__(
        self,
        verifier: Verifier,
        *,
        limits: httpx.Limits = httpx.Limits(max_connections=100, max_keepalive_connections=20),  # noqa: B008
        max_age: float | None = None,
    ) -> None:
        super().__init__(limits=limits)
        self.backend = AsyncAttestingBackend(verifier, max_age=max_age)
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=self.backend.ssl_context,
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            http1=True,
            http2=False,
            network_backend=self.backend,
        )

    @property
    def attested(self) -> list[AttestedPeer]:
        return self.backend.attested

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        _https_only(request)
        return await super().handle_async_request(request)
