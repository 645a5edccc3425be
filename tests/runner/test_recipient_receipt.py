"""Outputs sealed to a recipient prove where they came from (issue 12, point 6).

Attack: HPKE base mode does not authenticate the sender, so anyone holding the recipient's
*public* key (it sits in the job manifest) could seal a key of their own beside a forged
ciphertext, and the recipient's decryption accepted the forgery as the job's output. An output
is now opened only with the run's receipt: it must verify against the owner's policy and list
this very sealed key for this in-TEE path.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from shieldml.errors import PolicyDenied, ReceiptError
from shieldml.files import Format, encrypt_file, generate_key, open_protected
from shieldml.policy import Policy
from shieldml.runner import open_output_key, sealed_key_path
from shieldml.runner.recipient import new_recipient, seal_key
from shieldml.runner.run import run_job
from shieldml.testing.simulated import SimulatedPlatform, system_clock
from tests.runner.conftest import Job, policy_for

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="the decrypted view needs root (or user namespaces) here"
)


def _recipient_run(job: Job) -> tuple[Path, Path, Path, str]:
    """Run the job with its output sealed to a recipient; return key, ciphertext, receipt, path."""
    rec = job.dir / "recipient.key"
    new_recipient(rec)
    job.manifest.write_text(
        job.manifest.read_text().replace(
            'ciphertext = "out/result.txt.enc"\nkey = "results"\nbroker = "owner"',
            'ciphertext = "out/result.txt.enc"\nrecipient = "recipient.key.pub"',
        )
    )
    digest = job.authorize()
    receipt = job.dir / "run.receipt"
    assert run_job(job.manifest, receipt=str(receipt)) == 0
    return rec, job.dir / "out" / "result.txt.enc", receipt, digest


def _forge(job: Job, rec: Path, out: Path, text: bytes) -> None:
    """The host (or anyone) holds the public key: it seals its own key and forges the output."""
    tee_path = str((job.dir / "work").resolve() / "result.txt")
    forged_key = generate_key(Format.STREAM)
    sealed_key_path(out).write_bytes(
        seal_key(Path(str(rec) + ".pub").read_bytes(), tee_path, forged_key)
    )
    (job.dir / "forged").write_bytes(text)
    encrypt_file(job.dir / "forged", out, forged_key, bind=tee_path, overwrite=True)


def _trust(job: Job):  # type: ignore[no-untyped-def]
    return SimulatedPlatform.open(job.sim_dir, clock=system_clock).trust()


def test_the_runs_own_output_opens_with_its_receipt(job: Job):
    rec, out, receipt, digest = _recipient_run(job)
    key, tee_path, verified = open_output_key(
        out, rec, receipt=receipt, policy=Policy.from_toml(policy_for(digest)), trust=_trust(job)
    )
    assert tee_path == str((job.dir / "work").resolve() / "result.txt")
    assert verified.body["workload_digest"] == digest
    with open_protected(out, key, bind=tee_path) as f:
        assert f.read().endswith(b"HELLO SHIELDED WORLD INPUT-MARKER")


def test_output_forged_with_the_recipients_public_key_is_refused(job: Job):
    rec, out, receipt, digest = _recipient_run(job)
    _forge(job, rec, out, b"the model says: approve the loan")
    with pytest.raises(ReceiptError, match="lists no output with this sealed key"):
        open_output_key(
            out,
            rec,
            receipt=receipt,
            policy=Policy.from_toml(policy_for(digest)),
            trust=_trust(job),
        )


def test_output_opened_for_another_path_than_the_receipt_names_is_refused(job: Job):
    rec, out, receipt, digest = _recipient_run(job)
    with pytest.raises(ReceiptError, match="was written at"):
        open_output_key(
            out, rec, receipt=receipt, policy=Policy.from_toml(policy_for(digest)),
            trust=_trust(job), bind="/elsewhere/result.txt",
        )  # fmt: skip


def test_receipt_of_another_workload_does_not_open_the_output(job: Job):
    rec, out, receipt, _digest = _recipient_run(job)
    with pytest.raises(PolicyDenied):
        open_output_key(
            out, rec, receipt=receipt, policy=Policy.from_toml(policy_for("ab" * 32)),
            trust=_trust(job),
        )  # fmt: skip


def test_decrypt_of_a_forged_recipient_output_fails_and_writes_nothing(
    job: Job, capsys: pytest.CaptureFixture[str]
):
    from shieldml.cli import main

    rec, out, receipt, digest = _recipient_run(job)
    _forge(job, rec, out, b"forged")
    policy = job.dir / "policy.toml"
    policy.write_text(policy_for(digest))
    plain = job.dir / "result.txt"
    code = main(
        ["decrypt", str(out), str(plain), "--recipient-key", str(rec), "--receipt", str(receipt),
         "--policy", str(policy), "--simulated-platform", str(job.sim_dir)]
    )  # fmt: skip
    assert code == 1 and not plain.exists()
    assert "lists no output with this sealed key" in capsys.readouterr().err
