"""The public front of ``shieldml serve``: TLS with the in-TEE key, the fresh-evidence endpoint,
and a byte pipe to the program on loopback.

Per connection, after the TLS handshake, the front reads request heads (at most 64 KiB each)
while they ask for ``GET /.well-known/shieldml/attestation?nonce=<64 hex>`` and answers those
itself, with evidence made for that nonce, the TLS key and the workload. The first other request
opens a connection to the program and from then on the front copies bytes both ways until
either side closes: keep-alive, chunked and streaming responses (tokens, server-sent events) pass
as they are. Buffers are bounded (64 KiB reads; writes wait for the peer to drain); no request
or response byte is logged or parsed after the switch.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import re
import ssl
from collections.abc import Callable
from typing import Any

from shieldml.client import ATTESTATION_PATH, attestation_report_data
from shieldml.runner.evidence import Provider
from shieldml.serve._identity import TlsIdentity

CHUNK = 64 * 1024
MAX_HEAD = 64 * 1024
_ATTEST = re.compile(
    rb"GET " + re.escape(ATTESTATION_PATH.encode()) + rb"\?nonce=([0-9a-f]{64}) HTTP/1\.1\r\n"
)


def _response(
    status: str, body: bytes, *, close: bool = False, kind: str = "application/json"
) -> bytes:
    head = (
        f"HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {len(body)}\r\n"
        f"Cache-Control: no-store\r\n{'Connection: close' + chr(13) + chr(10) if close else ''}\r\n"
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
    """Accepts TLS connections on ``host:port`` and serves them (see the module docstring)."""

    def __init__(
        self,
        identity: TlsIdentity,
        provider: Provider,
        workload_digest: str,
        upstream_port: int,
        *,
        log: Callable[[str], None],
    ) -> None:
        self.identity = identity
        self.provider = provider
        self.digest = workload_digest
        self.upstream_port = upstream_port
        self.log = log
        self.ssl: ssl.SSLContext = identity.server_context()
        self.connections = 0
        self.evidence_served = 0

    async def start(self, host: str, port: int) -> asyncio.Server:
        return await asyncio.start_server(
            self._connection, host, port, ssl=self.ssl, limit=MAX_HEAD, ssl_handshake_timeout=30
        )

    async def _evidence(self, nonce: bytes) -> bytes:
        rd = attestation_report_data(nonce, self.identity.spki, self.digest)
        ev = await asyncio.get_running_loop().run_in_executor(None, self.provider.evidence, rd)
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

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                    return
                m = _ATTEST.match(head)
                if m is None:
                    await self._pipe(head, reader, writer)
                    return
                if _has_body(head):
                    writer.write(_response("400 Bad Request", b"{}", close=True))
                    await writer.drain()
                    return
                try:
                    body = await self._evidence(bytes.fromhex(m.group(1).decode()))
                except Exception as e:  # a TEE that cannot attest now: say so, serve nothing
                    self.log(f"evidence failed: {type(e).__name__}: {e}")
                    writer.write(_response("503 Service Unavailable", b"{}", close=True))
                    await writer.drain()
                    return
                close = _wants_close(head)
                writer.write(_response("200 OK", body, close=close))
                await writer.drain()
                if close:
                    return
        except (ConnectionError, ssl.SSLError, OSError):
            return
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _pipe(
        self, head: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            up_r, up_w = await asyncio.open_connection("127.0.0.1", self.upstream_port, limit=CHUNK)
        except OSError:
            writer.write(_response("502 Bad Gateway", b"", close=True, kind="text/plain"))
            await writer.drain()
            return
        up_w.write(head)

        async def client_to_program() -> None:
            with contextlib.suppress(ConnectionError, OSError, ssl.SSLError):
                await up_w.drain()
                while data := await reader.read(CHUNK):
                    up_w.write(data)
                    await up_w.drain()
                if up_w.can_write_eof():
                    up_w.write_eof()

        async def program_to_client() -> None:
            with contextlib.suppress(ConnectionError, OSError, ssl.SSLError):
                while data := await up_r.read(CHUNK):
                    writer.write(data)
                    await writer.drain()

        up = asyncio.ensure_future(client_to_program())
        down = asyncio.ensure_future(program_to_client())
        try:
            await down  # the program is done answering (it closed its side)
        finally:
            up.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await up
            up_w.close()
            with contextlib.suppress(Exception):
                await up_w.wait_closed()
