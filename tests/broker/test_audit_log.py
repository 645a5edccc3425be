"""The audit log as a transparency log, against someone who can write the broker's database.

The attacker here rewrites rows (records, the chain head, the tree state) and restarts the broker;
they cannot read the state directory's ``log-signing-key``. The owner saves signed checkpoints
(``shieldml audit checkpoint``) and checks the log (``shieldml audit verify``).
"""

from __future__ import annotations

import base64
import json
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from shieldml.broker import protocol, tlog
from shieldml.broker.audit import AuditProof, record_hash, record_leaf, verify_tree
from shieldml.broker.client import BrokerClient
from shieldml.broker.server.storage import Store
from shieldml.cli import main
from shieldml.errors import AuditChainError, BrokerError
from shieldml.testing.brokers import BrokerProcess, start_broker
from shieldml.testing.simulated import SimulatedPlatform
from tests.broker.conftest import MRENCLAVE, POLICY, WD, Broker, release_request


def conn(bp: BrokerProcess) -> list[str]:
    return ["--url", bp.url, "--fingerprint", bp.fingerprint, "--token-file", str(bp.token_file)]


def challenges(bp: BrokerProcess, n: int) -> None:
    """``n`` audit records (each challenge writes one)."""
    with BrokerClient(bp.url, fingerprint=bp.fingerprint) as c:
        for _ in range(n):
            c.challenge()


def verify(bp: BrokerProcess, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    capsys.readouterr()
    rc = main(["audit", "verify", *conn(bp), *args, "--json"])
    return rc, json.loads(capsys.readouterr().out)["reason"]


def db(bp: BrokerProcess) -> sqlite3.Connection:
    return sqlite3.connect(bp.token_file.parent / "broker.db", isolation_level=None)


def rewrite_record(bp: BrokerProcess, seq: int, data: dict[str, object]) -> None:
    """What a database writer does to change record ``seq``: new content, the chain recomputed
    from there, the head moved, every leaf hash recomputed (where the schema has them)."""
    c = db(bp)
    cols = {r[1] for r in c.execute("PRAGMA table_info(audit)")}
    c.execute("UPDATE audit SET data = ? WHERE seq = ?", (json.dumps(data, sort_keys=True, separators=(",", ":")), seq))  # fmt: skip
    rows = c.execute("SELECT seq, at, event, data, prev_hash FROM audit ORDER BY seq").fetchall()
    prev = c.execute("SELECT hash FROM audit WHERE seq = ?", (seq - 1,)).fetchone()[0] if seq > 1 else "0" * 64  # fmt: skip
    for s, at, event, text, _ in rows[seq - 1 :]:
        h = record_hash(prev, s, at, event, text)
        c.execute("UPDATE audit SET prev_hash = ?, hash = ? WHERE seq = ?", (prev, h, s))
        if "leaf" in cols:
            leaf = record_leaf(s, at, event, text).hex()
            c.execute("UPDATE audit SET leaf = ? WHERE seq = ?", (leaf, s))
        prev = h
    tail = c.execute("SELECT v FROM meta WHERE k = 'audit_head'").fetchone()[0].partition("|")[2]
    c.execute(
        "UPDATE meta SET v = ? WHERE k = 'audit_head'", (f"{rows[-1][0]}:{prev}" + _tail(tail),)
    )
    c.close()


def _tail(state: str) -> str:
    """The tree state the head row carries after the chain head (none before the tree)."""
    return f"|{state}" if state else ""


def truncate(bp: BrokerProcess, keep: int) -> None:
    """Delete the records after ``keep`` and point the head at record ``keep``."""
    c = db(bp)
    c.execute("DELETE FROM audit WHERE seq > ?", (keep,))
    h = c.execute("SELECT hash FROM audit WHERE seq = ?", (keep,)).fetchone()[0]
    tail = c.execute("SELECT v FROM meta WHERE k = 'audit_head'").fetchone()[0].partition("|")[2]
    c.execute("UPDATE meta SET v = ? WHERE k = 'audit_head'", (f"{keep}:{h}" + _tail(tail),))
    c.close()


def meta_rows(bp: BrokerProcess) -> dict[str, str]:
    c = db(bp)
    rows = dict(c.execute("SELECT k, v FROM meta WHERE k LIKE 'audit_%'").fetchall())
    c.close()
    return rows


def restore_meta(bp: BrokerProcess, rows: dict[str, str]) -> None:
    c = db(bp)
    for k, v in rows.items():
        c.execute("UPDATE meta SET v = ? WHERE k = ?", (v, k))
    c.close()


def test_deleting_the_last_records_and_rewinding_the_head_is_detected(
    served: BrokerProcess, sim_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    challenges(served, 4)
    snapshot = meta_rows(served)  # the attacker keeps the rows of a state that was signed
    challenges(served, 2)
    saved = tmp_path / "published.checkpoint"  # the owner saves the checkpoint of 6
    assert verify(served, capsys, "--checkpoint", str(saved))[0] == 0

    # 1: records 5 and 6 deleted, the head rewound: the tree state (bound to the head by a MAC
    # under the log's key) no longer belongs to it, and the broker signs nothing
    truncate(served, 4)
    rc, reason = verify(served, capsys)
    assert rc == 1 and "not written by this log's key holder" in reason

    # 2: the tree's state rewound too (to the signed state of 4 kept earlier), the broker
    # restarted and serving on: the log agrees with itself, but not with what was published
    restore_meta(served, snapshot)
    served.stop()
    bp = start_broker(served.token_file.parent, "--simulated-platform", str(sim_dir))
    try:
        assert verify(bp, capsys)[0] == 0  # no saved checkpoint: nothing to compare with
        rc, reason = verify(bp, capsys, "--checkpoint", str(saved))
        assert rc == 1 and "rewound" in reason
        challenges(bp, 3)  # the log grows past the published size again, on another branch
        rc, reason = verify(bp, capsys, "--checkpoint", str(saved))
        assert rc == 1 and "consistency proof fails" in reason
    finally:
        bp.stop()


def test_rewriting_a_record_after_the_last_checkpoint_is_detected(
    served: BrokerProcess, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    saved = tmp_path / "audit.checkpoint"
    challenges(served, 3)
    assert verify(served, capsys, "--checkpoint", str(saved))[0] == 0  # remembers 3 records
    challenges(served, 3)
    rewrite_record(served, 5, {"nonce_sha256": "00" * 32, "expires_at": "2000-01-01T00:00:00"})
    rc, reason = verify(served, capsys, "--checkpoint", str(saved))
    assert rc == 1 and "rewritten" in reason


def test_forged_checkpoint_signed_with_another_key_is_refused(
    served: BrokerProcess, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    challenges(served, 3)
    saved = tmp_path / "audit.checkpoint"
    assert verify(served, capsys, "--checkpoint", str(saved))[0] == 0
    vkey = tlog.NoteSigner.load_or_create(served.token_file.parent / "log-signing-key")
    vkey_text = vkey.verifier.vkey()
    challenges(served, 2)
    # the attacker signs a tree with record 2 rewritten, with a key of their own under the log's
    # name, and hands it to the owner as the checkpoint to compare with
    c = db(served)
    leaves = [bytes.fromhex(r[0]) for r in c.execute("SELECT leaf FROM audit ORDER BY seq")]
    c.close()
    leaves[1] = tlog.leaf_hash(b"a rewritten record 2")
    forger = tlog.NoteSigner(vkey.name, bytes(range(32)))
    tree = tlog.Frontier.of(leaves)
    forged = tmp_path / "forged.checkpoint"
    forged.write_text(forger.sign(tlog.Checkpoint(vkey.name, tree.size, tree.root()).body()))
    rc, reason = verify(served, capsys, "--log-key", vkey_text, "--checkpoint", str(forged))
    assert rc == 1 and "forged" in reason
    # and writes the rewritten tree's frontier into the head row: without the key file its MAC
    # is wrong, so the broker signs no checkpoint for it and appends nothing to it
    c = db(served)
    head, _, state = (
        c.execute("SELECT v FROM meta WHERE k = 'audit_head'").fetchone()[0].partition("|")
    )
    doc = {"frontier": [h.hex() for h in tree.hashes], "mac": json.loads(state)["mac"]}
    c.execute("UPDATE meta SET v = ? WHERE k = 'audit_head'", (f"{head}|{json.dumps(doc)}",))
    c.close()
    rc, reason = verify(served, capsys, "--log-key", vkey_text, "--checkpoint", str(saved))
    assert rc == 1 and "not written by this log's key holder" in reason
    base = ["audit", "checkpoint", "--url", served.url, "--fingerprint", served.fingerprint]
    assert main(base) != 0
    with (
        BrokerClient(served.url, fingerprint=served.fingerprint) as cl,
        pytest.raises(BrokerError),
    ):
        cl.challenge()


def test_release_answer_inclusion_proof_verifies_against_its_checkpoint(
    broker: Broker, sim: SimulatedPlatform
):
    b = broker
    b.client.post("/v1/admin/keys", json={"name": "model"}, headers=b.admin())
    b.client.put("/v1/admin/keys/model/policy", json={"toml": POLICY}, headers=b.admin())
    body, _rk = release_request(b, sim, ["model"])
    answer = b.client.post("/v1/release", json=body).json()
    proof = AuditProof.from_dict(answer["audit_log"])
    vkey = b.client.get("/v1/audit/checkpoint").json()["verifier_key"]
    assert vkey == b.store.log_signer.verifier.vkey()
    cp = proof.verify([tlog.NoteVerifier.parse(vkey)])
    assert proof.seq == answer["audit_seq"] == cp.size and proof.event == "release"
    assert proof.data["allowed"] is True and proof.data["keys"] == ["model"]
    # the release's checkpoint stays a prefix of every later one (consistency proof)
    for _ in range(5):
        b.client.post("/v1/challenge")
    latest = tlog.open_checkpoint(
        b.client.get("/v1/audit/checkpoint").json()["checkpoint"], [tlog.NoteVerifier.parse(vkey)]
    )
    doc = b.client.get(
        "/v1/admin/audit/consistency",
        params={"first": cp.size, "second": latest.size},
        headers=b.admin(),
    ).json()
    tlog.verify_consistency(
        cp.size, latest.size, cp.root, latest.root, [base64.b64decode(h) for h in doc["proof"]]
    )
    # an inclusion proof edited on its way is refused
    bad = dict(answer["audit_log"], record={**answer["audit_log"]["record"], "event": "x"})
    with pytest.raises(AuditChainError):
        AuditProof.from_dict(bad).verify([tlog.NoteVerifier.parse(vkey)])


@pytest.mark.parametrize("db_kind", ["sqlite", "postgresql"])
def test_replicas_appending_at_once_keep_one_tree(
    db_kind: str, tmp_path: Path, request: pytest.FixtureRequest
):
    url = (
        f"sqlite:///{tmp_path}/broker.db"
        if db_kind == "sqlite"
        else request.getfixturevalue("pg_url")
    )
    replicas = [Store(url, tmp_path / "state") for _ in range(3)]
    proofs: list[AuditProof] = []
    lock = threading.Lock()

    def work(store: Store, t: int) -> None:
        for i in range(20):
            p = store.audit_entry("test", {"thread": t, "i": i})
            with lock:
                proofs.append(p)

    threads = [threading.Thread(target=work, args=(replicas[t % 3], t)) for t in range(6)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    key = [replicas[0].log_signer.verifier]
    assert sorted(p.seq for p in proofs) == list(range(1, 121))  # no index twice, none lost
    for p in proofs:
        assert p.verify(key).size == p.seq
    tree = verify_tree(replicas[0].audit_records(limit=1000), replicas[1].audit_checkpoint(), key)
    assert tree.records == tree.checkpoint.size == 120
    for s in replicas:
        s.engine.dispose()


def test_a_log_from_before_the_tree_is_migrated_and_a_removed_tree_state_is_refused(
    tmp_path: Path,
):
    url = f"sqlite:///{tmp_path}/broker.db"
    store = Store(url, tmp_path / "state")
    for i in range(5):
        store.audit("test", {"i": i})
    store.engine.dispose()
    c = sqlite3.connect(tmp_path / "broker.db", isolation_level=None)
    c.execute("UPDATE meta SET v = substr(v, 1, instr(v, '|') - 1) WHERE k = 'audit_head'")
    # with leaf hashes present, the tree state was removed: a restart does not rebuild it
    with pytest.raises(AuditChainError, match="missing"):
        Store(url, tmp_path / "state")
    # a log written before the tree (no leaf column): its records become the first leaves
    c.execute("ALTER TABLE audit DROP COLUMN leaf")
    c.close()
    store = Store(url, tmp_path / "state")
    store.audit("test", {"i": 5})
    key = [store.log_signer.verifier]
    tree = verify_tree(store.audit_records(), store.audit_checkpoint(), key)
    assert tree.records == tree.checkpoint.size == 6
    store.engine.dispose()


def test_audit_checkpoint_prints_and_saves_the_signed_checkpoint(
    served: BrokerProcess, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    challenges(served, 2)
    vkey = tlog.NoteSigner.load_or_create(served.token_file.parent / "log-signing-key")
    capsys.readouterr()
    assert main(["broker", "log-key", "--state", str(served.token_file.parent)]) == 0
    assert capsys.readouterr().out.strip() == vkey.verifier.vkey()
    base = ["audit", "checkpoint", "--url", served.url, "--fingerprint", served.fingerprint]
    assert main([*base, "--log-key", vkey.verifier.vkey(), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["size"] == 2 and doc["key_pinned"] is True
    assert main(base) == 0
    note = capsys.readouterr().out
    assert tlog.open_checkpoint(note, [vkey.verifier]).size == 2 == note.count("\n") - 3
    out = tmp_path / "cp"
    assert main([*base, "-o", str(out)]) == 0
    assert out.read_text() == note


class Relay(httpx.BaseTransport):
    """The network between runner and a real broker app, editing release answers with ``edit``."""

    def __init__(self, b: Broker, edit: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
        self.b, self.edit = b, edit

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        r = self.b.client.request(
            request.method, request.url.path, content=request.content, headers=request.headers
        )
        doc = r.json()
        if request.url.path == "/v1/release" and r.status_code == 200:
            doc = self.edit(doc)
        return httpx.Response(r.status_code, json=doc)


def _client_release(b: Broker, sim: SimulatedPlatform, client: BrokerClient) -> Any:
    nonce = client.challenge()
    rk = protocol.RunnerKey.generate()
    rd = protocol.report_data(nonce, rk.kem_id, rk.public_bytes, WD)
    quote, col = sim.sgx_quote(report_data=rd, mrenclave=MRENCLAVE)
    return client.release(nonce, rk, WD, ["model"], quote, collateral=json.loads(col.to_json()))


def test_release_answer_carrying_another_releases_audit_proof_is_refused(
    broker: Broker, sim: SimulatedPlatform
):
    b = broker
    b.client.post("/v1/admin/keys", json={"name": "model"}, headers=b.admin())
    b.client.put("/v1/admin/keys/model/policy", json={"toml": POLICY}, headers=b.admin())
    key = b.store.log_signer.verifier
    kept: list[dict[str, Any]] = []

    def keep(doc: dict[str, Any]) -> dict[str, Any]:
        kept.append(doc["audit_log"])
        return doc

    with BrokerClient("http://broker.test", transport=Relay(b, keep), log_key=key) as c:
        got = _client_release(b, sim, c)
    assert got.audit_proof is not None and got.audit_proof.seq == got.audit_seq
    # an earlier release's (valid, signed) proof in place of this one's: not this release
    with (
        BrokerClient(
            "http://broker.test", transport=Relay(b, lambda d: {**d, "audit_log": kept[0]})
        ) as c,
        pytest.raises(AuditChainError, match="not this release's"),
    ):
        _client_release(b, sim, c)
    # no proof at all, from a client that pinned the log key
    with (
        BrokerClient(
            "http://broker.test",
            transport=Relay(b, lambda d: {k: v for k, v in d.items() if k != "audit_log"}),
            log_key=key,
        ) as c,
        pytest.raises(AuditChainError, match="no audit proof"),
    ):
        _client_release(b, sim, c)
