"""The broker checks AMD's CRL a runner sends with SEV-SNP evidence (``amd_crl``)."""

from __future__ import annotations

import base64
from pathlib import Path

from cryptography.hazmat.primitives.serialization import Encoding

from shieldml.broker import protocol
from shieldml.broker.server.release import Settings
from shieldml.testing.simulated import SimulatedPlatform
from tests.broker.conftest import WD, broker_with

MEASUREMENT = b"\x42" * 48
SNP_POLICY = f"""
[[profile]]
tee = "snp"
measurement = ["{MEASUREMENT.hex()}"]
host_data = "any"
min_reported_tcb = {{snp = 0}}
vmpl = 0
workload_digest = ["{WD}"]
insecure_allow_simulated = true
"""


def test_snp_release_under_a_revoked_ask_is_refused(tmp_path: Path, sim: SimulatedPlatform):
    b = broker_with(tmp_path, Settings(trust=sim.trust()))
    try:
        b.store.put_key("model", "stream", bytes(32))
        b.store.set_policy("model", SNP_POLICY)

        def release(crl: bytes | None) -> int:
            nonce = bytes.fromhex(b.client.post("/v1/challenge").json()["nonce"])
            rk = protocol.RunnerKey.generate("X25519")
            rd = protocol.report_data(nonce, rk.kem_id, rk.public_bytes, WD)
            report, vcek, chain = sim.snp_report(report_data=rd, measurement=MEASUREMENT)
            body = {
                "nonce": nonce.hex(), "tee": "snp", "evidence": base64.b64encode(report).decode(),
                "vcek": base64.b64encode(vcek).decode(),
                "cert_chain": "".join(c.public_bytes(Encoding.PEM).decode() for c in chain),
                "hpke_public_key": base64.b64encode(rk.public_bytes).decode(),
                "workload_digest": WD, "keys": ["model"],
            }  # fmt: skip
            if crl is not None:
                body["amd_crl"] = base64.b64encode(crl).decode()
            r = b.client.post("/v1/release", json=body)
            if crl is not None and r.status_code == 403:
                assert "is revoked" in r.text
            return r.status_code

        assert release(None) == 200
        assert release(sim.amd_crl()) == 200
        assert release(sim.amd_crl(revoked=(sim.certs["ask"],))) == 403
    finally:
        b.client.close()
        b.store.engine.dispose()
