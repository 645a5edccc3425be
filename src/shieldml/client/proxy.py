"""``shieldml proxy``: plain HTTP on localhost, attested TLS to the upstream ``shieldml serve``.

For unmodified clients (curl, an SDK, a browser). Every connection accepted on the local address
gets its own new upstream TLS connection, which is attested (fresh evidence bound to a fresh nonce
and that connection's TLS key, verified against the policy) before a byte of the client's is
forwarded; then bytes are copied both ways, so keep-alive, chunked and streaming responses pass
as they are. A refusal answers the client ``502`` with the failed checks and closes.

Every ``reattest_interval`` seconds the proxy also attests a fresh connection on its own: if that
is refused (collateral expired, TCB revoked, another program now behind the address), every open
upstream connection is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
from collections.abc import Callable

from shieldml.client._attest import AttestedPeer, ResponseReader, Verifier, attestation_request
from shieldml.client._transport import client_ssl_context
from shieldml.errors import PolicyDenied, ShieldError

CHUNK = 64 * 1024


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
        connect_timeout: float = 30.0,
    ) -> None:
        self.host, self.port = upstream_host, upstream_port
        self.verifier = verifier
        self.interval = reattest_interval
        self.log = log
        self.on_refusal = on_refusal
        self.timeout = connect_timeout
        self.ssl: ssl.SSLContext = client_ssl_context()
        self.attested: list[AttestedPeer] = []
        self.refusals = 0
        self._open: set[asyncio.StreamWriter] = set()

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, AttestedPeer]:
        """A new upstream TLS connection, attested; the refusal is raised (and it is closed)."""
        r, w = await asyncio.wait_for(
            asyncio.open_connection(
                self.host, self.port, ssl=self.ssl, server_hostname=self.host, limit=CHUNK
            ),
            self.timeout,
        )
        try:
            nonce = os.urandom(32)
            host = f"[{self.host}]" if ":" in self.host else self.host
            w.write(attestation_request(f"{host}:{self.port}", nonce))
            await w.drain()
            reader = ResponseReader()
            while not reader.feed(await asyncio.wait_for(r.read(65536), self.timeout)):
                pass
            ssl_object = w.get_extra_info("ssl_object")
            der = ssl_object.getpeercert(True) if ssl_object is not None else None
            if not der:
                raise ShieldError("the upstream TLS connection has no peer certificate")
            assert reader.status is not None
            peer = await asyncio.to_thread(
                self.verifier.verify, reader.status, reader.body, nonce, der
            )
        except BaseException:
            w.close()
            raise
        self.attested.append(peer)
        return r, w, peer

    async def start(self, host: str, port: int) -> asyncio.Server:
        server = await asyncio.start_server(self._connection, host, port, limit=CHUNK)
        if self.interval:
            self._task = asyncio.ensure_future(self._reattest())
        return server

    async def _reattest(self) -> None:
        assert self.interval
        while True:
            await asyncio.sleep(self.interval)
            try:
                _r, w, _peer = await self.connect()
                w.close()
            except ShieldError as e:
                self._refused(e)
                for up in list(self._open):
                    up.close()
            except (OSError, TimeoutError) as e:
                self.log(f"re-attestation: upstream unreachable: {e}")

    def _refused(self, e: ShieldError) -> None:
        self.refusals += 1
        if self.on_refusal is not None:
            self.on_refusal(e)
        else:
            self.log(refusal_text(e))

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                up_r, up_w, _peer = await self.connect()
            except ShieldError as e:
                self._refused(e)
                body = ("upstream refused by shieldml proxy: " + refusal_text(e)).encode()
                writer.write(
                    b"HTTP/1.1 502 Bad Gateway\r\nContent-Type: text/plain; charset=utf-8\r\n"
                    + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                    + body
                )
                await writer.drain()
                return
            except (OSError, TimeoutError) as e:
                self.log(f"upstream unreachable: {e}")
                writer.write(
                    b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                )
                await writer.drain()
                return
            self._open.add(up_w)
            try:
                await _pipe(reader, writer, up_r, up_w)
            finally:
                self._open.discard(up_w)
        except (ConnectionError, OSError, ssl.SSLError):
            return
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


async def _pipe(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    up_r: asyncio.StreamReader,
    up_w: asyncio.StreamWriter,
) -> None:
    """Copy bytes both ways until either side closes (bounded: each write is drained)."""

    async def up() -> None:
        with contextlib.suppress(ConnectionError, OSError, ssl.SSLError):
            while data := await reader.read(CHUNK):
                up_w.write(data)
                await up_w.drain()

    async def down() -> None:
        with contextlib.suppress(ConnectionError, OSError, ssl.SSLError):
            while data := await up_r.read(CHUNK):
                writer.write(data)
                await writer.drain()

    t_up, t_down = asyncio.ensure_future(up()), asyncio.ensure_future(down())
    try:
        await asyncio.wait({t_up, t_down}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in (t_up, t_down):
            t.cancel()
        up_w.close()
        with contextlib.suppress(Exception):
            await up_w.wait_closed()
