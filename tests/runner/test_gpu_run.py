"""``shieldml run`` with GPU evidence on the simulated platform: a simulated TDX VM with simulated
NVIDIA GPUs, a broker process that trusts the platform (``--simulated-platform``), the runner's
NVML provider answered by :class:`~shieldml.testing.simulated_nvml.SimulatedNvml`, and the
broker's real verifier and policy. What the host can do here: switch the GPUs out of CC mode,
run another driver, hand the runner RIMs of other firmware, or take away the insecure switch."""

from __future__ import annotations

import json
import os

import pytest

from shieldml.cli import main
from shieldml.errors import (
    ManifestError,
    NotGenuineError,
    ReceiptError,
    ReleaseDenied,
)
from shieldml.policy import Policy
from shieldml.runner.job_policy import policy_from_job
from shieldml.runner.receipt import verify_receipt
from shieldml.runner.run import run_job
from shieldml.testing.simulated import SimulatedPlatform, system_clock
from shieldml.testing.simulated_gpu import open_gpus
from tests.runner.conftest import Job
from tests.runner.gpu_jobs import authorize, denial, failed_checks, gpu_job

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="the decrypted view needs root (or user namespaces) here"
)


def test_two_simulated_gpus_get_the_key_and_are_named_in_the_receipt(
    job: Job, capsys: pytest.CaptureFixture[str]
):
    m = gpu_job(job, sim='gpus = "2"\n')
    policy = policy_from_job(m).text
    assert "gpu = { count = 2," in policy and '"550.90.07"' in policy
    authorize(job, policy)
    receipt = job.dir / "receipt.json"
    assert run_job(job.manifest, receipt=str(receipt)) == 0
    body = json.loads(receipt.read_text())["receipt"]
    listed = body["gpus"]["owner"]
    gpus = open_gpus(job.sim_dir, clock=system_clock)
    assert [g["ueid"] for g in listed] == [str(g.chain[0].cert.serial_number) for g in gpus[:2]]
    assert {(g["driver_version"], g["vbios_version"]) for g in listed} == {
        ("550.90.07", "96.00.9F.00.01")
    }
    # the receipt verifies under the owner's policy: the CPU evidence against the profile, the
    # GPUs it lists against [profile.gpu]
    trust = SimulatedPlatform.open(job.sim_dir, clock=system_clock).trust()
    verified = verify_receipt(str(receipt), policy=Policy.from_toml(policy), trust=trust)
    assert verified.body["gpus"]["owner"] == listed
    (job.dir / "policy.toml").write_text(policy)
    rc = main(["receipt", "verify", str(receipt), "--policy", str(job.dir / "policy.toml"),
               "--simulated-platform", str(job.sim_dir)])  # fmt: skip
    shown = capsys.readouterr().out
    assert rc == 0 and "GPU 1 (verified by broker owner at the release): hopper" in shown
    three = policy.replace("count = 2,", "count = 3,")
    with pytest.raises(ReceiptError, match="do not meet") as e:
        verify_receipt(str(receipt), policy=Policy.from_toml(three), trust=trust)
    assert e.value.problems == ["broker owner: 2 GPU(s) listed, the policy requires 3"]
    other = policy.replace('driver_version = ["550.90.07"]', 'driver_version = ["535.104.05"]')
    with pytest.raises(ReceiptError) as e:
        verify_receipt(str(receipt), policy=Policy.from_toml(other), trust=trust)
    assert len(e.value.problems) == 2 and "driver '550.90.07' not approved" in e.value.problems[0]
    doc = json.loads(receipt.read_text())  # the host edits the list: the evidence no longer binds
    doc["receipt"]["gpus"]["owner"][0]["driver_version"] = "535.104.05"
    receipt.write_text(json.dumps(doc))
    with pytest.raises(ReceiptError, match="does not bind"):
        verify_receipt(str(receipt), policy=Policy.from_toml(other), trust=trust)


def test_gpu_out_of_cc_mode_is_refused_as_such(job: Job):
    authorize(job, policy_from_job(gpu_job(job)).text)
    gpu_job(job, sim='gpu_cc = "off"\n')  # the host turned CC off after the owner's policy
    detail = denial(job, NotGenuineError)
    assert "GPU 0 not in confidential-computing mode" in str(detail)


def test_devtools_mode_is_refused(job: Job):
    authorize(job, policy_from_job(gpu_job(job)).text)
    gpu_job(job, sim='gpu_cc = "devtools"\n')
    assert "not in confidential-computing mode" in str(denial(job, NotGenuineError))


def test_another_driver_than_the_policy_names_is_refused(job: Job):
    authorize(job, policy_from_job(gpu_job(job)).text)
    gpu_job(job, sim='gpu_driver = "535.104.05"\n')  # the RIMs match it: only the policy stops it
    checks = failed_checks(denial(job))
    assert set(checks) == {"gpu driver_version"} and "535.104.05" in checks["gpu driver_version"]


def test_rims_of_other_firmware_name_the_index(job: Job):
    authorize(job, policy_from_job(gpu_job(job, gpu='collateral = "collateral"\n')).text)
    gpus = open_gpus(job.sim_dir, clock=system_clock)
    collateral = job.dir / "collateral"
    collateral.mkdir()
    (collateral / "driver.xml").write_bytes(gpus[0].rim("driver"))
    (collateral / "vbios.xml").write_bytes(gpus[0].rim("vbios", golden={9: bytes(48)}))
    for i in range(1, 4):
        (collateral / f"gpu-{i}.der").write_bytes(gpus[0].ocsp(i))
    for i in range(3):
        (collateral / f"rim-{i}.der").write_bytes(gpus[0].ocsp(i, rim=True))
    text = str(denial(job, NotGenuineError))
    assert "index 9" in text and "0" * 96 in text


def test_gpu_count_short_of_the_policy_is_refused(job: Job):
    authorize(job, policy_from_job(gpu_job(job, sim='gpus = "2"\n')).text)
    gpu_job(job)  # the host shows one GPU where the owner approved two
    checks = failed_checks(denial(job))
    assert checks.get("gpu count") == "1"


def test_simulated_gpus_need_the_insecure_switch(job: Job):
    policy = policy_from_job(gpu_job(job)).text
    authorize(job, policy.replace("insecure_allow_simulated = true", ""))
    checks = failed_checks(denial(job))
    assert "root" in checks and "gpu root" in checks


def test_cpu_only_evidence_is_refused_by_a_gpu_policy(job: Job):
    authorize(job, policy_from_job(gpu_job(job)).text)
    text = job.manifest.read_text()
    job.manifest.write_text(text[: text.index("\n[gpu]")] + "\n")  # the host drops [gpu] ...
    with pytest.raises(ReleaseDenied):  # ... which changes the digest; and the count fails too
        run_job(job.manifest)


def test_gpu_table_needs_a_confidential_vm_kind(job: Job):
    with pytest.raises(ManifestError, match="confidential VM"):
        gpu_job(job, kind="sgx")


@pytest.mark.parametrize(
    ("sim", "match"),
    [
        ('gpus = "0"\n', "gpus must be 1 to 16"),
        ('gpus = "17"\n', "gpus must be 1 to 16"),
        ('gpu_cc = "maybe"\n', "gpu_cc must be one of"),
        ('gpu_vbios = "96.00"\n', "five hex bytes"),
        ('gpu_driver = "five"\n', "not a dotted version"),
    ],
)
def test_bad_simulated_gpu_settings_are_manifest_errors(job: Job, sim: str, match: str):
    with pytest.raises(ManifestError, match=match):
        gpu_job(job, sim=sim)


def test_real_gpus_beside_a_simulated_cpu_answer_through_nvml_and_cc_off_is_refused(
    job: Job, monkeypatch: pytest.MonkeyPatch, tmp_path
):
    """``[simulated] gpus = "nvml"``: a GPU machine without a CPU TEE (the lent H200, not in CC
    mode) gives its real GPUs' evidence through ``pynvml``. Here a stand-in ``pynvml`` module
    (GPUs no broker trusts, the system's CC state off) takes the real module's place."""
    import sys

    from shieldml.testing.simulated_nvml import SimulatedNvml

    nvml = SimulatedNvml(open_gpus(tmp_path / "elsewhere", clock=system_clock)[:1], (0, 0))
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    m = gpu_job(job, sim='gpus = "nvml"\n')
    policy = policy_from_job(m).text
    assert 'gpu = { count = 1, driver_version = "any"' in policy
    authorize(job, policy)
    assert "GPU 0 not in confidential-computing mode" in str(denial(job, NotGenuineError))
    assert nvml.started == 0 and nvml.nonces == []  # NVML shut down; no report asked with CC off
    nvml.cc = (1, 0)  # CC on: the report is made, and its root is none the broker trusts
    assert "untrusted root" in str(denial(job, NotGenuineError)) and len(nvml.nonces) == 1
    with pytest.raises(ManifestError, match="not with gpus"):
        gpu_job(job, sim='gpus = "nvml"\ngpu_cc = "on"\n')
