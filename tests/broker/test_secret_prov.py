"""Gramine secret provisioning: an enclave-side client with a simulated RA-TLS certificate."""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from OpenSSL import SSL

from shieldml.attest.simulated import SimulatedPlatform
from shieldml.broker.secret_prov import REQUEST, RESPONSE, SecretProvServer
from shieldml.broker.server import self_signed
from shieldml.broker.service import Settings
from shieldml.broker.storage import Store

MRENCLAVE = b"\x42" * 32
WRAP_KEY = bytes(range(16))
POLICY = f"""
[[profile]]
tee = "sgx"
mrenclave = ["{MRENCLAVE.hex()}"]
mrsigner = "any"
isv_prod_id = 0
min_isv_svn = 0
workload_digest = "any"   # Gramine enclaves are pinned by MRENCLAVE, which measures the manifest
insecure_allow_simulated = true
"""


@pytest.fixture
def server(tmp_path: Path, sim: SimulatedPlatform) -> Iterator[tuple[SecretProvServer, Store]]:
    store = Store(f"sqlite:///{tmp_path}/b.db", tmp_path / "state")
    store.put_key("wrap", "gramine-pf", WRAP_KEY)
    store.set_policy("wrap", POLICY)
    tls = self_signed(tmp_path / "state", ["127.0.0.1"])
    srv = SecretProvServer(store, Settings(trust=sim.trust()), "wrap", str(tls.cert), str(tls.key),
                           collateral_for=lambda _quote: sim.collateral("sgx"), port=0)  # fmt: skip
    srv.start()
    yield srv, store
    srv.stop()
    store.engine.dispose()


def enclave_request(port: int, cert_pem: bytes | None, key_pem: bytes | None, tmp: Path) -> bytes:
    """What Gramine's secret_prov_attest does: mutual TLS, request string, read the secret."""
    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    if cert_pem and key_pem:
        (tmp / "c.pem").write_bytes(cert_pem)
        (tmp / "k.pem").write_bytes(key_pem)
        ctx.use_certificate_file(str(tmp / "c.pem"))
        ctx.use_privatekey_file(str(tmp / "k.pem"))
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.settimeout(None)  # pyOpenSSL wants a blocking socket; the kernel bounds the wait
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 10, 0))
    conn = SSL.Connection(ctx, sock)
    conn.set_connect_state()
    try:
        conn.do_handshake()
        conn.sendall(REQUEST)
        data = b""
        while True:
            try:
                chunk = conn.recv(4096)
            except SSL.ZeroReturnError:
                break
            if not chunk:
                break
            data += chunk
        return data
    except (SSL.Error, OSError):
        return b""
    finally:
        sock.close()


def test_released_to_the_approved_enclave(
    server: tuple[SecretProvServer, Store], sim: SimulatedPlatform, tmp_path: Path
):
    srv, store = server
    cert, key = sim.ratls_certificate(mrenclave=MRENCLAVE)
    data = enclave_request(srv.port, cert, key, tmp_path)
    assert data[: len(RESPONSE)] == RESPONSE
    (size,) = struct.unpack(">I", data[len(RESPONSE) : len(RESPONSE) + 4])
    assert size == 16 and data[len(RESPONSE) + 4 :] == WRAP_KEY
    last = store.audit_records()[-1]
    assert last.event == "secret_prov" and last.data["allowed"] is True


def test_other_enclave_gets_nothing(
    server: tuple[SecretProvServer, Store], sim: SimulatedPlatform, tmp_path: Path
):
    srv, store = server
    cert, key = sim.ratls_certificate(mrenclave=b"\x00" * 32)
    assert enclave_request(srv.port, cert, key, tmp_path) == b""
    last = store.audit_records()[-1]
    assert last.data["allowed"] is False and any("mrenclave" in r for r in last.data["reasons"])


def test_debug_enclave_gets_nothing(
    server: tuple[SecretProvServer, Store], sim: SimulatedPlatform, tmp_path: Path
):
    srv, _ = server
    cert, key = sim.ratls_certificate(mrenclave=MRENCLAVE, debug=True)
    assert enclave_request(srv.port, cert, key, tmp_path) == b""


def test_client_without_certificate_is_refused(
    server: tuple[SecretProvServer, Store], tmp_path: Path
):
    srv, _ = server
    assert enclave_request(srv.port, None, None, tmp_path) == b""
