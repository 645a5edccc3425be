"""Real broker processes: TLS pinning, the CLI, and two replicas on one PostgreSQL."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import pytest

from shieldml.broker import protocol
from shieldml.broker.audit import AuditRecord, verify_log
from shieldml.broker.client import BrokerClient
from shieldml.cli import main
from shieldml.errors import BrokerError, PolicyDenied, ShieldError
from shieldml.testing.brokers import BrokerProcess, start_broker
from shieldml.testing.simulated import SimulatedPlatform, system_clock
from tests.broker.conftest import MRENCLAVE, POLICY, WD, raw_tls_socket


def admin(bp: BrokerProcess) -> BrokerClient:
    return BrokerClient(bp.url, fingerprint=bp.fingerprint, token=bp.token_file.read_text().strip())


def attest_and_release(
    bp: BrokerProcess, sim: SimulatedPlatform, keys: list[str], mrenclave: bytes = MRENCLAVE
) -> dict[str, tuple[str, bytes]]:
    with BrokerClient(bp.url, fingerprint=bp.fingerprint) as c:
        nonce = c.challenge()
        rk = protocol.RunnerKey.generate()
        rd = protocol.report_data(nonce, rk.kem_id, rk.public_bytes, WD)
        quote, col = sim.sgx_quote(report_data=rd, mrenclave=mrenclave, now=datetime.now(UTC))
        return c.release(nonce, rk, WD, keys, quote, collateral=json.loads(col.to_json())).keys


def test_tls_pinned_release_and_cli(
    served: BrokerProcess, sim_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    sim = SimulatedPlatform.open(sim_dir, clock=system_clock)
    key = tmp_path / "model.key"
    assert main(["key", "new", str(key)]) == 0
    conn = [
        "--url",
        served.url,
        "--fingerprint",
        served.fingerprint,
        "--token-file",
        str(served.token_file),
    ]
    assert main(["broker", "key", "add", "model", "--key", str(key), *conn]) == 0
    pol = tmp_path / "p.toml"
    pol.write_text(POLICY)
    assert main(["broker", "policy", "set", "model", str(pol), *conn]) == 0
    got = attest_and_release(served, sim, ["model"])
    assert got["model"] == ("stream", key.read_bytes())
    with pytest.raises(PolicyDenied):
        attest_and_release(served, sim, ["model"], mrenclave=b"\x00" * 32)
    capsys.readouterr()
    checkpoint = tmp_path / "audit.checkpoint"
    assert main(["audit", "verify", *conn, "--checkpoint", str(checkpoint), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True
    assert main(["audit", "show", *conn, "--json"]) == 0
    records = json.loads(capsys.readouterr().out)["records"]
    assert [r["data"].get("allowed") for r in records if r["event"] == "release"] == [True, False]
    assert main(["broker", "key", "list", *conn, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["has_policy"] is True


def test_wrong_fingerprint_is_refused_before_any_request(served: BrokerProcess):
    with pytest.raises(ShieldError, match="not the pinned one"):
        BrokerClient(served.url, fingerprint="00" * 32, token="secret")


def test_admin_token_is_required(served: BrokerProcess):
    with (
        BrokerClient(served.url, fingerprint=served.fingerprint, token="wrong") as c,
        pytest.raises(BrokerError) as e,
    ):
        c.list_keys()
    assert e.value.status == 401


def test_two_replicas_share_nonces_and_one_audit_chain(tmp_path: Path, sim_dir: Path, pg_url: str):
    sim = SimulatedPlatform.open(sim_dir, clock=system_clock)
    state = tmp_path / "state"
    a = start_broker(state, "--simulated-platform", str(sim_dir), database=pg_url)
    b = start_broker(state, "--simulated-platform", str(sim_dir), database=pg_url)
    try:
        with admin(a) as c:
            c.add_key("model", "stream", bytes(32))
            c.set_policy("model", POLICY)
        # a nonce issued by one replica and used there is refused by the other
        with (
            BrokerClient(a.url, fingerprint=a.fingerprint) as ca,
            BrokerClient(b.url, fingerprint=b.fingerprint) as cb,
        ):
            nonce = ca.challenge()
            rk = protocol.RunnerKey.generate()
            quote, col = sim.sgx_quote(
                report_data=protocol.report_data(nonce, rk.kem_id, rk.public_bytes, WD),
                mrenclave=MRENCLAVE,
            )
            assert ca.release(
                nonce, rk, WD, ["model"], quote, collateral=json.loads(col.to_json())
            ).keys
            with pytest.raises(BrokerError) as e:
                cb.release(nonce, rk, WD, ["model"], quote, collateral=json.loads(col.to_json()))
            assert e.value.status == 409
        # concurrent releases through both replicas append to one consistent chain
        with ThreadPoolExecutor(8) as pool:
            results = list(
                pool.map(lambda i: attest_and_release(a if i % 2 else b, sim, ["model"]), range(24))
            )
        assert all(r["model"][1] == bytes(32) for r in results)
        with admin(b) as c:
            raw, head = c.audit_all()
        verify_log(raw, head)
        records = [AuditRecord.from_dict(r) for r in raw]
        assert sum(1 for r in records if r.event == "release" and r.data["allowed"]) == 25
    finally:
        a.stop()
        b.stop()


def test_served_secret_provisioning_and_release_without_collateral(tmp_path: Path, sim_dir: Path):
    from shieldml.testing.brokers import free_port
    from tests.broker.test_secret_prov import MRENCLAVE as SP_MRENCLAVE
    from tests.broker.test_secret_prov import POLICY as SP_POLICY
    from tests.broker.test_secret_prov import RESPONSE, enclave_request

    sim = SimulatedPlatform.open(sim_dir, clock=system_clock)
    sp_port = free_port()
    bp = start_broker(tmp_path / "state", "--simulated-platform", str(sim_dir),
                      "--secret-prov-port", str(sp_port), "--secret-prov-key", "wrap")  # fmt: skip
    try:
        with admin(bp) as c:
            c.add_key("wrap", "gramine-pf", bytes(range(16)))
            c.set_policy("wrap", SP_POLICY)
            c.add_key("model", "stream", bytes(32))
            c.set_policy("model", POLICY)
        cert, key = sim.ratls_certificate(mrenclave=SP_MRENCLAVE)
        data = enclave_request(sp_port, cert, key, tmp_path)
        assert data.startswith(RESPONSE) and data.endswith(bytes(range(16)))
        # a runner may leave collateral to the broker (here: the simulated platform's own)
        with BrokerClient(bp.url, fingerprint=bp.fingerprint) as c:
            nonce = c.challenge()
            rk = protocol.RunnerKey.generate()
            quote, _ = sim.sgx_quote(
                report_data=protocol.report_data(nonce, rk.kem_id, rk.public_bytes, WD),
                mrenclave=MRENCLAVE,
            )
            assert c.release(nonce, rk, WD, ["model"], quote).keys["model"] == ("stream", bytes(32))
    finally:
        bp.stop()


SLOW_CLIENTS = {
    # what the client sends at once, then the byte it dribbles every 0.2 s (b"" = nothing at all)
    "body": (
        b"POST /v1/release HTTP/1.1\r\nHost: broker\r\nContent-Type: application/json\r\n"
        b"Content-Length: 1000\r\n\r\n{",
        b" ",
    ),
    "headers": (b"POST /v1/release HTTP/1.1\r\nHost: broker\r\nX-Slow: ", b"a"),
    "silent": (b"", b""),
}


@pytest.mark.parametrize("kind", list(SLOW_CLIENTS))
def test_slow_client_gets_408_and_fast_clients_are_served(tmp_path: Path, sim_dir: Path, kind: str):
    """A request whose body or head (or anything at all) does not arrive within the timeouts is
    answered 408 and its connection closed, while other clients are served."""
    import sys
    import time

    bp = start_broker(
        tmp_path / "state", "--simulated-platform", str(sim_dir),
        "--body-timeout", "1", "--header-timeout", "1",
    )  # fmt: skip
    first, dribble = SLOW_CLIENTS[kind]
    try:
        with raw_tls_socket(bp.url) as s:
            s.sendall(first)
            t0 = time.monotonic()
            with admin(bp) as c:  # another client is served while the slow one dribbles
                assert c.challenge()
            reply = b""
            s.settimeout(0.2)
            while b"\r\n\r\n" not in reply and time.monotonic() - t0 < 8:
                try:
                    chunk = s.recv(4096)
                except TimeoutError:
                    s.sendall(dribble)  # never completes the body or the head
                    continue
                assert chunk, "connection closed without a response"
                reply += chunk
            waited = time.monotonic() - t0
            s.settimeout(5)
            try:
                while s.recv(4096):  # the rest of the 408 response, then the broker hangs up
                    pass
                closed = True
            except OSError:  # a reset also ends the connection; a timeout does not
                closed = not isinstance(sys.exc_info()[1], TimeoutError)
        assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
        assert 0.5 < waited < 5
        assert closed, "the broker kept the slow connection open after 408"
    finally:
        bp.stop()


def _serve(*args: str) -> subprocess.CompletedProcess[str]:
    """``shieldml broker serve`` that is expected to exit (it refuses to start)."""
    return subprocess.run(
        [sys.executable, "-m", "shieldml.cli", "broker", "serve", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "500"},
    )


def test_admin_token_is_not_printed_to_stdout_and_its_file_is_0600(served: BrokerProcess):
    token = served.token_file.read_text().strip()
    assert len(token) >= 40
    assert stat.S_IMODE(served.token_file.stat().st_mode) == 0o600
    log = served.log.read_text()
    assert token not in log
    assert f"admin token written to {served.token_file} (mode 0600)" in log


def test_print_admin_token_prints_it_once(tmp_path: Path, sim_dir: Path):
    bp = start_broker(
        tmp_path / "state", "--simulated-platform", str(sim_dir), "--print-admin-token"
    )
    try:
        token = bp.token_file.read_text().strip()
        assert bp.log.read_text().count(f"admin token: {token}") == 1
    finally:
        bp.stop()
    again = start_broker(
        tmp_path / "state", "--simulated-platform", str(sim_dir), "--print-admin-token"
    )
    try:  # a second start creates no token and prints none
        assert "admin token" not in again.log.read_text()
        assert again.token_file.read_text().strip() == token
    finally:
        again.stop()


@pytest.mark.parametrize("kind", ["world-readable", "group-readable", "symlink"])
def test_admin_token_file_others_can_read_is_refused_before_any_state(tmp_path: Path, kind: str):
    """A host that pre-creates the token file 0644 (or links it somewhere) would read the token:
    ``serve`` refuses it, exit 1, and creates no state (so no token exists that someone else has)."""
    token_file = tmp_path / "token"
    if kind == "symlink":
        (tmp_path / "elsewhere").write_text("")
        (tmp_path / "elsewhere").chmod(0o600)
        token_file.symlink_to(tmp_path / "elsewhere")
    else:
        token_file.write_text("")
        token_file.chmod(0o644 if kind == "world-readable" else 0o640)
    state = tmp_path / "state"
    r = _serve("--state", str(state), "--port", "0", "--admin-token-file", str(token_file))
    assert r.returncode == 1, r
    assert "refusing to write the admin token" in r.stderr
    assert not state.exists()
    assert token_file.read_text() == ""


def test_port_in_use_exits_1_and_leaves_no_state(tmp_path: Path):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        state = tmp_path / "state"
        r = _serve("--state", str(state), "--port", str(port))
    assert r.returncode == 1, r
    assert f"127.0.0.1:{port}: cannot listen" in r.stderr
    assert "--port" in r.stderr  # the hint
    assert not state.exists()
    assert r.stdout == ""  # no "listening", no token


def test_challenge_flood_from_one_address_gets_429_at_the_served_limit(tmp_path: Path):
    """``--challenge-rate/--challenge-burst`` reach the workers, and the limit counts the real
    peer address of the socket ``serve`` bound itself."""
    bp = start_broker(tmp_path / "state", "--challenge-rate", "0.001", "--challenge-burst", "2")
    try:
        with BrokerClient(bp.url, fingerprint=bp.fingerprint) as c:
            c.challenge()
            c.challenge()
            with pytest.raises(BrokerError) as e:
                c.challenge()
        assert e.value.status == 429
        assert "too many challenges from 127.0.0.1" in str(e.value)
    finally:
        bp.stop()


def test_insecure_simulated_platform_is_said_once_and_no_cdn_docs_pages(served: BrokerProcess):
    """One warning per insecure root (not one per configuration built), and no /docs or /redoc:
    FastAPI's pages load scripts from a CDN (blank offline); /openapi.json stays."""
    with admin(served) as c:
        assert c.challenge()
        for page in ("/docs", "/redoc"):
            assert c.http.get(page).status_code == 404
        assert c.http.get("/openapi.json").status_code == 200
    assert served.log.read_text().count("insecure: trusting the simulated platform") == 1


def test_operator_commands_policy_get_list_rm_key_rm_and_metrics(
    served: BrokerProcess, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    conn = ["--url", served.url, "--fingerprint", served.fingerprint,
            "--token-file", str(served.token_file)]  # fmt: skip
    pol = tmp_path / "p.toml"
    pol.write_text(POLICY)
    assert main(["broker", "key", "add", "model", *conn]) == 0
    assert main(["broker", "policy", "set", "model", str(pol), *conn]) == 0
    capsys.readouterr()
    assert main(["broker", "policy", "get", "model", *conn]) == 0
    assert capsys.readouterr().out == POLICY
    assert main(["broker", "policy", "list", *conn, "--json"]) == 0
    assert [p["name"] for p in json.loads(capsys.readouterr().out)] == ["model"]
    assert main(["broker", "policy", "rm", "model", *conn, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["name"] == "model"
    assert main(["broker", "policy", "get", "model", *conn]) == 1
    assert "has no policy" in capsys.readouterr().err
    assert main(["broker", "key", "rm", "model", *conn]) == 0
    assert "key model removed" in capsys.readouterr().out
    assert main(["broker", "key", "list", *conn, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []
    with admin(served) as c:
        text = c.http.get("/metrics").text
    assert "shieldml_request_seconds_bucket" in text
    assert '"route": "/v1/admin/keys"' in served.log.read_text()  # the access log on stderr
