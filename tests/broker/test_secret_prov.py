"""Gramine secret provisioning: an enclave-side client with a simulated RA-TLS certificate."""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from OpenSSL import SSL

from shieldml.attest import IntelCollateral
from shieldml.broker.server import self_signed
from shieldml.broker.server.app import Settings
from shieldml.broker.server.secret_prov import REQUEST, RESPONSE, SecretProvServer
from shieldml.broker.server.storage import Store
from shieldml.testing.simulated import SimulatedPlatform, system_clock
from tests.conftest import sgx_policy

MRENCLAVE = b"\x42" * 32
WRAP_KEY = bytes(range(16))
# Gramine enclaves are pinned by MRENCLAVE, which measures the manifest: no workload digest
POLICY = sgx_policy(MRENCLAVE, '"any"')


@pytest.fixture
def server(
    tmp_path: Path, sim: SimulatedPlatform, request: pytest.FixtureRequest
) -> Iterator[tuple[SecretProvServer, Store]]:
    """The listener; ``@pytest.mark.limits(deadline=..., max_connections=...)`` tightens it."""
    marker = request.node.get_closest_marker("limits")
    limits = marker.kwargs if marker else {}
    store = Store(f"sqlite:///{tmp_path}/b.db", tmp_path / "state")
    store.put_key("wrap", "gramine-pf", WRAP_KEY)
    store.set_policy("wrap", POLICY)
    tls = self_signed(tmp_path / "state", ["127.0.0.1"])
    srv = SecretProvServer(store, Settings(trust=sim.trust()), "wrap", str(tls.cert), str(tls.key),
                           collateral_for=lambda _quote: sim.collateral("sgx"), port=0, **limits)  # fmt: skip
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


def _closed_within(sock: socket.socket, seconds: float, trickle: bytes = b"") -> float | None:
    """Seconds until the server closes ``sock`` (sending ``trickle`` every 0.2 s meanwhile)."""
    start = time.monotonic()
    sock.settimeout(0.2)
    while time.monotonic() - start < seconds:
        try:
            if not sock.recv(4096):
                return time.monotonic() - start
        except TimeoutError:
            if trickle:
                try:
                    sock.sendall(trickle)
                except OSError:
                    return time.monotonic() - start
        except OSError:
            return time.monotonic() - start
    return None


@pytest.mark.limits(deadline=1.0)
def test_a_trickling_peer_is_cut_off_at_the_deadline(server: tuple[SecretProvServer, Store]):
    """A byte every 0.2 s restarts the per-read timeout forever; the deadline still ends it."""
    srv, _ = server
    with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as s:
        s.sendall(b"\x16\x03\x01\x02\x00")  # a 512-byte handshake record, sent a byte at a time
        took = _closed_within(s, 8, trickle=b"\x01")
    assert took is not None and 0.5 < took < 5


@pytest.mark.limits(deadline=1.0, max_connections=2)
def test_connections_beyond_the_cap_are_closed_and_service_resumes(
    server: tuple[SecretProvServer, Store], sim: SimulatedPlatform, tmp_path: Path
):
    srv, _ = server
    idle = [socket.create_connection(("127.0.0.1", srv.port), timeout=5) for _ in range(2)]
    time.sleep(0.2)  # both accepted and holding their slots
    with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as extra:
        took = _closed_within(extra, 0.8)
        assert took is not None and took < 0.8, "the third connection was not refused at once"
    for s in idle:
        assert _closed_within(s, 5) is not None  # cut at the deadline, slots released
        s.close()
    cert, key = sim.ratls_certificate(mrenclave=MRENCLAVE)
    # the client sees its socket closed a moment before the server's thread gives the slot back
    # (under load, that moment was long enough to refuse the next connection): resumes within 5 s
    deadline = time.monotonic() + 5
    while enclave_request(srv.port, cert, key, tmp_path)[: len(RESPONSE)] != RESPONSE:
        assert time.monotonic() < deadline, "service did not resume after the slots were freed"
        time.sleep(0.1)


def test_untrusted_ratls_certificate_triggers_no_collateral_lookup(
    tmp_path: Path, sim: SimulatedPlatform
):
    """Secret provisioning asked its collateral source (a PCCS, in production) for the quote of
    any client certificate before verifying a thing: a certificate from an untrusted platform
    made the broker look its platform up. The same release core as ``/v1/release`` now verifies
    the PCK chain first, and audits the refusal once."""
    asked: list[bytes] = []

    def source(quote: bytes) -> IntelCollateral:
        asked.append(quote)
        return sim.collateral("sgx")

    store = Store(f"sqlite:///{tmp_path}/b.db", tmp_path / "state")
    store.put_key("wrap", "gramine-pf", WRAP_KEY)
    store.set_policy("wrap", POLICY)
    tls = self_signed(tmp_path / "state", ["127.0.0.1"])
    srv = SecretProvServer(store, Settings(trust=sim.trust()), "wrap", str(tls.cert), str(tls.key),
                           collateral_for=source, port=0)  # fmt: skip
    srv.start()
    try:
        stranger = SimulatedPlatform.create(clock=system_clock)
        cert, key = stranger.ratls_certificate(mrenclave=MRENCLAVE)
        before = store.audit_head().seq
        assert enclave_request(srv.port, cert, key, tmp_path) == b""
        assert asked == [], "collateral was looked up for an unverified platform"
        records = store.audit_records(before)
        assert len(records) == 1 and records[0].data["allowed"] is False
        assert "untrusted root" in records[0].data["reason"]
        cert, key = sim.ratls_certificate(mrenclave=MRENCLAVE)  # the approved enclave still gets it
        assert enclave_request(srv.port, cert, key, tmp_path)[: len(RESPONSE)] == RESPONSE
        assert len(asked) == 1
    finally:
        srv.stop()
        store.engine.dispose()


def test_secret_provisioning_refuses_a_key_of_another_format(
    server: tuple[SecretProvServer, Store], sim: SimulatedPlatform, tmp_path: Path
):
    srv, store = server
    store.put_key("wrap", "stream", bytes(32), replace=True)
    cert, key = sim.ratls_certificate(mrenclave=MRENCLAVE)
    assert enclave_request(srv.port, cert, key, tmp_path) == b""
    last = store.audit_records()[-1]
    assert last.event == "secret_prov" and last.data["allowed"] is False
    assert last.data["denied"] == ["wrap"]
