"""Red team of the broker's side of GPU evidence on the simulated platform (commit 7cb2afe): a
broker started with ``--simulated-platform DIR`` trusts the GPU family kept in DIR
(:meth:`BrokerConfig.trust`); the host mixes GPUs, chains and certificates within that family
(all its chains verify to one root) and from other families, and the release answer's ``gpus``
must be what was verified. An attack that succeeds is marked ``xfail(strict=True)``."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from shieldml.attest import RootKind
from shieldml.broker import protocol
from shieldml.broker.server.release import (
    decide,
)
from shieldml.errors import NotGenuineError, ReleaseDenied
from shieldml.testing.simulated import system_clock
from shieldml.testing.simulated_gpu import open_gpus
from tests.broker.test_release_gpu import MEASUREMENT, WD, bundle, http_release, session

GPU_POLICY = 'count = {n}\ndriver_version = ["550.90.07"]\nvbios_version = "any"\n'


def policy(n: int = 1, *, simulated: bool = True) -> str:
    lines = [
        "[[profile]]", 'tee = "snp"', f'measurement = ["{MEASUREMENT.hex()}"]',
        'host_data = "any"', 'min_reported_tcb = "any"', 'vmpl = "any"',
        f'workload_digest = ["{WD}"]', "insecure_allow_out_of_date = true",
    ]  # fmt: skip
    if simulated:
        lines.append("insecure_allow_simulated = true")
    return "\n".join(lines) + "\n[profile.gpu]\n" + GPU_POLICY.format(n=n)


def test_family_gpus_verify_as_simulated_root_with_the_platform_trusted(gpu_broker, family):
    b, settings, sim = gpu_broker
    b.store.set_policy("model", policy(2))
    rd, req = session(b, sim)
    released = decide(
        b.store,
        settings,
        replace(req, gpus=[bundle(family[5], rd, 0, 2), bundle(family[9], rd, 1, 2)]),
    )
    assert "model" in released.keys
    assert [g.root for g in released.gpus] == [RootKind.SIMULATED, RootKind.SIMULATED]
    assert [g.ueid for g in released.gpus] == [
        str(family[5].chain[0].cert.serial_number),
        str(family[9].chain[0].cert.serial_number),
    ]


def test_family_gpus_are_not_vendor_gpus_without_the_insecure_switch(gpu_broker, family):
    b, settings, sim = gpu_broker
    b.store.set_policy("model", policy(1, simulated=False))
    rd, req = session(b, sim)
    with pytest.raises(ReleaseDenied) as e:
        decide(b.store, settings, replace(req, gpus=[bundle(family[0], rd, 0, 1)]))
    checks = e.value.detail["verdicts"]["model"]["profiles"][0]["checks"]
    failed = {c["name"] for c in checks if not c["passed"]}
    assert "gpu root" in failed and "root" in failed


def test_gpu_of_another_family_is_not_genuine(gpu_broker, tmp_path: Path):
    b, settings, sim = gpu_broker
    b.store.set_policy("model", policy(1))
    stranger = open_gpus(tmp_path / "other", clock=system_clock)[0]
    rd, req = session(b, sim)
    with pytest.raises(NotGenuineError) as e:
        decide(b.store, settings, replace(req, gpus=[bundle(stranger, rd, 0, 1)]))
    assert e.value.check == "trust root"


def test_report_of_one_family_gpu_with_anothers_chain_is_refused(gpu_broker, family):
    """Both chains verify to the family root; the report was signed by GPU 1's key."""
    b, settings, sim = gpu_broker
    b.store.set_policy("model", policy(1))
    rd, req = session(b, sim)
    own = bundle(family[1], rd, 0, 1)
    with pytest.raises(NotGenuineError) as e:
        decide(
            b.store, settings, replace(req, gpus=[replace(own, chain_pem=family[2].chain_pem())])
        )
    assert e.value.check == "report signature"


def test_leaf_spliced_under_another_family_gpus_brom_is_refused(gpu_broker, family):
    """GPU 3's FMC leaf presented under GPU 4's BROM certificate (same ICA, same root)."""
    b, settings, sim = gpu_broker
    b.store.set_policy("model", policy(1))
    rd, req = session(b, sim)
    spliced = [family[3].chain[0], family[4].chain[1], *family[3].chain[2:]]
    pem = b"".join(c.cert.public_bytes(Encoding.PEM) for c in spliced)
    forged = replace(bundle(family[3], rd, 0, 1), chain_pem=pem)
    with pytest.raises(NotGenuineError) as e:
        decide(b.store, settings, replace(req, gpus=[forged]))
    assert e.value.check == "certificate chain"


def test_gpu_evidence_for_a_larger_set_is_refused(gpu_broker, family):
    """The runner saw three GPUs; the host forwards two of them (the count is in the nonce)."""
    b, settings, sim = gpu_broker
    b.store.set_policy("model", policy(2))
    rd, req = session(b, sim)
    three = [bundle(family[i], rd, i, 3) for i in range(3)]
    with pytest.raises(NotGenuineError) as e:
        decide(b.store, settings, replace(req, gpus=three[:2]))
    assert e.value.check == "nonce"


def test_more_gpus_than_the_policy_count_is_denied(gpu_broker, family):
    b, settings, sim = gpu_broker
    b.store.set_policy("model", policy(2))
    rd, req = session(b, sim)
    three = [bundle(family[i], rd, i, 3) for i in range(3)]
    with pytest.raises(ReleaseDenied) as e:
        decide(b.store, settings, replace(req, gpus=three))
    checks = e.value.detail["verdicts"]["model"]["profiles"][0]["checks"]
    assert {c["name"]: c["actual"] for c in checks if not c["passed"]} == {"gpu count": "3"}


def test_one_gpu_at_two_places_does_not_count_as_two(gpu_broker, family):
    b, settings, sim = gpu_broker
    b.store.set_policy("model", policy(2))
    rd, req = session(b, sim)
    twice = [bundle(family[0], rd, 0, 2), bundle(family[0], rd, 1, 2)]
    with pytest.raises(NotGenuineError) as e:
        decide(b.store, settings, replace(req, gpus=twice))
    assert e.value.check == "gpu distinct" and "GPU 1 is GPU 0 again" in e.value.message


def test_http_release_answer_lists_the_verified_gpus_in_order(gpu_broker, family):
    """``gpus`` in the answer: the verified GPUs, in the request's order, as in the release's
    audit record (what the runner's receipt then carries)."""
    b, _settings, sim = gpu_broker
    b.store.set_policy("model", policy(2))
    rk = protocol.RunnerKey.generate()
    body = http_release(
        b, sim, rk, lambda rd: [bundle(family[7], rd, 0, 2), bundle(family[2], rd, 1, 2)]
    )
    answer = b.client.post("/v1/release", json=body)
    assert answer.status_code == 200, answer.text
    doc = answer.json()
    assert [g["ueid"] for g in doc["gpus"]] == [
        str(family[7].chain[0].cert.serial_number),
        str(family[2].chain[0].cert.serial_number),
    ]
    assert doc["gpus"] == doc["audit_log"]["record"]["data"]["gpus"]
    assert {g["root"] for g in doc["gpus"]} == {"simulated"}
    assert set(doc["gpus"][0]) == {
        "arch", "ueid", "hwmodel", "driver_version", "vbios_version", "rim_ids", "rim_kinds",
        "measurements_matched", "cc_mode", "root",
    }  # fmt: skip
