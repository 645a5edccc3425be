"""Key release to CPU + GPU pairs (issue 16, "Policy and release"): one broker nonce covers the
CPU evidence and every GPU's, through :func:`shieldml.broker.protocol.gpu_nonce`. Each test is
an attack by the host on that pairing, on a simulated SEV-SNP VM with simulated GPUs, verified
at a fixed time."""

from __future__ import annotations

import base64
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from shieldml.broker import protocol
from shieldml.broker.server.release import (
    GpuBundle,
    NonceBinding,
    ReleaseRequest,
    Settings,
    decide,
)
from shieldml.errors import NotGenuineError, ReleaseDenied
from shieldml.testing.simulated import SimulatedPlatform, fixed_clock
from shieldml.testing.simulated_gpu import SimulatedGpu
from tests.broker.conftest import Broker

NOW = datetime(2031, 5, 1, tzinfo=UTC)
WD = "sha256:" + "cd" * 32
MEASUREMENT = b"\x42" * 48
PK = bytes(range(32))  # an X25519 public key's size; the release never opens it here


def policy(gpu: str | None = None) -> str:
    text = "\n".join(
        [
            "[[profile]]", 'tee = "snp"', f'measurement = ["{MEASUREMENT.hex()}"]',
            'host_data = "any"', 'min_reported_tcb = "any"', 'vmpl = "any"',
            f'workload_digest = ["{WD}"]', "insecure_allow_simulated = true",
            "insecure_allow_out_of_date = true",
        ]
    )  # fmt: skip
    return text + ("\n[profile.gpu]\n" + gpu if gpu is not None else "") + "\n"


GPU_POLICY = 'count = 1\ndriver_version = ["550.90.07"]\nvbios_version = "any"\n'


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> SimulatedPlatform:
    return SimulatedPlatform.open(tmp_path_factory.mktemp("sim"), clock=fixed_clock(NOW))


@pytest.fixture(scope="module")
def gpus() -> list[SimulatedGpu]:
    return [SimulatedGpu(now=NOW), SimulatedGpu(now=NOW)]


@pytest.fixture
def broker(
    make: Callable[[Settings], Broker], sim: SimulatedPlatform, gpus: list[SimulatedGpu]
) -> tuple[Broker, Settings]:
    trust = sim.trust()
    for g in gpus:
        trust = g.trust(trust)
    settings = Settings(trust=trust, now=lambda: NOW)
    b = make(settings)
    b.store.put_key("model", "stream", bytes(32))
    return b, settings


def bundle(g: SimulatedGpu, report_data: bytes, i: int, n: int, cc: str = "on") -> GpuBundle:
    nonce = protocol.gpu_nonce(report_data, i, n, cc)
    return GpuBundle(
        cc, g.report(nonce), g.chain_pem(), g.ocsp_all(), [g.rim("vbios"), g.rim("driver")]
    )


def session(b: Broker, sim: SimulatedPlatform) -> tuple[bytes, ReleaseRequest]:
    """A fresh broker nonce and the CPU half of its release request."""
    nonce, _ = b.store.new_nonce(timedelta(minutes=5))
    rd = protocol.report_data(nonce, protocol.KEMS["X25519"], PK, WD)
    report, vcek, chain = sim.snp_report(report_data=rd, measurement=MEASUREMENT)
    pem = "".join(c.public_bytes(Encoding.PEM).decode() for c in chain)
    req = ReleaseRequest(
        evidence=report, keys=["model"], binding=NonceBinding(nonce, rd, WD), tee="snp",
        vcek=vcek, cert_chain=pem, amd_crl=sim.amd_crl(),
    )  # fmt: skip
    return rd, req


def test_cpu_and_gpu_of_one_session_get_the_key(broker, sim, gpus):
    b, settings = broker
    b.store.set_policy("model", policy(GPU_POLICY))
    rd, req = session(b, sim)
    released = decide(b.store, settings, replace(req, gpus=[bundle(gpus[0], rd, 0, 1)]))
    assert "model" in released.keys
    checks = {c.name: c for c in released.verdicts["model"].profiles[0].checks}
    assert checks["gpu cc_mode"].passed and checks["gpu rims"].passed and checks["gpu ocsp"].passed
    (gpu,) = b.store.audit_records(released.audit_seq - 1)[-1].data["gpus"]
    assert (gpu["driver_version"], gpu["vbios_version"], gpu["cc_mode"]) == (
        "550.90.07",
        "96.00.9F.00.01",
        "on",
    )
    assert gpu["rim_ids"] == [
        "NV_GPU_VBIOS_1010_0200_882_96009F0001",
        "NV_GPU_DRIVER_GH100_550.90.07",
    ]


def test_profile_requiring_a_gpu_refuses_cpu_only_evidence(broker, sim):
    b, settings = broker
    b.store.set_policy("model", policy(GPU_POLICY))
    _rd, req = session(b, sim)
    with pytest.raises(ReleaseDenied) as e:
        decide(b.store, settings, req)
    checks = e.value.detail["verdicts"]["model"]["profiles"][0]["checks"]
    (count,) = [c for c in checks if c["name"] == "gpu count"]
    assert (count["passed"], count["expected"], count["actual"]) == (False, "1", "0")


def test_genuine_gpu_report_from_another_session_is_refused(broker, sim, gpus):
    """The host pairs a genuine GPU report of an earlier session with this session's quote."""
    b, settings = broker
    b.store.set_policy("model", policy(GPU_POLICY))
    old_rd, _old = session(b, sim)
    stale = bundle(gpus[0], old_rd, 0, 1)
    _rd, req = session(b, sim)
    with pytest.raises(NotGenuineError) as e:
        decide(b.store, settings, replace(req, gpus=[stale]))
    assert e.value.check == "nonce"


def test_gpu_left_out_of_the_set_is_refused(broker, sim, gpus):
    """The runner saw two GPUs; the host forwards only one (its other GPU is unattested)."""
    b, settings = broker
    b.store.set_policy("model", policy(GPU_POLICY))
    rd, req = session(b, sim)
    both = [bundle(gpus[0], rd, 0, 2), bundle(gpus[1], rd, 1, 2)]
    with pytest.raises(NotGenuineError) as e:
        decide(b.store, settings, replace(req, gpus=both[:1]))
    assert e.value.check == "nonce"
    _rd2, req2 = session(b, sim)
    with pytest.raises(NotGenuineError) as e:  # nor may it swap their order
        decide(b.store, settings, replace(req2, gpus=[both[1], both[0]]))
    assert e.value.check == "nonce"


def test_gpu_not_in_cc_mode_is_refused_with_that_verdict(broker, sim):
    b, settings = broker
    b.store.set_policy("model", policy(GPU_POLICY))
    _rd, req = session(b, sim)
    with pytest.raises(NotGenuineError) as e:
        decide(b.store, settings, replace(req, gpus=[GpuBundle("off")]))
    assert e.value.check == "gpu cc_mode"
    assert "GPU 0 not in confidential-computing mode" in str(e.value.detail["message"])


def test_cc_mode_edited_in_transit_is_refused(broker, sim, gpus):
    """The runner read devtools mode; the host rewrites the field to 'on'."""
    b, settings = broker
    b.store.set_policy("model", policy(GPU_POLICY))
    rd, req = session(b, sim)
    devtools = bundle(gpus[0], rd, 0, 1, cc="devtools")
    with pytest.raises(NotGenuineError) as e:
        decide(b.store, settings, replace(req, gpus=[replace(devtools, cc_mode="on")]))
    assert e.value.check == "nonce"


def test_simulated_gpu_is_refused_by_a_broker_that_does_not_trust_it(make, sim, gpus):
    settings = Settings(trust=sim.trust(), now=lambda: NOW)  # the CPU's roots only
    b = make(settings)
    b.store.put_key("model", "stream", bytes(32))
    b.store.set_policy("model", policy(GPU_POLICY))
    rd, req = session(b, sim)
    with pytest.raises(NotGenuineError) as e:
        decide(b.store, settings, replace(req, gpus=[bundle(gpus[0], rd, 0, 1)]))
    assert e.value.check == "trust root"
    assert "untrusted root (simulated)" in e.value.detail["message"]


def test_cached_ocsp_is_accepted_only_when_the_policy_allows_it(broker, sim, gpus):
    b, settings = broker
    g = gpus[0]
    b.store.set_policy("model", policy(GPU_POLICY))

    def stale(rd: bytes) -> GpuBundle:
        old = g.ocsp_all(produced=NOW - timedelta(days=10), valid_for=timedelta(days=7))
        return replace(bundle(g, rd, 0, 1), ocsp=old)

    rd, req = session(b, sim)
    with pytest.raises(ReleaseDenied) as e:
        decide(b.store, settings, replace(req, gpus=[stale(rd)]))
    text = str(e.value.detail)
    assert "gpu ocsp" in text and "cached response, 864000 s old" in text
    b.store.set_policy("model", policy(GPU_POLICY + "ocsp_allow_cached = true\n"))
    rd, req = session(b, sim)
    assert decide(b.store, settings, replace(req, gpus=[stale(rd)])).keys
    b.store.set_policy(
        "model", policy(GPU_POLICY + "ocsp_allow_cached = true\nocsp_max_age = 86400\n")
    )
    rd, req = session(b, sim)
    with pytest.raises(ReleaseDenied, match="policy denied"):
        decide(b.store, settings, replace(req, gpus=[stale(rd)]))


def test_unapproved_driver_and_missing_rims_are_denied(broker, sim, gpus):
    b, settings = broker
    b.store.set_policy(
        "model", policy('count = 1\ndriver_version = ["560.35.03"]\nvbios_version = "any"\n')
    )
    rd, req = session(b, sim)
    no_rims = replace(bundle(gpus[0], rd, 0, 1), rims=[])
    with pytest.raises(ReleaseDenied) as e:
        decide(b.store, settings, replace(req, gpus=[no_rims]))
    failed = {
        c["name"]
        for c in e.value.detail["verdicts"]["model"]["profiles"][0]["checks"]
        if not c["passed"]
    }
    assert failed == {"gpu driver_version", "gpu rims"}


def http_release(
    b: Broker,
    sim: SimulatedPlatform,
    rk: protocol.RunnerKey,
    gpus: Callable[[bytes], list[GpuBundle]],
) -> dict[str, object]:
    """A ``/v1/release`` body for a fresh challenge: simulated SEV-SNP evidence binding it and
    ``rk``, and the GPU bundles ``gpus`` makes for its report data."""
    nonce = bytes.fromhex(b.client.post("/v1/challenge").json()["nonce"])
    rd = protocol.report_data(nonce, rk.kem_id, rk.public_bytes, WD)
    report, vcek, chain = sim.snp_report(report_data=rd, measurement=MEASUREMENT)
    return {
        "nonce": nonce.hex(), "tee": "snp", "evidence": base64.b64encode(report).decode(),
        "vcek": base64.b64encode(vcek).decode(),
        "cert_chain": "".join(c.public_bytes(Encoding.PEM).decode() for c in chain),
        "amd_crl": base64.b64encode(sim.amd_crl()).decode(),
        "hpke_public_key": base64.b64encode(rk.public_bytes).decode(),
        "workload_digest": WD, "keys": ["model"],
        "gpus": [{
            "cc_mode": g.cc_mode, "evidence": base64.b64encode(g.report or b"").decode(),
            "certificate": (g.chain_pem or b"").decode(),
            "ocsp": [base64.b64encode(o).decode() for o in g.ocsp],
            "rims": [r.decode() for r in g.rims],
        } for g in gpus(rd)],
    }  # fmt: skip


def test_http_release_carries_gpu_evidence(broker, sim, gpus):
    """``POST /v1/release`` with ``gpus``: the key comes sealed; without the GPU, refused."""
    b, _settings = broker
    b.store.set_policy("model", policy(GPU_POLICY))
    for with_gpu in (True, False):
        rk = protocol.RunnerKey.generate()
        body = http_release(
            b, sim, rk, lambda rd, on=with_gpu: [bundle(gpus[0], rd, 0, 1)] if on else []
        )
        answer = b.client.post("/v1/release", json=body)
        if with_gpu:
            assert answer.status_code == 200, answer.text
            sealed = base64.b64decode(answer.json()["keys"]["model"]["sealed"])
            assert rk.open("model", sealed) == bytes(32)
            # the release's audit record, which the receipt embeds, names the GPU
            (listed,) = answer.json()["audit_log"]["record"]["data"]["gpus"]
            assert listed["ueid"] == str(gpus[0].chain[0].cert.serial_number)
        else:
            assert answer.status_code == 403 and "gpu count" in answer.text


def test_gpu_evidence_without_ocsp_is_denied_by_default(broker, sim, gpus):
    b, settings = broker
    b.store.set_policy("model", policy(GPU_POLICY))
    rd, req = session(b, sim)
    with pytest.raises(ReleaseDenied) as e:
        decide(b.store, settings, replace(req, gpus=[replace(bundle(gpus[0], rd, 0, 1), ocsp=[])]))
    (check,) = [
        c
        for c in e.value.detail["verdicts"]["model"]["profiles"][0]["checks"]
        if c["name"] == "gpu ocsp"
    ]
    assert not check["passed"] and "not checked" in check["actual"]
    b.store.set_policy("model", policy(GPU_POLICY + 'ocsp = "not-required"\n'))
    rd, req = session(b, sim)
    assert decide(
        b.store, settings, replace(req, gpus=[replace(bundle(gpus[0], rd, 0, 1), ocsp=[])])
    ).keys
