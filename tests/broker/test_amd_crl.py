"""The broker checks SEV-SNP evidence against AMD's CRL (issue 13, point 2): the one a runner
sends (``amd_crl``), else its own (cache, AMD's KDS, a trusted simulated platform's). Evidence
nobody checked is refused unless the policy says ``insecure_allow_unchecked_revocation``: the
host cannot get a revoked ASK past the broker by leaving the CRL out."""

from __future__ import annotations

import base64
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from shieldml.attest import CollateralCache
from shieldml.attest._fetch import Response
from shieldml.broker import protocol
from shieldml.broker.server.config import BrokerConfig
from shieldml.broker.server.release import Settings
from shieldml.testing.simulated import SimulatedPlatform, fixed_clock
from tests.broker.conftest import WD, Broker, broker_with

MEASUREMENT = b"\x42" * 48
NOW = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
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


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> SimulatedPlatform:
    """A platform on a fixed clock: its certificates and CRLs are valid at NOW, whatever the date."""
    return SimulatedPlatform.open(tmp_path_factory.mktemp("sim"), clock=fixed_clock(NOW))


def _broker(tmp_path: Path, sim: SimulatedPlatform, **settings: Any) -> Broker:
    b = broker_with(tmp_path, Settings(trust=sim.trust(), now=lambda: NOW, **settings))
    b.store.put_key("model", "stream", bytes(32))
    b.store.set_policy("model", SNP_POLICY)
    return b


def _release(b: Broker, sim: SimulatedPlatform, crl: bytes | None = None) -> Any:
    nonce = bytes.fromhex(b.client.post("/v1/challenge").json()["nonce"])
    rk = protocol.RunnerKey.generate("X25519")
    rd = protocol.report_data(nonce, rk.kem_id, rk.public_bytes, WD)
    report, vcek, chain = sim.snp_report(report_data=rd, measurement=MEASUREMENT, now=NOW)
    body = {
        "nonce": nonce.hex(), "tee": "snp", "evidence": base64.b64encode(report).decode(),
        "vcek": base64.b64encode(vcek).decode(),
        "cert_chain": "".join(c.public_bytes(Encoding.PEM).decode() for c in chain),
        "hpke_public_key": base64.b64encode(rk.public_bytes).decode(),
        "workload_digest": WD, "keys": ["model"],
    }  # fmt: skip
    if crl is not None:
        body["amd_crl"] = base64.b64encode(crl).decode()
    return b.client.post("/v1/release", json=body)


def _failed_checks(r: Any) -> set[str]:
    [profile] = r.json()["detail"]["verdicts"]["model"]["profiles"]
    return {c["name"] for c in profile["checks"] if not c["passed"]}


def _kds(sim: SimulatedPlatform, **crl: Any) -> tuple[Callable[[str], Response], list[str]]:
    """A fetcher standing in for AMD's KDS: serves ``sim``'s CRL and records each URL asked."""
    asked: list[str] = []

    def fetch(url: str) -> Response:
        asked.append(url)
        return Response(200, sim.amd_crl(now=crl.pop("now", NOW), **crl), {})

    return fetch, asked


def _source(cache: CollateralCache, fetch: Callable[[str], Response]) -> Any:
    def source(product: str, ark: x509.Certificate, now: datetime) -> Any:
        return cache.amd_crl(product, ark, now=now, fetch=fetch, base_url="https://kds.test")

    return source


def test_snp_release_under_a_revoked_ask_is_refused(tmp_path: Path, sim: SimulatedPlatform):
    b = _broker(tmp_path, sim)
    try:
        assert _release(b, sim, sim.amd_crl(now=NOW)).status_code == 200
        r = _release(b, sim, sim.amd_crl(revoked=(sim.certs["ask"],), now=NOW))
        assert r.status_code == 403 and "is revoked" in r.text
    finally:
        b.client.close()
        b.store.engine.dispose()


def test_host_leaving_out_the_amd_crl_is_refused(tmp_path: Path, sim: SimulatedPlatform):
    """The host's move: send the report without the CRL that lists its revoked ASK. The broker
    has no CRL of its own, so nobody checked: the policy refuses and says what to do."""
    b = _broker(tmp_path, sim)
    try:
        r = _release(b, sim)
        assert r.status_code == 403
        assert _failed_checks(r) == {"revocation"}
        [profile] = r.json()["detail"]["verdicts"]["model"]["profiles"]
        [check] = [c for c in profile["checks"] if c["name"] == "revocation"]
        assert check["actual"] == "not checked: no AMD CRL given"
        assert "--amd-kds" in check["hint"]
        # the owner may knowingly accept it, and the verdict then names the switch
        b.store.set_policy("model", SNP_POLICY + "insecure_allow_unchecked_revocation = true\n")
        assert _release(b, sim).status_code == 200
    finally:
        b.client.close()
        b.store.engine.dispose()


def test_broker_checks_its_own_amd_crl_when_the_runner_sends_none(
    tmp_path: Path, sim: SimulatedPlatform
):
    fetch, asked = _kds(sim, revoked=(sim.certs["ask"],))
    b = _broker(tmp_path, sim, amd_crl_for=_source(CollateralCache(tmp_path / "col"), fetch))
    try:
        r = _release(b, sim)
        assert r.status_code == 403 and "is revoked" in r.text
        assert asked == ["https://kds.test/vcek/v1/Milan/crl"]
    finally:
        b.client.close()
        b.store.engine.dispose()


def test_broker_asks_kds_only_for_a_chain_that_verified(tmp_path: Path, sim: SimulatedPlatform):
    """A report under an ARK nobody pinned never makes the broker fetch anything."""
    other = SimulatedPlatform.open(tmp_path / "other", clock=fixed_clock(NOW))
    fetch, asked = _kds(sim)
    b = _broker(tmp_path, sim, amd_crl_for=_source(CollateralCache(tmp_path / "col"), fetch))
    try:
        r = _release(b, other)
        assert r.status_code == 403 and "ARK" in r.text
        assert asked == []
    finally:
        b.client.close()
        b.store.engine.dispose()


def test_a_fetched_amd_crl_is_reused_while_current_and_refetched_after(
    tmp_path: Path, sim: SimulatedPlatform
):
    cache = CollateralCache(tmp_path / "col")
    fetch, asked = _kds(sim)
    ark = sim.certs["ark"]
    first = cache.amd_crl("Milan", ark, now=NOW, fetch=fetch)
    again = cache.amd_crl("Milan", ark, now=NOW + timedelta(days=1), fetch=fetch)
    assert first is not None and again is not None and len(asked) == 1
    assert cache.amd_crl("Milan", ark, now=NOW + timedelta(days=30)) is None  # expired, no fetch
    cache.amd_crl("Milan", ark, now=NOW + timedelta(days=30), fetch=fetch)
    assert len(asked) == 2


def test_a_crl_another_key_signed_is_never_cached(tmp_path: Path, sim: SimulatedPlatform):
    """A KDS answer (or a planted cache file) not signed by the verified ARK: returned so the
    verifier refuses it, never kept."""
    other = SimulatedPlatform.open(tmp_path / "other", clock=fixed_clock(NOW))
    cache = CollateralCache(tmp_path / "col")
    fetch, asked = _kds(other)
    assert cache.amd_crl("Milan", sim.certs["ark"], now=NOW, fetch=fetch) is not None
    assert len(asked) == 1
    assert not (tmp_path / "col" / "amd-crl-Milan.der").exists()
    (tmp_path / "col").mkdir(exist_ok=True)
    (tmp_path / "col" / "amd-crl-Milan.der").write_bytes(other.amd_crl(now=NOW))
    assert cache.amd_crl("Milan", sim.certs["ark"], now=NOW) is None


def test_a_broker_trusting_a_simulated_platform_checks_against_its_crl(
    tmp_path: Path, sim: SimulatedPlatform
):
    platform = SimulatedPlatform.open(tmp_path / "plat", clock=fixed_clock(NOW))
    cfg = BrokerConfig(
        database=f"sqlite:///{tmp_path}/b.db",
        state_dir=str(tmp_path),
        simulated_platforms=(str(tmp_path / "plat"),),
    )
    source = cfg.amd_crl_source()
    crl = source("Milan", platform.certs["ark"], NOW)
    assert crl is not None and crl.is_signature_valid(platform.certs["ark"].public_key())  # type: ignore[arg-type]
    assert source("Milan", sim.certs["ark"], NOW) is None  # an ARK it does not know: none
