"""``shieldml serve`` end to end on loopback (simulated SGX): an unmodified HTTP server in the
private root behind attested TLS, clients that verify every connection first, and each move of
the hostile host or network as a test named after it."""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from shieldml.client import AsyncAttestedTransport, AttestedTransport, Verifier, client_ssl_context
from shieldml.errors import AttestationError, PolicyDenied, UntrustedRootError
from shieldml.policy import Policy
from shieldml.testing import free_port
from shieldml.testing.simulated import SimulatedPlatform, system_clock
from tests.serve.conftest import MODEL, Served, client_policy, start_serve, wait_until, write_job


def verifier(digest: str, trust, **extra: str) -> Verifier:  # type: ignore[no-untyped-def]
    return Verifier(Policy.from_toml(client_policy(digest, **extra)), trust=trust)


def test_requests_reach_the_program_over_one_attested_keep_alive_connection(served: Served, trust):
    t = AttestedTransport(verifier(served.digest, trust))
    with httpx.Client(transport=t, base_url=served.url) as c:
        responses = [c.get("/") for _ in range(3)]
    bodies = [r.text for r in responses]
    carried = responses[-1].extensions["network_stream"].get_extra_info("shieldml_peer")
    assert carried is t.attested[0]
    assert all(b.startswith(f"model {len(MODEL)} MODEL-MARK-7") for b in bodies)
    assert len(t.attested) == 1  # verified once per connection, not per request
    peers = {b.split(" peer ")[1] for b in bodies}
    assert len(peers) == 1  # one upstream connection: keep-alive passes through the front
    peer = t.attested[0]
    assert peer.workload_digest == served.digest and peer.spki_sha256 == served.spki_sha256
    assert peer.verdict.allowed


def test_chunked_streaming_response_passes_through_as_it_is_written(served: Served, trust):
    t = AttestedTransport(verifier(served.digest, trust))
    arrivals = []
    with (
        httpx.Client(transport=t, base_url=served.url) as c,
        c.stream("GET", "/stream") as r,
    ):
        assert r.headers["transfer-encoding"] == "chunked"
        for line in r.iter_lines():
            arrivals.append((time.monotonic(), line))
    assert [line for _, line in arrivals] == [f"token {i}" for i in range(4)]
    assert arrivals[-1][0] - arrivals[0][0] > 0.3  # tokens arrived as written, not all at once


def test_async_transport_attests_each_connection(served: Served, trust):
    async def go() -> list[str]:
        t = AsyncAttestedTransport(verifier(served.digest, trust))
        async with httpx.AsyncClient(transport=t, base_url=served.url) as c:
            out = await asyncio.gather(*(c.get("/") for _ in range(3)))
        assert 1 <= len(t.attested) <= 3 and all(p.verdict.allowed for p in t.attested)
        return [r.text for r in out]

    assert all(b.startswith("model ") for b in asyncio.run(go()))


def _count(served: Served, trust) -> int:  # type: ignore[no-untyped-def]
    with httpx.Client(transport=AttestedTransport(verifier(served.digest, trust))) as c:
        return int(c.get(served.url + "/").text.split(" count ")[1].split()[0])


def test_another_workload_digest_is_refused_before_any_request(served: Served, trust):
    before = _count(served, trust)
    other = "sha256:" + "ab" * 32
    with (
        httpx.Client(transport=AttestedTransport(verifier(other, trust))) as c,
        pytest.raises(PolicyDenied) as e,
    ):
        c.get(served.url + "/")
    assert e.value.verdict is not None
    failed = [x for p in e.value.verdict.profiles for x in p.checks if not x.passed]
    assert [x.name for x in failed] == ["workload_digest"]
    assert failed[0].actual == served.digest
    assert _count(served, trust) == before + 1  # the refused request never reached the program


def test_idle_connection_older_than_max_age_is_replaced_by_a_newly_attested_one(served, trust):
    t = AttestedTransport(verifier(served.digest, trust), max_age=0.3)
    with httpx.Client(transport=t, base_url=served.url) as c:
        c.get("/")
        c.get("/")
        assert len(t.attested) == 1
        time.sleep(0.4)
        c.get("/")
    assert len(t.attested) == 2


def test_plain_http_url_is_refused(served: Served, trust):
    with (
        httpx.Client(transport=AttestedTransport(verifier(served.digest, trust))) as c,
        pytest.raises(Exception, match="https only"),
    ):
        c.get(served.url.replace("https", "http") + "/")


def test_policy_without_workload_digest_is_refused(trust):
    text = client_policy("x").replace('workload_digest = ["x"]', 'workload_digest = "any"')
    with pytest.raises(Exception, match="workload_digest"):
        Verifier(Policy.from_toml(text), trust=trust)


def test_evidence_of_an_untrusted_platform_is_refused(served: Served, trust):
    """Without the simulated platform's root the same genuine-looking evidence is refused."""
    with (
        httpx.Client(
            transport=AttestedTransport(Verifier(Policy.from_toml(client_policy(served.digest))))
        ) as c,
        pytest.raises(UntrustedRootError),
    ):
        c.get(served.url + "/")


# -- impostors: a TLS server outside the TEE, a man in the middle ------------------------------


class Impostor:
    """A TLS server on loopback with its own key and the front's certificate shape (an RA-TLS
    certificate from another simulated platform). ``mode``: ``plain`` (no evidence endpoint:
    the unmodified server outside any TEE), ``relay`` (forwards the client's evidence request to
    the genuine front, relays the answer), ``replay`` (answers with evidence recorded earlier)."""

    def __init__(
        self, tmp: Path, other: SimulatedPlatform, genuine: Served, mode: str, recorded: bytes = b""
    ) -> None:
        cert, key = other.ratls_certificate(mrenclave=bytes.fromhex("5e" * 32))
        (tmp / "c.pem").write_bytes(cert)
        (tmp / "k.pem").write_bytes(key)
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(tmp / "c.pem", tmp / "k.pem")
        self.genuine, self.mode, self.recorded = genuine, mode, recorded
        self.received: list[bytes] = []
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"https://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                raw, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(raw,), daemon=True).start()

    def _one(self, raw: socket.socket) -> None:
        try:
            with self.ctx.wrap_socket(raw, server_side=True) as s:
                while True:
                    head = b""
                    while b"\r\n\r\n" not in head:
                        chunk = s.recv(65536)
                        if not chunk:
                            return
                        head += chunk
                    self.received.append(head)
                    if self.mode == "relay" and head.startswith(b"GET /.well-known/shieldml/"):
                        s.sendall(fetch(self.genuine, head))
                    elif self.mode == "replay" and head.startswith(b"GET /.well-known/shieldml/"):
                        s.sendall(self.recorded)
                    else:
                        s.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
        except (OSError, ssl.SSLError):
            return

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(scope="module")
def other(tmp_path_factory: pytest.TempPathFactory) -> SimulatedPlatform:
    """Another simulated platform (the impostor's: its root is trusted by no client)."""
    return SimulatedPlatform.open(tmp_path_factory.mktemp("other"), clock=system_clock)


def fetch(genuine: Served, head: bytes) -> bytes:
    """Send ``head`` to the genuine front on a new TLS connection; its whole answer."""
    from shieldml.client import ResponseReader

    with (
        socket.create_connection((genuine.host, genuine.port)) as raw,
        client_ssl_context().wrap_socket(raw, server_hostname=genuine.host) as s,
    ):
        s.sendall(head)
        r = ResponseReader()
        data = b""
        while True:
            chunk = s.recv(65536)
            data += chunk
            if r.feed(chunk):
                return data


def test_server_outside_the_tee_with_the_same_certificate_shape_is_refused(
    tmp_path, other, served, trust
):
    imp = Impostor(tmp_path, other, served, "plain")
    try:
        with (
            httpx.Client(transport=AttestedTransport(verifier(served.digest, trust))) as c,
            pytest.raises(AttestationError) as e,
        ):
            c.get(imp.url + "/predict")
    finally:
        imp.close()
    assert e.value.check == "attestation endpoint" and e.value.found == "404"
    assert len(imp.received) == 1 and imp.received[0].startswith(b"GET /.well-known/shieldml/")


def test_genuine_evidence_for_another_tls_key_relayed_by_a_man_in_the_middle_is_refused(
    tmp_path, other, served, trust
):
    imp = Impostor(tmp_path, other, served, "relay")
    try:
        with (
            httpx.Client(transport=AttestedTransport(verifier(served.digest, trust))) as c,
            pytest.raises(AttestationError) as e,
        ):
            c.get(imp.url + "/predict", headers={"x-secret": "prompt"})
    finally:
        imp.close()
    assert e.value.check == "TLS key binding"
    assert served.spki_sha256 in (e.value.found or "")  # genuine evidence, for the genuine key
    assert [c.name for c in e.value.checks][-1] == "TLS key binding"
    assert all(c.passed for c in e.value.checks[:-1])  # the evidence itself was genuine
    assert len(imp.received) == 1  # no request byte reached the man in the middle


def test_replayed_evidence_with_an_old_nonce_is_refused(tmp_path, other, served, trust):
    old = fetch(
        served,
        f"GET /.well-known/shieldml/attestation?nonce={'11' * 32} HTTP/1.1\r\nHost: x\r\n\r\n".encode(),
    )
    imp = Impostor(tmp_path, other, served, "replay", recorded=old)
    try:
        with (
            httpx.Client(transport=AttestedTransport(verifier(served.digest, trust))) as c,
            pytest.raises(AttestationError) as e,
        ):
            c.get(imp.url + "/")
    finally:
        imp.close()
    assert e.value.check == "fresh evidence" and e.value.found == "11" * 32
    assert len(imp.received) == 1


def test_replayed_answer_on_the_genuine_key_is_refused(served, trust):
    """Even with the genuine key (were the TLS key stolen), an answer for another nonce fails
    the report-data binding: the nonce, not the key, makes it fresh."""
    import hashlib
    import os

    from shieldml.client import ResponseReader

    old = fetch(
        served,
        f"GET /.well-known/shieldml/attestation?nonce={'22' * 32} HTTP/1.1\r\nHost: x\r\n\r\n".encode(),
    )
    r = ResponseReader()
    r.feed(old)
    doc = json.loads(r.body)
    nonce = os.urandom(32)
    doc["nonce"] = nonce.hex()  # the replayer also rewrites what the answer claims
    with (
        socket.create_connection((served.host, served.port)) as raw,
        client_ssl_context().wrap_socket(raw) as s,
    ):
        der = s.getpeercert(binary_form=True)
    assert der is not None
    from shieldml.client import spki_of

    assert hashlib.sha256(spki_of(der)).hexdigest() == served.spki_sha256
    with pytest.raises(AttestationError) as e:
        verifier(served.digest, trust).verify(200, json.dumps(doc).encode(), nonce, der)
    assert e.value.check == "report data binding"


def test_ratls_certificate_binds_the_tls_key_and_the_workload(served, trust):
    from shieldml.attest import verify_evidence
    from shieldml.attest._intel_collateral import IntelCollateral  # noqa: F401 - shape only
    from shieldml.client import certificate_report_data, spki_of

    pem = ssl.get_server_certificate((served.host, served.port))
    der = ssl.PEM_cert_to_DER_cert(pem)
    old = fetch(
        served,
        f"GET /.well-known/shieldml/attestation?nonce={'33' * 32} HTTP/1.1\r\nHost: x\r\n\r\n".encode(),
    )
    from shieldml.client import ResponseReader

    r = ResponseReader()
    r.feed(old)
    col = json.loads(r.body)["collateral"]
    from shieldml.attest import IntelCollateral as Col

    claims = verify_evidence(
        der, tee="ratls", collateral=Col.from_json(json.dumps(col)), trust=trust
    )
    assert claims.report_data == certificate_report_data(spki_of(der), served.digest)
    assert claims.checks[0].name == "RA-TLS binding" and claims.checks[0].passed


# -- servers that must not serve ---------------------------------------------------------------


def test_debug_tee_is_refused(tmp_path, sim_dir, trust):
    m = write_job(tmp_path / "dbg", sim_dir, port=free_port(), broker=None, debug=True)
    s = start_serve(m)
    try:
        with (
            httpx.Client(transport=AttestedTransport(verifier(s.digest, trust))) as c,
            pytest.raises(PolicyDenied) as e,
        ):
            c.get(s.url + "/")
    finally:
        s.stop()
    assert e.value.verdict is not None
    failed = [x.name for p in e.value.verdict.profiles for x in p.checks if not x.passed]
    assert failed == ["debug"]


def test_serve_writes_a_receipt_as_run_does(tmp_path, sim_dir, trust):
    """The program is stopped by SIGTERM (forwarded by the runner); its exit code passes through
    and the receipt verifies against the owner's policy, as for any run."""
    from shieldml.runner.receipt import verify_receipt

    m = write_job(tmp_path / "rcpt", sim_dir, port=free_port(), broker=None)
    receipt = tmp_path / "receipt.json"
    s = start_serve(m, "--receipt", str(receipt))
    with httpx.Client(transport=AttestedTransport(verifier(s.digest, trust))) as c:
        assert c.get(s.url + "/").text.startswith("model 0")
    rc = s.stop()
    assert rc == 128 + 15  # the program's own exit (SIGTERM), not the runner's 125
    report = [e for e in s.events if "exit_code" in e][-1]
    assert report["ok"] is True and report["receipt"] == str(receipt)
    v = verify_receipt(str(receipt), policy=Policy.from_toml(client_policy(s.digest)), trust=trust)
    assert v.body["workload_digest"] == s.digest and v.body["exit_code"] == rc


def test_host_process_on_the_program_port_gets_nothing_and_cannot_reach_the_program(
    tmp_path, sim_dir, trust
):
    """The host takes the program's loopback port first and answers like a server. The program
    runs in a network namespace of its own: it binds its port there, the front's requests reach
    it, the host's process gets none of them, and the host cannot reach the program either."""
    port = free_port()
    hijack = socket.create_server(("127.0.0.1", port))
    got: list[bytes] = []

    def answer() -> None:
        while True:
            try:
                conn, _ = hijack.accept()
            except OSError:
                return
            with conn:
                got.append(conn.recv(65536))
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nHIJACK")

    threading.Thread(target=answer, daemon=True).start()
    m = write_job(tmp_path / "hij", sim_dir, port=port, broker=None)
    s = start_serve(m)
    try:
        with httpx.Client(transport=AttestedTransport(verifier(s.digest, trust))) as c:
            assert c.get(s.url + "/").text.startswith("model 0 ")
        assert got == []  # not even the readiness probe went to the host's process
        with socket.create_connection(("127.0.0.1", port), timeout=5) as direct:
            direct.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert direct.recv(65536).endswith(b"HIJACK")  # the host reaches only itself
    finally:
        hijack.close()
        s.stop()


# -- shieldml proxy ----------------------------------------------------------------------------


def _proxy(served: Served, policy: Path, sim_dir: Path, *extra: str):  # type: ignore[no-untyped-def]
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "shieldml.cli", "proxy", "--upstream", served.url, "--policy", str(policy),
         "--listen", f"127.0.0.1:{port}", "--simulated-platform", str(sim_dir), "--json", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert wait_until(lambda: _open(port), 20), (
        proc.stderr.read() if proc.poll() is not None else ""
    )
    return proc, port


def _open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False


def test_curl_through_shieldml_proxy_keep_alive_and_streaming(tmp_path, served, sim_dir):
    pol = tmp_path / "policy.toml"
    pol.write_text(client_policy(served.digest))
    proc, port = _proxy(served, pol, sim_dir)
    try:
        base = f"http://127.0.0.1:{port}"
        out = subprocess.run(
            ["curl", "-sS", "--max-time", "20", base + "/", base + "/"],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        first, second = out.split("model ")[1:]
        assert first.split(" peer ")[1] == second.split(" peer ")[1]  # one kept-alive connection
        stream = subprocess.run(
            ["curl", "-sSN", "--max-time", "20", base + "/stream"],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        assert stream == "".join(f"token {i}\n" for i in range(4))
    finally:
        proc.terminate()
        proc.communicate(timeout=10)


def test_shieldml_proxy_refuses_another_workload_with_the_verdict(tmp_path, served, sim_dir):
    pol = tmp_path / "policy.toml"
    pol.write_text(client_policy("sha256:" + "cd" * 32))
    proc, port = _proxy(served, pol, sim_dir)
    try:
        r = subprocess.run(
            ["curl", "-sS", "--max-time", "20", "-w", "\n%{http_code}", f"http://127.0.0.1:{port}/"],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=10)
    assert r.endswith("\n502")
    assert "workload_digest: expected sha256:" + "cd" * 32 in r
    refused = [json.loads(line) for line in err.splitlines() if '"refused"' in line]
    assert refused and refused[0]["details"]["failed_checks"][0]["check"] == "workload_digest"


def test_proxy_reattestation_refused_closes_open_upstream_connections(served, trust):
    """The proxy re-attests at its interval; once that is refused (here: the owner's policy no
    longer accepts the workload), a connection kept alive since is closed, not left open."""
    from shieldml.client.proxy import Proxy

    v = verifier(served.digest, trust)
    p = Proxy(served.host, served.port, v, reattest_interval=0.3)
    host, port = p.start("127.0.0.1", 0)
    try:
        with socket.create_connection((host, port), timeout=5) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            first = b""
            while b" peer " not in first:
                first += s.recv(65536)
            v.policy = Policy.from_toml(client_policy("sha256:" + "ef" * 32))
            rest = s.recv(65536)  # EOF once the re-attestation was refused (timeout: kept open)
    finally:
        p.close()
    assert first.startswith(b"HTTP/1.1 200") and b"model " in first
    assert rest == b""
    assert p.refusals >= 1 and len(p.attested) == 1  # the client's connection, then a refusal


def test_proxy_connections_beyond_the_cap_are_closed(served, trust):
    from shieldml.client.proxy import Proxy

    p = Proxy(served.host, served.port, verifier(served.digest, trust), max_connections=1)
    host, port = p.start("127.0.0.1", 0)
    try:
        with socket.create_connection((host, port), timeout=5) as first:
            first.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert first.recv(65536).startswith(b"HTTP/1.")  # served, and kept open
            with socket.create_connection((host, port), timeout=5) as second:
                assert second.recv(65536) == b""  # closed at once, never forwarded
    finally:
        p.close()
