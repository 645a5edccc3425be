"""The byte-level test vectors of docs/protocol.md."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import x25519

from shieldml.broker import protocol, tlog
from shieldml.broker.audit import GENESIS, record_hash, record_leaf
from shieldml.errors import FormatError, IntegrityError

DOC = (Path(__file__).resolve().parents[2] / "docs" / "protocol.md").read_text()


def vector(label: str) -> str:
    row = next(line for line in DOC.splitlines() if line.startswith(f"| {label}"))
    return re.findall(r"`([^`]*)`", row)[-1]


def test_binding_vector():
    sk = x25519.X25519PrivateKey.from_private_bytes(b"\x11" * 32)
    pk = sk.public_key().public_bytes_raw()
    assert pk.hex() == vector("X25519 public key")
    wd = "sha256:" + hashlib.sha256(b"shieldml example workload").hexdigest()
    assert wd == vector("workload digest")
    assert hashlib.sha512(bytes.fromhex(vector("binding preimage"))).hexdigest() == vector(
        "REPORTDATA"
    )
    assert protocol.report_data(bytes(range(32)), protocol.KEM_X25519, pk, wd).hex() == vector(
        "REPORTDATA"
    )


def test_sealed_vector_opens():
    sk = x25519.X25519PrivateKey.from_private_bytes(b"\x11" * 32)
    rk = protocol.RunnerKey(protocol.KEM_X25519, sk, sk.public_key().public_bytes_raw())
    assert rk.open("model", bytes.fromhex(vector("sealed key"))) == bytes(range(32))
    with pytest.raises(IntegrityError):  # bound to the key name
        rk.open("data", bytes.fromhex(vector("sealed key")))


def test_audit_vector():
    row = next(line for line in DOC.splitlines() if line.startswith("| audit record 1"))
    data = re.findall(r"`([^`]*)`", row)[2]
    assert record_hash(GENESIS, 1, "2026-01-01T00:00:00.000000Z", "challenge", data) == vector(
        "audit record 1"
    )


def test_audit_tree_and_checkpoint_vectors():
    row = next(line for line in DOC.splitlines() if line.startswith("| audit record 1:"))
    data = re.findall(r"`([^`]*)`", row)[2]
    leaf = record_leaf(1, "2026-01-01T00:00:00.000000Z", "challenge", data)
    assert leaf.hex() == vector("audit record 1 (above) as leaf 0")
    signer = tlog.NoteSigner("example.com/broker", bytes(range(32)))
    assert signer.verifier.vkey() == vector("checkpoint of that tree")
    note = signer.sign(tlog.Checkpoint("example.com/broker", 1, tlog.tree_hash([leaf])).body())
    assert note == vector("the same checkpoint").replace("\\n", "\n")


@pytest.mark.parametrize("kem", ["X25519", "MLKEM768-X25519"])
def test_seal_roundtrip_and_binding_differs_per_kem(kem: str):
    rk = protocol.RunnerKey.generate(kem)
    assert rk.open("k", protocol.seal(rk.kem_id, rk.public_bytes, "k", b"secret")) == b"secret"
    wd = "sha256:" + "00" * 32
    a = protocol.report_data(bytes(32), rk.kem_id, rk.public_bytes, wd)
    b = protocol.report_data(bytes(32), rk.kem_id, rk.public_bytes, "sha256:" + "01" * 32)
    assert a != b and len(a) == 64


@pytest.mark.parametrize("bad", ["sha256:00", "md5:" + "00" * 32, "sha256:" + "zz" * 32, ""])
def test_bad_workload_digest(bad: str):
    with pytest.raises(FormatError):
        protocol.report_data(bytes(32), protocol.KEM_X25519, bytes(32), bad)


def test_a_release_denial_is_a_broker_error_and_a_policy_denial():
    """Callers that treat every policy refusal alike catch PolicyDenied; the message leads with
    the failing checks, nothing cut."""
    from shieldml.broker.client import _error
    from shieldml.errors import BrokerError, PolicyDenied, ReleaseDenied

    check = {"name": "mrenclave", "passed": False, "expected": "aa" * 32, "actual": "bb" * 32}
    detail = {
        "reason": "policy denied",
        "verdicts": {"model": {"allowed": False, "profiles": [{"profile": 1, "checks": [check]}]}},
        "audit_seq": 7,
    }
    e = _error(403, detail, "/v1/release")
    assert isinstance(e, ReleaseDenied) and isinstance(e, BrokerError)
    assert isinstance(e, PolicyDenied) and e.status == 403
    assert e.diagnostics().splitlines() == [
        "the broker's policy denied the release of 'model'",
        f"  key 'model': profile 1: mrenclave: expected {'aa' * 32}, found {'bb' * 32}",
    ]


def test_a_not_genuine_answer_is_read_by_its_parts():
    """The broker's answer names the failed check: the message says it in one line, no JSON
    dump with escaped newlines; an older broker's answer (reasons only) reads as worded."""
    from shieldml.broker.client import _error
    from shieldml.errors import AttestationError, NotGenuineError

    reason = "trust root: untrusted\n  expected: a pinned intel root\n  found:    X\n  hint: fix it"
    named = {
        "reason": "evidence is not genuine",
        "reasons": [reason],
        "check": "trust root",
        "message": "trust root: untrusted",
        "expected": "a pinned intel root",
        "found": "X",
        "hint": "fix it",
        "checks": [{"name": "quote format", "passed": True, "detail": "DCAP quote v3, SGX"}],
        "audit_seq": 4,
    }
    e = _error(403, named, "/v1/release")
    assert isinstance(e, NotGenuineError) and isinstance(e, AttestationError)
    assert (e.check, e.expected, e.found, e.hint) == (
        "trust root",
        "a pinned intel root",
        "X",
        "fix it",
    )
    assert e.reported_checks == named["checks"]
    assert e.diagnostics().splitlines() == [
        "the broker found the evidence not genuine: trust root: untrusted",
        "  expected: a pinned intel root",
        "  found:    X",
        "  hint: fix it",
    ]
    old = _error(
        403,
        {"reason": "evidence is not genuine", "reasons": [reason], "audit_seq": 4},
        "/v1/release",
    )
    assert isinstance(old, NotGenuineError) and old.check == "evidence"
    assert "{" not in old.diagnostics() and "\\n" not in old.diagnostics()
    assert old.diagnostics().splitlines()[:3] == [
        "the broker found the evidence not genuine",
        "  trust root: untrusted",
        "    expected: a pinned intel root",
    ]


def test_a_broker_reason_is_a_sentence():
    from shieldml.broker.client import _error
    from shieldml.errors import BindingError, UnknownKeyError

    e = _error(404, {"reason": "unknown key x", "audit_seq": 9}, "/v1/release")
    assert isinstance(e, UnknownKeyError)
    assert e.message == "broker answered 404: unknown key x (audit record 9)"
    detail = {
        "reason": "report data does not bind",
        "expected": "aa",
        "found": "bb",
        "audit_seq": 2,
    }
    b = _error(403, detail, "/v1/release")
    assert isinstance(b, BindingError) and (b.expected, b.found) == ("aa", "bb")
    assert b.diagnostics().splitlines()[1:] == ["  expected: aa", "  found:    bb"]
