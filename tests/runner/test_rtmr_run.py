"""A whole ``shieldml run`` on a (simulated) TD measures its workload digest into RTMR3.

The brokers' policies pin the RTMR3 value a fresh VM reaches after the runner extended it with
exactly this job's digest. The host that reuses a VM in which another job ran first (its
processes may still be there, reading this job's plaintext) gets nothing: RTMR3 holds that job's
extension and cannot be reset. The receipt records what was extended.
"""

from __future__ import annotations

import json
import os
import re

import pytest

from shieldml.errors import ReleaseDenied
from shieldml.runner.evidence import expected_rtmr, rtmr_after, rtmr_extend_value
from shieldml.runner.manifest import JobManifest
from shieldml.runner.run import run_job
from tests.runner.conftest import Job

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="the decrypted view needs root (or user namespaces) here"
)
MRTD = "3c" * 48


def _as_td(job: Job, rtmr3: bytes = bytes(48), tdx: str = "") -> str:
    """Make the job's simulated TEE a TD launched with ``rtmr3``; authorise its digest with a
    policy pinning the RTMR3 of a fresh VM that ran it. Returns the digest."""
    text = job.manifest.read_text()
    text = re.sub(r'kind = "sgx"\nmrenclave = "[0-9a-f]+"', f'kind = "tdx"\nmrtd = "{MRTD}"', text)
    text += f'rtmr3 = "{rtmr3.hex()}"\n' + tdx
    job.manifest.write_text(text)
    digest = JobManifest.load(job.manifest).workload_digest()
    policy = f"""
[[profile]]
tee = "tdx"
mrtd = "{MRTD}"
rtmr0 = "any"
rtmr1 = "any"
rtmr2 = "any"
rtmr3 = "{expected_rtmr(digest).hex()}"
mr_config_id = "any"
workload_digest = ["{digest}"]
insecure_allow_simulated = true
"""
    with job.admin() as c:
        for name in ("model", "results"):
            c.set_policy(name, policy)
    return digest


def test_run_on_a_fresh_td_extends_rtmr3_and_records_it_in_the_receipt(job: Job):
    digest = _as_td(job)
    lines: list[str] = []
    receipt = job.dir / "receipt.json"
    assert run_job(job.manifest, receipt=str(receipt), log=lines.append) == 0
    assert any(
        f"RTMR3 extended with the workload digest: now {expected_rtmr(digest).hex()}" in x
        for x in lines
    )
    ext = json.loads(receipt.read_text())["receipt"]["rtmr_extension"]
    assert ext["extended"] and ext["rtmr"] == 3
    assert ext["before"] == "00" * 48 and ext["after"] == expected_rtmr(digest).hex()
    assert ext["value"] == rtmr_extend_value(digest).hex()


def test_policy_pinning_rtmr3_denies_a_run_in_a_vm_that_ran_another_job_first(job: Job):
    used = expected_rtmr("sha256:" + "cd" * 32)  # RTMR3 after another job ran in this VM
    digest = _as_td(job, rtmr3=used)
    with pytest.raises(ReleaseDenied) as e:
        run_job(job.manifest)
    failed = {
        (c["name"], c["expected"], c["actual"])
        for v in e.value.verdicts
        for p in v.get("profiles", [])
        for c in p["checks"]
        if not c["passed"]
    }
    found = rtmr_after(used, rtmr_extend_value(digest)).hex()
    assert failed == {("rtmr3", expected_rtmr(digest).hex(), found)}
    assert not (job.dir / "out").exists()  # the program never started
