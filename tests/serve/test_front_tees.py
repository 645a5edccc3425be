"""The front's evidence and certificate on each simulated TEE (SGX, TDX with the RTMR extended,
SEV-SNP), verified by the client's Verifier against the policy ``policy init --from-job`` writes.
In process, no server: the bytes a connection would carry."""

from __future__ import annotations

import hashlib
import json
import os
import ssl
import sys
from pathlib import Path

import pytest

from shieldml.attest import IntelCollateral, verify_evidence
from shieldml.client import Verifier, certificate_report_data, spki_of
from shieldml.errors import AttestationError
from shieldml.policy import Policy
from shieldml.runner.evidence import provider_for
from shieldml.runner.job_policy import policy_from_job
from shieldml.runner.manifest import JobManifest
from shieldml.serve import Front, TlsIdentity


def _job(tmp_path: Path, sim_dir: Path, kind: str) -> JobManifest:
    (tmp_path / "s.py").write_text("pass\n")
    h = hashlib.sha256(b"pass\n").hexdigest()
    (tmp_path / "job.toml").write_text(
        f'version = 1\ntee = "simulated"\n[command]\nargv = ["{sys.executable}", "s.py"]\n'
        f'[[trusted]]\npath = "s.py"\nsha256 = "{h}"\n[serve]\nport = 8000\n'
        f'[simulated]\nplatform = "{sim_dir}"\nkind = "{kind}"\n'
    )
    return JobManifest.load(tmp_path / "job.toml")


@pytest.mark.parametrize("kind", ["sgx", "tdx", "snp"])
def test_fresh_evidence_and_certificate_verify_on_each_tee(tmp_path, sim_dir, trust, kind):
    m = _job(tmp_path, sim_dir, kind)
    digest = m.workload_digest()
    provider = provider_for("simulated", m.simulated, base=m.base)
    provider.bind_workload(digest)  # as run_job does: TDX extends RTMR3 before any evidence
    identity = TlsIdentity.generate(provider, digest)
    front = Front(identity, provider, digest, 8000, log=lambda _s: None)
    nonce = os.urandom(32)
    body = front.evidence_answer(nonce)
    der = ssl.PEM_cert_to_DER_cert(identity.certificate.decode())
    verifier = Verifier(Policy.from_toml(policy_from_job(m).text), trust=trust)
    peer = verifier.verify(200, body, nonce, der)
    assert peer.verdict.allowed and peer.claims.tee.value == kind
    assert peer.spki_sha256 == hashlib.sha256(spki_of(der)).hexdigest()
    with pytest.raises(AttestationError):  # the same answer does not verify for another nonce
        verifier.verify(200, body, os.urandom(32), der)
    if kind == "snp":  # no quote to carry: a plain certificate, fresh evidence only
        assert identity.evidence is None
        return
    col = IntelCollateral.from_json(json.dumps(json.loads(body)["collateral"]))
    claims = verify_evidence(der, tee="ratls", collateral=col, trust=trust)
    assert claims.report_data == certificate_report_data(spki_of(der), digest)


def _front(tmp_path: Path, sim_dir: Path, **kw: float) -> Front:
    m = _job(tmp_path, sim_dir, "sgx")
    provider = provider_for("simulated", m.simulated, base=m.base)
    digest = m.workload_digest()
    return Front(TlsIdentity.generate(None, digest), provider, digest, 1, log=lambda _s: None, **kw)  # type: ignore[arg-type]


def test_connection_that_sends_no_request_is_closed_at_the_head_deadline(tmp_path, sim_dir):
    import socket
    import time

    from shieldml.client import client_ssl_context

    front = _front(tmp_path, sim_dir, head_timeout=0.3)
    host, port = front.start("127.0.0.1", 0)
    try:
        with (
            socket.create_connection((host, port), timeout=5) as raw,
            client_ssl_context().wrap_socket(raw) as s,
        ):
            t = time.monotonic()
            assert s.recv(1) == b""
            assert time.monotonic() - t < 3
    finally:
        front.close()


def test_connections_beyond_the_cap_are_closed(tmp_path, sim_dir):
    import socket

    from shieldml.client import client_ssl_context

    front = _front(tmp_path, sim_dir, max_connections=1)
    host, port = front.start("127.0.0.1", 0)
    try:
        with (
            socket.create_connection((host, port), timeout=5) as raw,
            client_ssl_context().wrap_socket(raw),
            socket.create_connection((host, port), timeout=5) as second,
            pytest.raises((ssl.SSLError, OSError)),
        ):
            client_ssl_context().wrap_socket(second)  # closed before any handshake
    finally:
        front.close()
