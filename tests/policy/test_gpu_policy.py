"""`[profile.gpu]`: what a policy may say about NVIDIA GPUs, and the verdict per GPU."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime

import pytest

from shieldml.attest import GpuClaims, verify_evidence, verify_gpu_evidence
from shieldml.errors import PolicyError
from shieldml.policy import Policy, evaluate
from shieldml.policy._verdict import _version_ok
from shieldml.testing.simulated import SimulatedPlatform, fixed_clock
from shieldml.testing.simulated_gpu import SimulatedGpu

NOW = datetime(2031, 5, 1, tzinfo=UTC)
M = "42" * 48
CPU = f"""
[[profile]]
tee = "snp"
measurement = ["{M}"]
host_data = "any"
min_reported_tcb = "any"
vmpl = "any"
workload_digest = "any"
insecure_allow_simulated = true
insecure_allow_out_of_date = true
"""
GPU = 'count = 1\ndriver_version = ["550.90.07"]\nvbios_version = "any"\n'


@pytest.mark.parametrize(
    ("gpu", "match"),
    [
        ("count = 1\nvbios_version = 'any'\n", "missing driver_version"),
        (GPU + "colour = 'green'\n", "unknown field"),
        (GPU.replace("count = 1", "count = 0"), "count must be"),
        (GPU + "cc_mode = 'off'\n", 'cc_mode must be "on"'),
        (GPU + "min_driver_version = 'five'\n", "not a dotted version"),
        (GPU + "arch = ['volta']\n", "arch must be among"),
        (GPU + "rim_required = false\nrim_ids = ['x']\n", "rim_ids needs rim_required"),
        (GPU + "ocsp = 'sometimes'\n", "ocsp must be"),
        (GPU + "ocsp_max_age = -1\n", "ocsp_max_age"),
    ],
)
def test_gpu_section_is_checked(gpu: str, match: str):
    with pytest.raises(PolicyError, match=match):
        Policy.from_toml(CPU + "[profile.gpu]\n" + gpu)


def test_gpu_section_needs_a_confidential_vm():
    sgx = '[[profile]]\ntee = "sgx"\nmrenclave = "any"\nmrsigner = "' + "ab" * 32 + '"\n'
    sgx += 'isv_prod_id = 0\nmin_isv_svn = 0\nworkload_digest = "any"\n[profile.gpu]\n' + GPU
    with pytest.raises(PolicyError, match="needs a confidential VM"):
        Policy.from_toml(sgx)


def test_versions_compare_numerically_not_as_text():
    assert _version_ok("550.100.01", None, "550.90", vbios=False)  # "550.100" < "550.90" as text
    assert not _version_ok("550.54.15", None, "550.90", vbios=False)
    assert _version_ok("96.00.A5.00.01", None, "96.00.9F.00.00", vbios=True)  # hex groups
    assert _version_ok("96.00.9f.00.01", ("96.00.9F.00.01",), None, vbios=True)


@pytest.fixture(scope="module")
def pair() -> tuple[object, GpuClaims]:
    sim = SimulatedPlatform.create(clock=fixed_clock(NOW))
    report, vcek, chain = sim.snp_report(measurement=bytes.fromhex(M))
    cpu = verify_evidence(
        report, vcek=vcek, cert_chain=chain, now=NOW, trust=sim.trust(), amd_crl=sim.amd_crl()
    )
    g = SimulatedGpu(now=NOW)
    nonce = bytes(32)
    gpu = verify_gpu_evidence(
        g.report(nonce), g.certificates(), now=NOW, trust=g.trust(), nonce=nonce,
        ocsp_responses=g.ocsp_all(), rims=[g.rim("vbios"), g.rim("driver")],
    )  # fmt: skip
    return cpu, replace(gpu, cc_mode="on")


def test_verdict_lists_each_gpu_check(pair):
    cpu, gpu = pair
    policy = Policy.from_toml(
        CPU + "[profile.gpu]\n" + GPU + "min_vbios_version = '96.00.A0.00.00'\n"
    )
    v = evaluate(policy, cpu, None, [gpu])
    failed = {c.name: c for c in v.profiles[0].checks if not c.passed}
    assert set(failed) == {"gpu vbios_version"}
    assert failed["gpu vbios_version"].expected == ">= 96.00.A0.00.00"
    assert failed["gpu vbios_version"].actual.endswith("96.00.9F.00.01")
    ok = evaluate(Policy.from_toml(CPU + "[profile.gpu]\n" + GPU), cpu, None, [gpu])
    assert ok.allowed
    assert not evaluate(Policy.from_toml(CPU + "[profile.gpu]\n" + GPU), cpu, None, []).allowed
    off = evaluate(
        Policy.from_toml(CPU + "[profile.gpu]\n" + GPU), cpu, None, [replace(gpu, cc_mode=None)]
    )
    (cc,) = [c for c in off.profiles[0].checks if c.name == "gpu cc_mode"]
    assert not cc.passed and "not in confidential-computing mode" in cc.hint


def test_simulated_gpu_needs_the_insecure_switch(pair):
    cpu, gpu = pair
    text = (CPU + "[profile.gpu]\n" + GPU).replace("insecure_allow_simulated = true\n", "")
    v = evaluate(Policy.from_toml(text), cpu, None, [gpu])
    failed = {c.name for c in v.profiles[0].checks if not c.passed}
    assert {"root", "gpu root"} <= failed


def _listed(ueid: str, **kw: object) -> dict[str, object]:
    g: dict[str, object] = {
        "arch": "hopper", "ueid": ueid, "hwmodel": "GH100 A01 GSP BROM",
        "driver_version": "550.90.07", "vbios_version": "96.00.9F.00.01",
        "rim_ids": ["NV_GPU_VBIOS_1010_0200_882_96009F0001", "NV_GPU_DRIVER_GH100_550.90.07"],
        "rim_kinds": ["driver", "vbios"], "measurements_matched": True,
        "cc_mode": "on", "root": "simulated",
    }  # fmt: skip
    return {**g, **kw}


def test_a_receipts_listed_gpus_against_the_gpu_requirement():
    """What `receipt verify` checks of the GPUs a receipt lists (each broker's, as verified at
    its release): every broker that released keys, count, repeats, CC mode, root, versions."""
    from shieldml.policy import listed_gpu_problems

    two = Policy.from_toml(CPU + "[profile.gpu]\n" + GPU.replace("count = 1", "count = 2"))
    (p,) = two.profiles
    seqs = {"a": 3, "b": 9}
    good = [_listed("1"), _listed("2")]
    assert listed_gpu_problems(p, {"a": good, "b": good}, seqs) == []
    assert listed_gpu_problems(p, {"a": good}, seqs) == [
        "broker b: 0 GPU(s) listed, the policy requires 2"
    ]
    assert listed_gpu_problems(p, {"a": [good[0], good[0]], "b": good}, seqs) == [
        "broker a: GPU 1: the same GPU as GPU 0"
    ]
    odd = [_listed("1", cc_mode="devtools", root="vendor"), _listed("2", driver_version="535.1")]
    assert listed_gpu_problems(p, {"a": odd, "b": good}, seqs) == [
        "broker a: GPU 0: CC mode 'devtools'",
        "broker a: GPU 1: driver '535.1' not approved",
    ]
    strict = replace(p, insecure=frozenset())  # without insecure_allow_simulated
    assert "broker a: GPU 0: root 'simulated' not accepted" in listed_gpu_problems(
        strict, {"a": good, "b": good}, seqs
    )
    assert listed_gpu_problems(p, "not a dict", seqs)[0].startswith("broker a: 0 GPU(s)")
    assert listed_gpu_problems(p, {"a": [1, good[1]], "b": good}, seqs) == [
        "broker a: GPU 0: not a GPU record"
    ]
