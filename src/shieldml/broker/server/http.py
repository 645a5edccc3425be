"""uvicorn's httptools protocol with a deadline on the request head (slowloris defence).

uvicorn bounds the idle time between requests on a keep-alive connection but not the time a client
takes to send a request line and headers: a client trickling one header byte every few seconds
holds a connection, and its file descriptor and memory, forever. The request *body* is bounded by
:class:`shieldml.broker.server.app.BodyLimit`; this protocol bounds the head. The deadline runs from
the moment the connection is open (after the TLS handshake, which asyncio bounds at 60 s) and from
the first byte of each later request on a kept-alive connection; a client that misses it gets
``408 Request Timeout`` and the connection is closed.
"""

from __future__ import annotations

import asyncio
import functools
import os
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

HEADER_TIMEOUT = 10.0
_408 = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n"
    b"content-length: 37\r\nconnection: close\r\n\r\nrequest headers not received in time\n"
)


@functools.cache
def configured_timeout() -> float:
    """``header_timeout_s`` from the broker configuration the worker processes inherit."""
    from shieldml.broker.server import BrokerConfig

    if "SHIELDML_BROKER_CONFIG" not in os.environ:
        return HEADER_TIMEOUT
    return BrokerConfig.from_env().header_timeout_s


class HeaderTimeoutProtocol(HttpToolsProtocol):
    """:class:`HttpToolsProtocol` whose request heads must arrive within ``header_timeout``."""

    header_timeout: float | None = None  # None: from the broker configuration

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_deadline: asyncio.TimerHandle | None = None
        self._timeout = self.header_timeout or configured_timeout()

    def _arm(self) -> None:
        if self._head_deadline is None:
            self._head_deadline = self.loop.call_later(self._timeout, self._head_too_slow)

    def _disarm(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _head_too_slow(self) -> None:
        self._head_deadline = None
        if self.cycle is not None and not self.cycle.response_complete:
            # a slow head pipelined behind a request still being answered: no 408 in the middle
            # of that response; the connection closes once it is sent
            self.cycle.keep_alive = False
            return
        if not self.transport.is_closing():
            self.transport.write(_408)
            self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]  # uvicorn's own signature, narrower than asyncio's
        super().connection_made(transport)
        self._arm()

    def on_message_begin(self) -> None:  # the first byte of a request (between requests
        super().on_message_begin()  # uvicorn's keep-alive timeout governs)
        self._arm()

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)
