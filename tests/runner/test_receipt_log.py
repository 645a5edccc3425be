"""A receipt carries each broker's audit proof of its release (issue 13, point 5).

The runner keeps the inclusion proof and signed checkpoint the broker answered with; ``receipt
verify --log-key`` checks that the release is in a checkpoint that broker's log key signed, and
the owner can check later that the broker's log still extends it (``audit verify --checkpoint``).
"""

from __future__ import annotations

import json
import os

import pytest

from shieldml.broker import tlog
from shieldml.cli import main
from shieldml.errors import ReceiptError
from shieldml.policy import Policy
from shieldml.runner.receipt import verify_receipt
from shieldml.runner.run import run_job
from shieldml.testing.simulated import SimulatedPlatform, system_clock
from tests.runner.conftest import Job

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="the decrypted view needs root (or user namespaces) here"
)


def test_receipt_release_is_in_the_brokers_signed_log_and_others_keys_are_refused(
    job: Job, capsys: pytest.CaptureFixture[str]
):
    digest = job.authorize()
    receipt = job.dir / "receipt.json"
    assert run_job(job.manifest, receipt=str(receipt)) == 0
    state = job.broker.token_file.parent
    key = tlog.NoteSigner.load_or_create(state / "log-signing-key").verifier
    policy = Policy.from_toml(job.policy(digest))
    trust = SimulatedPlatform.open(job.sim_dir, clock=system_clock).trust()
    body = json.loads(receipt.read_text())["receipt"]
    seq = body["broker_audit_seq"]["owner"]

    result = verify_receipt(str(receipt), policy=policy, trust=trust, log_keys=[key])
    assert result.logged == {"owner": seq}
    # a key that is not the broker's (a forger's, under the same name) is refused
    other = tlog.NoteSigner(key.name, bytes(32)).verifier
    with pytest.raises(ReceiptError, match="signed by log key"):
        verify_receipt(str(receipt), policy=policy, trust=trust, log_keys=[other])

    pol_file = job.dir / "policy.toml"
    pol_file.write_text(job.policy(digest))
    args = ["receipt", "verify", str(receipt), "--simulated-platform", str(job.sim_dir),
            "--policy", str(pol_file), "--log-key", key.vkey()]  # fmt: skip
    capsys.readouterr()
    assert main(args) == 0
    assert f"in its signed audit checkpoint of {seq} records" in capsys.readouterr().out

    # the receipt's checkpoint, saved by the owner: the broker's log still extends it
    saved = job.dir / "from-receipt.checkpoint"
    saved.write_text(body["broker_audit_log"]["owner"]["checkpoint"])
    conn = ["--url", job.broker.url, "--fingerprint", job.broker.fingerprint,
            "--token-file", str(job.broker.token_file)]  # fmt: skip
    assert (
        main(["audit", "verify", *conn, "--log-key", key.vkey(), "--checkpoint", str(saved)]) == 0
    )
