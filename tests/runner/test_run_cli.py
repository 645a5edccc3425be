"""`shieldml run` through the real CLI (issue 14): refusals laid out by failed check, never cut;
`--json` (report and errors on one line of stderr); the runner's own exit code (125), distinct
from the program's."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from shieldml.cli import EXIT_RUNNER, EXIT_USAGE, main
from shieldml.runner.manifest import JobManifest
from shieldml.testing.simulated import SimulatedPlatform, system_clock
from tests.runner.conftest import Job, encrypt_file_plain

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="the decrypted view needs root (or user namespaces) here"
)

OTHER = "sha256:" + "00" * 32


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def last_json_line(err: str) -> dict[str, Any]:
    doc = json.loads(err.strip().splitlines()[-1])
    assert isinstance(doc, dict)
    return doc


def _deny(job: Job) -> str:
    """model: a policy for another digest; results: no policy at all. Returns the job's digest."""
    with job.admin() as c:
        c.set_policy("model", job.policy(OTHER))
    return JobManifest.load(job.manifest).workload_digest()


def _foreign_platform(job: Job, tmp_path: Path) -> None:
    """The job's evidence from a simulated platform the broker does not trust."""
    job.authorize()
    other = tmp_path / "other-platform"
    SimulatedPlatform.open(other, clock=system_clock)
    job.manifest.write_text(job.manifest.read_text().replace(str(job.sim_dir), str(other)))


def test_policy_denial_lists_each_failed_check_uncut(job: Job, capsys: pytest.CaptureFixture[str]):
    digest = _deny(job)
    rc, _, err = cli(capsys, "run", "-m", str(job.manifest))
    assert rc == EXIT_RUNNER, err
    lines = err.splitlines()
    assert lines[0].startswith(
        "error: the broker's policy denied the release of 'model', 'results'"
    )
    assert "broker answered 403, audit record" in lines[0]
    # the failed check first, by its parts, nothing cut (both digests whole), no JSON dump
    i = lines.index("key 'model', profile 1 (sgx)")
    assert lines[i + 1 : i + 5] == [
        "  ✗ workload_digest",
        f"      expected: {OTHER}",
        f"      found:    {digest}",
        "      hint:     the job (manifest or trusted files) differs from the one the owner"
        " approved: `shieldml job measure`",
    ]
    assert lines[i + 5].startswith("  ✓ passed: tee, root, debug")
    assert "key 'results': no policy set for this key: denied by default" in lines
    assert "{" not in err and "verdicts" not in err
    assert not (job.dir / "out").exists()


def test_not_genuine_reads_like_attest_explain(
    job: Job, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    _foreign_platform(job, tmp_path)
    rc, _, err = cli(capsys, "run", "-m", str(job.manifest))
    assert rc == EXIT_RUNNER, err
    lines = err.splitlines()
    assert lines[0].startswith(
        "error: the broker found the evidence not genuine (broker answered 403"
    )
    assert lines[1] == "  ✗ trust root: PCK chain chains to an untrusted root (simulated)"
    assert lines[2] == "      expected: a pinned intel root"
    assert lines[3].startswith(
        "      found:    O=shieldml simulated,CN=Intel SGX Root CA (SHA-256 "
    )
    assert lines[4].startswith("      hint:     simulated evidence verifies only when its platform")
    assert lines[5].startswith("  ✓ quote format: ")  # the checks that passed, after the failure
    assert "\\n" not in err and '"reasons"' not in err


def test_json_errors_are_one_object_on_stderr(
    job: Job, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    digest = _deny(job)
    rc, out, err = cli(capsys, "run", "-m", str(job.manifest), "--json")
    assert rc == EXIT_RUNNER and out == ""  # no progress lines: stdout is the program's
    doc = last_json_line(err)
    assert doc["ok"] is False and doc["exit_code"] == EXIT_RUNNER
    assert doc["type"] == "ReleaseDenied" and doc["kind"] == "error"
    d = doc["details"]
    assert d["status"] == 403 and isinstance(d["audit_seq"], int)
    assert d["failed_checks"] == [
        {
            "key": "model",
            "profile": 1,
            "tee": "sgx",
            "check": "workload_digest",
            "expected": OTHER,
            "found": digest,
            "hint": "the job (manifest or trusted files) differs from the one the owner approved:"
            " `shieldml job measure`",
        },
        {"key": "results", "reason": "no policy set for this key: denied by default"},
    ]
    assert {v["key"] for v in d["verdicts"]} == {"model", "results"}

    _foreign_platform(job, tmp_path)
    rc, out, err = cli(capsys, "run", "-m", str(job.manifest), "--json")
    doc = last_json_line(err)
    assert rc == EXIT_RUNNER and out == "" and doc["type"] == "NotGenuineError"
    d = doc["details"]
    assert (d["failed_check"], d["expected"]) == ("trust root", "a pinned intel root")
    assert d["message"] == "PCK chain chains to an untrusted root (simulated)"
    assert d["hint"] == doc["hint"] and "--simulated-platform" in d["hint"]
    assert [c["passed"] for c in d["checks"]][-1] is False and d["checks"][0]["passed"] is True


def test_json_report_and_exit_codes_of_the_program_pass_through(
    job: Job, capsys: pytest.CaptureFixture[str]
):
    digest = job.authorize()
    receipt = job.dir / "receipt.json"
    rc, out, err = cli(capsys, "run", "-m", str(job.manifest), "--receipt", str(receipt), "--json")
    assert rc == 0 and out == ""
    doc = last_json_line(err)
    assert doc["ok"] is True and doc["exit_code"] == 0 and doc["workload_digest"] == digest
    assert doc["brokers"]["owner"]["keys"] == ["model", "results"]
    assert isinstance(doc["brokers"]["owner"]["audit_seq"], int)
    assert doc["receipt"] == str(receipt) and receipt.exists()
    phases = ("measure_s", "attest_release_s", "root_s", "decrypt_s", "program_s", "seal_s")
    assert all(doc["times"][k] >= 0 for k in (*phases, "receipt_s", "total_s"))
    assert doc["times"]["receipt_s"] > 0 and doc["times"]["decrypted_bytes"] > 0

    # the program exits 3 (its input says "fail"): 3, the program's, not an integrity failure
    work = (job.dir / "work").resolve()
    encrypt_file_plain(job.dir / "x", b"fail", job.dir / "enc" / "input.txt.enc", job.model_key,
                       str(work / "input.txt"))  # fmt: skip
    job.authorize()
    rc, _, err = cli(capsys, "run", "-m", str(job.manifest), "--json")
    assert rc == 3 and last_json_line(err) | {"brokers": None, "times": None} == {
        "ok": True,
        "exit_code": 3,
        "receipt": None,
        "workload_digest": digest,
        "brokers": None,
        "times": None,
    }


def test_runner_failures_have_their_own_exit_code(job: Job, capsys: pytest.CaptureFixture[str]):
    job.authorize()
    enc = job.dir / "enc" / "model.bin.enc"
    raw = bytearray(enc.read_bytes())
    raw[500] ^= 1
    enc.write_bytes(bytes(raw))
    # an integrity failure of an input: the runner's code, not 3 (which the program may use)
    rc, _, err = cli(capsys, "run", "-m", str(job.manifest))
    assert rc == EXIT_RUNNER and "model.bin.enc" in err
    rc, _, err = cli(capsys, "run", "-m", str(job.manifest), "--runner-exit-code", "99", "--json")
    doc = last_json_line(err)
    assert rc == 99 and doc["exit_code"] == 99 and doc["ok"] is False
    assert "model.bin.enc" in doc["error"]
    # usage errors of `run` too: never 2, which the program may use
    rc, _, err = cli(capsys, "run")
    assert rc == EXIT_RUNNER != EXIT_USAGE and "--manifest" in err
    rc, _, err = cli(capsys, "run", "--json")
    doc = last_json_line(err)
    assert rc == EXIT_RUNNER and doc["kind"] == "usage" and doc["exit_code"] == EXIT_RUNNER
    rc, _, err = cli(capsys, "run", "-m", str(job.manifest), "--runner-exit-code", "0")
    assert rc == EXIT_RUNNER and "--runner-exit-code" in err
