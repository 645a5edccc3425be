"""A receipt is only as good as the policy it is checked against (issue 12, point 6).

Attack: ``shieldml receipt verify`` accepted a receipt from a debug TEE whose measurements were
all zero. Genuine evidence alone proves nothing about a receipt: any enclave on a genuine platform
(a debug one, one the attacker signed) can put any receipt body into its report data. The
verifier now evaluates a release policy (the broker's TOML) on the evidence with the receipt's
workload digest; debug, simulated and custom-root evidence pass only through the policy's own
``insecure_allow_*`` switches, and the CLI prints the measurements it accepted.
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path

import pytest

from shieldml.attest import TrustAnchors
from shieldml.cli import main
from shieldml.errors import PolicyDenied
from shieldml.policy import Policy, Verdict
from shieldml.runner.evidence import SimulatedProvider
from shieldml.runner.manifest import JobManifest
from shieldml.runner.receipt import verify_receipt, write_receipt
from shieldml.runner.run import run_job
from shieldml.testing.simulated import SimulatedPlatform, system_clock
from tests.runner.conftest import MRENCLAVE, Job, policy_for

needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="the decrypted view needs root (or user namespaces) here"
)


def _digest(job: Job) -> str:
    return JobManifest.load(job.manifest).workload_digest()


def _receipt(job: Job, *, debug: bool = False, measurements: dict[str, str] | None = None) -> Path:
    """A receipt as the runner writes it, from the simulated TEE with these measurements."""
    m = JobManifest.load(job.manifest)
    path = job.dir / "receipt.json"
    provider = SimulatedProvider(
        job.sim_dir,
        "sgx",
        {"mrenclave": MRENCLAVE} if measurements is None else measurements,
        debug=debug,
        clock=system_clock,
    )
    write_receipt(
        str(path),
        digest=m.workload_digest(),
        audit={},
        result={"inputs": [], "outputs": []},
        status=0,
        started=datetime.now(UTC),
        provider=provider,
    )
    return path


def _trust(job: Job) -> TrustAnchors:
    return SimulatedPlatform.open(job.sim_dir, clock=system_clock).trust()


def _policy_file(job: Job, text: str) -> str:
    p = job.dir / "policy.toml"
    p.write_text(text)
    return str(p)


def _failed(e: pytest.ExceptionInfo[PolicyDenied]) -> dict[str, tuple[str, str]]:
    verdict = e.value.verdict
    assert isinstance(verdict, Verdict) and not verdict.allowed
    return {
        c.name: (c.expected, c.actual) for p in verdict.profiles for c in p.checks if not c.passed
    }


def _cli(job: Job, receipt: Path, *args: str) -> list[str]:
    return ["receipt", "verify", str(receipt), "--simulated-platform", str(job.sim_dir), *args]


@needs_root
def test_receipt_from_a_debug_tee_is_refused(job: Job, capsys: pytest.CaptureFixture[str]):
    """The job really runs in a debug TEE (its broker knowingly allows debug); the owner's normal
    policy must refuse the receipt that TEE wrote, although its evidence is genuine and binds it."""
    job.manifest.write_text(job.manifest.read_text().replace('debug = "false"', 'debug = "true"'))
    digest = _digest(job)
    with job.admin() as c:
        for name in ("model", "results"):
            c.set_policy(name, policy_for(digest, insecure_allow_debug="true"))
    receipt = job.dir / "receipt.json"
    assert run_job(job.manifest, receipt=str(receipt)) == 0

    with pytest.raises(PolicyDenied) as e:
        verify_receipt(str(receipt), policy=Policy.from_toml(policy_for(digest)), trust=_trust(job))
    assert _failed(e) == {"debug": ("off", "on")}

    capsys.readouterr()
    rc = main(_cli(job, receipt, "--policy", _policy_file(job, policy_for(digest))))
    out = capsys.readouterr().out
    assert rc == 1, out
    assert "receipt refused" in out
    assert "✗ debug\n      expected: off\n      found:    on\n" in out
    assert "evidence genuine" not in out


def test_receipt_with_zero_measurements_is_refused_by_a_pinning_policy(
    job: Job, capsys: pytest.CaptureFixture[str]
):
    """The issue's receipt: debug TEE, every measurement zero, genuine evidence binding the body."""
    receipt = _receipt(job, debug=True, measurements={})
    pol = policy_for(_digest(job))
    with pytest.raises(PolicyDenied) as e:
        verify_receipt(str(receipt), policy=Policy.from_toml(pol), trust=_trust(job))
    assert _failed(e) == {"debug": ("off", "on"), "mrenclave": (MRENCLAVE, "00" * 32)}

    # not debug, but still nobody's code: the pinned mrenclave alone refuses it
    receipt = _receipt(job, measurements={})
    with pytest.raises(PolicyDenied) as e:
        verify_receipt(str(receipt), policy=Policy.from_toml(pol), trust=_trust(job))
    assert _failed(e) == {"mrenclave": (MRENCLAVE, "00" * 32)}

    capsys.readouterr()
    rc = main(_cli(job, receipt, "--policy", _policy_file(job, pol), "--json"))
    doc = json.loads(capsys.readouterr().out)
    assert rc == 1
    assert doc["ok"] is False and doc["verdict"]["allowed"] is False
    [check] = [c for c in doc["verdict"]["profiles"][0]["checks"] if not c["passed"]]
    assert check["name"] == "mrenclave" and check["actual"] == "00" * 32


def test_receipt_for_another_workload_is_refused(job: Job):
    """The policy's workload digest is checked against the digest the receipt names."""
    receipt = _receipt(job)
    other = "sha256:" + "00" * 32
    with pytest.raises(PolicyDenied) as e:
        verify_receipt(str(receipt), policy=Policy.from_toml(policy_for(other)), trust=_trust(job))
    assert _failed(e) == {"workload_digest": (other, _digest(job))}


def test_receipt_from_the_simulated_platform_needs_the_policys_insecure_switch(
    job: Job, capsys: pytest.CaptureFixture[str]
):
    """Trusting the simulated platform's root (``--simulated-platform``) makes its evidence
    verify; only the policy's ``insecure_allow_simulated`` makes it acceptable, as at the broker."""
    receipt = _receipt(job)
    strict = policy_for(_digest(job)).replace("insecure_allow_simulated = true\n", "")
    assert "insecure_allow_simulated" not in strict
    with pytest.raises(PolicyDenied) as e:
        verify_receipt(str(receipt), policy=Policy.from_toml(strict), trust=_trust(job))
    assert _failed(e) == {"root": ("vendor", "simulated")}

    capsys.readouterr()
    rc = main(_cli(job, receipt, "--policy", _policy_file(job, strict)))
    out = capsys.readouterr().out
    assert rc == 1, out
    assert "✗ root\n      expected: vendor\n      found:    simulated\n" in out

    # with the switch the same receipt passes, and the output says what was insecure
    capsys.readouterr()
    rc = main(_cli(job, receipt, "--policy", _policy_file(job, policy_for(_digest(job)))))
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "insecure: accepted only through insecure_allow_simulated" in out


def test_receipt_from_a_custom_root_needs_the_policys_insecure_switch(job: Job):
    """A root trusted with insecure=True verifies the evidence as ``root: custom``; a policy that
    allows simulated evidence does not thereby allow custom roots."""
    platform = SimulatedPlatform.open(job.sim_dir, clock=system_clock)
    anchors = TrustAnchors().with_custom(platform.intel_root, insecure=True)
    receipt = _receipt(job)
    pol = policy_for(_digest(job))
    with pytest.raises(PolicyDenied) as e:
        verify_receipt(str(receipt), policy=Policy.from_toml(pol), trust=anchors)
    assert _failed(e) == {"root": ("vendor", "custom")}
    allowed = policy_for(_digest(job), insecure_allow_custom_root="true")
    verify_receipt(str(receipt), policy=Policy.from_toml(allowed), trust=anchors)


def test_receipt_verify_prints_the_accepted_measurements(
    job: Job, capsys: pytest.CaptureFixture[str]
):
    receipt = _receipt(job)
    digest = _digest(job)
    policy = _policy_file(job, policy_for(digest))
    capsys.readouterr()
    rc = main(_cli(job, receipt, "--policy", policy))
    out = capsys.readouterr().out
    assert rc == 0, out
    assert f"receipt of workload {digest}, exit code 0" in out
    assert f"accepted by profile 1 of {policy}: sgx, root simulated, TCB UpToDate, debug off" in out
    assert "measurements accepted:\n" in out
    for line in (f"mrenclave {MRENCLAVE}", f"mrsigner {'00' * 32}", "isv_prod_id 0", "isv_svn 0"):
        assert f"  {line}\n" in out, line

    rc = main(_cli(job, receipt, "--policy", policy, "--json"))
    doc = json.loads(capsys.readouterr().out)
    assert rc == 0 and doc["ok"]
    assert doc["verdict"]["allowed"] and doc["verdict"]["matched_profile"] == 1
    assert doc["claims"]["measurements"]["mrenclave"] == MRENCLAVE


def test_receipt_verify_without_a_policy_is_refused(job: Job, capsys: pytest.CaptureFixture[str]):
    """No built-in "genuine is enough" policy: a receipt names no code until a policy pins it, so
    the CLI refuses to judge one without --policy (a usage error, whatever the evidence)."""
    for receipt in (_receipt(job), _receipt(job, debug=True, measurements={})):
        capsys.readouterr()
        rc = main(_cli(job, receipt))
        captured = capsys.readouterr()
        assert rc == 2, captured.out
        assert "--policy is required" in captured.err
        assert "evidence genuine" not in captured.out
