"""`shieldml broker key add|policy set --json` against a real broker, and a broker's refusal
of an admin request as the JSON error object (issue 14)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from shieldml.cli import EXIT_ERROR, main
from shieldml.testing.brokers import BrokerProcess, start_broker
from tests.conftest import sgx_policy


@pytest.fixture
def served(tmp_path: Path) -> Iterator[BrokerProcess]:
    bp = start_broker(tmp_path / "state")
    yield bp
    bp.stop()


def test_key_add_and_policy_set_json(
    served: BrokerProcess, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    conn = ["--url", served.url, "--fingerprint", served.fingerprint,
            "--token-file", str(served.token_file)]  # fmt: skip
    capsys.readouterr()
    assert main(["broker", "key", "add", "model", *conn, "--json"]) == 0
    added = json.loads(capsys.readouterr().out)
    assert added["key"] == "model" and added["format"] == "stream"
    assert isinstance(added["audit_seq"], int)
    pol = tmp_path / "policy.toml"
    pol.write_text(sgx_policy(b"\x7e" * 32, '["sha256:' + "00" * 32 + '"]'))
    assert main(["broker", "policy", "set", "model", str(pol), *conn, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["key"] == "model" and doc["profiles"] == 1 and doc["audit_seq"] > added["audit_seq"]
    # the broker refuses a second key of that name: the error object on stderr, nothing on stdout
    rc = main(["broker", "key", "add", "model", *conn, "--json"])
    cap = capsys.readouterr()
    err = json.loads(cap.err.strip().splitlines()[-1])
    assert rc == EXIT_ERROR and cap.out == ""
    assert err["ok"] is False and err["type"] == "KeyExistsError" and err["exit_code"] == 1
    assert err["details"]["status"] == 409 and err["hint"] == "--replace rotates an existing key"
