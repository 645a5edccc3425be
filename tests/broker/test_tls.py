"""TLS pinning and the broker client's refusals, each with the error class a caller tells apart."""

from __future__ import annotations

import base64
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from shieldml.broker import protocol
from shieldml.broker.client import BrokerClient
from shieldml.broker.server.config import self_signed
from shieldml.broker.tls import pinned_context
from shieldml.errors import (
    BrokerError,
    BrokerUnavailable,
    FingerprintMismatchError,
    FormatError,
)

WD = "sha256:" + "cd" * 32


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[tuple[str, str]]:
    """A TLS listener with a self-signed certificate that completes handshakes and hangs up:
    ``(url, fingerprint)``."""
    files = self_signed(tmp_path, ["127.0.0.1"])
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(files.cert, files.key)
    srv = socket.create_server(("127.0.0.1", 0))
    srv.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except TimeoutError:
                continue
            try:
                conn.settimeout(5)
                with ctx.wrap_socket(conn, server_side=True):
                    pass
            except (OSError, ssl.SSLError):
                conn.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield f"https://127.0.0.1:{srv.getsockname()[1]}", files.fingerprint
    stop.set()
    t.join(timeout=5)
    srv.close()


def test_the_pinned_certificate_is_trusted(tls_server: tuple[str, str]):
    url, fp = tls_server
    ctx = pinned_context(url, ":".join(fp[i : i + 2] for i in range(0, len(fp), 2)).upper())
    assert ctx.check_hostname is False and ctx.verify_mode is ssl.CERT_REQUIRED


def test_another_certificate_is_a_fingerprint_mismatch(tls_server: tuple[str, str]):
    url, fp = tls_server
    other = "ab" * 32
    with pytest.raises(FingerprintMismatchError, match="is not the pinned one") as e:
        pinned_context(url, other)
    assert isinstance(e.value, BrokerError) and not isinstance(e.value, BrokerUnavailable)
    assert (e.value.pinned, e.value.found, e.value.url) == (other, fp, url)
    assert e.value.status is None and "impostor" in (e.value.hint or "")
    with pytest.raises(FingerprintMismatchError):
        BrokerClient(url, fingerprint=other)


def test_no_listener_is_broker_unavailable():
    s = socket.create_server(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    with pytest.raises(BrokerUnavailable, match="cannot reach the broker"):
        pinned_context(f"https://127.0.0.1:{port}", "ab" * 32)


def _answering(doc: dict[str, Any]) -> BrokerClient:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json=doc)

    return BrokerClient("http://broker.test", transport=httpx.MockTransport(handler))


def test_a_malformed_release_answer_is_a_format_error():
    rk = protocol.RunnerKey.generate()
    sealed = base64.b64encode(protocol.seal(rk.kem_id, rk.public_bytes, "k", b"K" * 32)).decode()
    ok = {"keys": {"k": {"format": "stream", "sealed": sealed}}, "audit_seq": 7, "tee": "sgx"}
    c = _answering(ok)
    assert c.release(b"\0" * 32, rk, WD, ["k"], b"evidence").keys == {"k": ("stream", b"K" * 32)}
    for doc, message in [
        ({"keys": [], "audit_seq": 1}, "the release answer has no keys"),
        ({"keys": {"k": "x"}, "audit_seq": 1}, "key 'k': malformed release answer"),
        ({"keys": {"k": {"format": "stream", "sealed": "no*b64"}}}, "sealed value is not base64"),
        ({**ok, "audit_seq": "7"}, "audit_seq: not an integer in the release answer"),
        ({**ok, "audit_seq": True}, "audit_seq: not an integer in the release answer"),
    ]:
        with pytest.raises(FormatError, match=message):
            _answering(doc).release(b"\0" * 32, rk, WD, ["k"], b"evidence")


def test_an_answer_for_other_keys_is_a_broker_refusal_not_a_format_error():
    rk = protocol.RunnerKey.generate()
    doc = {"keys": {"theirs": {"format": "stream", "sealed": "AAAA"}}, "audit_seq": 1}
    with pytest.raises(BrokerError, match="keys not asked for: 'theirs'; keys missing: 'k'") as e:
        _answering(doc).release(b"\0" * 32, rk, WD, ["k"], b"evidence")
    assert not isinstance(e.value, FormatError) and e.value.status is None
