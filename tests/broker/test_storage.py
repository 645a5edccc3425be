"""Storage: KEK rotation, wrapped keys, and audit-chain tamper detection on both databases."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from shieldml.broker.audit import AuditProof, verify_chain
from shieldml.broker.server.storage import Store, audit_t, keys_t
from shieldml.errors import AuditChainError, BrokerError, IntegrityError, KeyFileError
from tests.pg import PgCluster
from tests.threads import at_once


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    url = (
        f"sqlite:///{tmp_path}/s.db"
        if request.param == "sqlite"
        else request.getfixturevalue("pg_url")
    )
    s = Store(url, tmp_path / "state")
    yield s
    s.engine.dispose()


def test_keys_are_wrapped_and_rotation_rewraps(store: Store):
    store.put_key("a", "stream", b"A" * 32)
    store.put_key("b", "gramine-pf", b"B" * 16)
    with store.engine.connect() as c:
        raw = {r.name: r.wrapped for r in c.execute(sa.select(keys_t))}
    assert b"A" * 32 not in raw["a"] and b"B" * 16 not in raw["b"]
    old = (store.state_dir / "kek").read_bytes()
    assert store.rotate_kek() == 2
    assert (store.state_dir / "kek").read_bytes() != old and not (
        store.state_dir / "kek.new"
    ).exists()
    assert store.get_key("a") == ("stream", b"A" * 32) and store.get_key("b") == (
        "gramine-pf",
        b"B" * 16,
    )
    again = Store(store.url, store.state_dir)  # a restarted broker reads them with the new KEK
    assert again.get_key("a") == ("stream", b"A" * 32)
    again.engine.dispose()


def test_tampered_wrapped_key_is_detected(store: Store):
    store.put_key("a", "stream", b"A" * 32)
    with store.tx() as c:
        w = bytearray(c.execute(sa.select(keys_t.c.wrapped)).scalar_one())
        w[20] ^= 1
        c.execute(keys_t.update().values(wrapped=bytes(w)))
    with pytest.raises(IntegrityError):
        store.get_key("a")


def test_nonce_single_use_and_expiry(store: Store):
    nonce, _ = store.new_nonce(timedelta(seconds=60))
    assert store.consume_nonce(nonce) and not store.consume_nonce(nonce)
    stale, _ = store.new_nonce(timedelta(seconds=-1))
    assert not store.consume_nonce(stale)


def _chain(store: Store) -> tuple[bool, str]:
    try:
        verify_chain(store.audit_records(), store.audit_head())
    except AuditChainError as e:
        return False, e.message
    return True, ""


def test_audit_chain_detects_edit_delete_reorder(store: Store):
    for i in range(5):
        store.audit("release", {"allowed": i % 2 == 0, "i": i})
    assert _chain(store)[0]
    with store.tx() as c:  # edit
        c.execute(
            audit_t.update()
            .where(audit_t.c.seq == 3)
            .values(data=json.dumps({"allowed": False, "i": 2}))
        )
    ok, why = _chain(store)
    assert not ok and "record 3 was modified" in why


def test_audit_chain_detects_deletion_and_reordering(store: Store):
    for i in range(5):
        store.audit("release", {"i": i})
    records = store.audit_records()
    with pytest.raises(AuditChainError, match="missing"):
        verify_chain(records[:2] + records[3:], store.audit_head())
    swapped = [records[0], records[2], records[1], *records[3:]]
    with pytest.raises(AuditChainError):
        verify_chain(swapped)
    with pytest.raises(AuditChainError, match="removed"):  # the newest record removed
        verify_chain(records[:-1], store.audit_head())


def test_database_outage_is_a_503(tmp_path: Path, pg_cluster: PgCluster, pg_url: str):
    """While PostgreSQL is down, requests get 503 with Retry-After; afterwards they work again."""
    import time

    from fastapi.testclient import TestClient

    from shieldml.broker.server.app import create_app

    store = Store(pg_url, tmp_path / "state")
    client = TestClient(create_app(store))
    assert client.post("/v1/challenge").status_code == 200
    pg_cluster.halt()
    try:
        r = client.post("/v1/challenge")
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
    finally:
        pg_cluster.resume()
    deadline = time.monotonic() + 10  # clients retry after a 503; the broker reconnects
    while client.post("/v1/challenge").status_code != 200:
        assert time.monotonic() < deadline, (
            "the broker did not recover after the database came back"
        )
        time.sleep(0.2)
    store.engine.dispose()


def test_kek_rotation_while_another_replica_serves(tmp_path: Path, pg_url: str):
    a = Store(pg_url, tmp_path / "state")
    b = Store(pg_url, tmp_path / "state")  # a second replica, KEK already loaded
    a.put_key("k", "stream", b"K" * 32)
    assert b.get_key("k") == ("stream", b"K" * 32)
    a.rotate_kek()
    assert b.get_key("k") == ("stream", b"K" * 32)  # picks up the new KEK by itself
    a.engine.dispose()
    b.engine.dispose()


def test_nonce_expiry_uses_the_database_clock(
    tmp_path: Path, pg_url: str, monkeypatch: pytest.MonkeyPatch
):
    """Replicas with skewed clocks agree on nonce expiry: PostgreSQL's clock decides."""
    from datetime import UTC, datetime

    from shieldml.broker.server import storage

    store = Store(pg_url, tmp_path / "state")
    fresh, _ = store.new_nonce(timedelta(seconds=60))
    expired, _ = store.new_nonce(timedelta(seconds=-1))
    monkeypatch.setattr(
        storage, "_now", lambda: datetime.now(UTC) + timedelta(hours=2)
    )  # clock ahead
    assert store.consume_nonce(fresh)
    monkeypatch.setattr(
        storage, "_now", lambda: datetime.now(UTC) - timedelta(hours=2)
    )  # clock behind
    assert not store.consume_nonce(expired)
    store.engine.dispose()


def test_a_key_whose_kek_file_is_gone_is_a_key_file_error(tmp_path: Path):
    s = Store(f"sqlite:///{tmp_path}/s.db", tmp_path / "state")
    s.put_key("a", "stream", b"A" * 32)
    s.engine.dispose()
    (tmp_path / "state" / "kek").write_bytes(b"\x01" * 32)  # another KEK: the old one is lost
    again = Store(f"sqlite:///{tmp_path}/s.db", tmp_path / "state")
    with pytest.raises(KeyFileError, match="'a' is wrapped under an unknown key-encryption key"):
        again.get_key("a")
    again.engine.dispose()


@pytest.mark.parametrize("name", ["", "a b", "a/b", "x" * 129])
def test_an_invalid_key_name_is_answered_400(tmp_path: Path, name: str):
    s = Store(f"sqlite:///{tmp_path}/s.db", tmp_path / "state")
    with pytest.raises(BrokerError, match="invalid key name") as e:
        s.put_key(name, "stream", b"A" * 32)
    assert e.value.status == 400 and str(e.value.detail).startswith("invalid key name")
    assert s.list_keys() == []
    s.engine.dispose()


def _queued(store: Store, calls: list[Callable[[], object]]) -> list[object]:
    """Run ``calls`` in threads while the test holds the group-commit leader lock, so they all
    queue; then let them go: one leader appends them all. Returns each call's result (or the
    exception it raised)."""
    results: list[object] = [None] * len(calls)

    def run(i: int) -> None:
        try:
            results[i] = calls[i]()
        except Exception as e:  # handed back to the test
            results[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    with store._leader:
        for th in threads:
            th.start()
        deadline = time.monotonic() + 30
        while len(store._queue) < len(calls) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(store._queue) == len(calls)
    for th in threads:
        th.join()
    return results


def test_appends_that_arrive_together_share_one_transaction(store: Store):
    """Group commit: records and challenges queued while another append runs go into one
    transaction, each with its own sequence number, proof and checkpoint."""
    commits: list[int] = []
    sa.event.listen(store.engine, "commit", lambda _c: commits.append(1))
    ttl = timedelta(seconds=60)
    calls: list[Callable[[], object]] = []
    for i in range(12):
        if i % 3 == 0:
            calls.append(lambda: store.new_nonce(ttl, audit=("challenge", {})))
        else:
            calls.append(lambda i=i: store.audit_entry("test", {"i": i}))
    results = _queued(store, calls)
    assert len(commits) == 1
    key = [store.log_signer.verifier]
    proofs = [r for r in results if isinstance(r, AuditProof)]
    assert len(proofs) == 8 and all(p.verify(key).size == p.seq for p in proofs)
    records = store.audit_records()
    assert [r.seq for r in records] == list(range(1, 13))
    verify_chain(records, store.audit_head())
    challenges = {
        r.data["nonce_sha256"]: r.data["expires_at"] for r in records if r.event == "challenge"
    }
    for nonce, expires in (r for r in results if isinstance(r, tuple)):
        assert challenges[hashlib.sha256(nonce).hexdigest()] == expires.isoformat()
        assert store.consume_nonce(nonce)  # stored in the same transaction


def test_a_failed_group_commit_fails_every_append_in_it_and_writes_none(
    store: Store, monkeypatch: pytest.MonkeyPatch
):
    store.audit("before", {})
    real = store._append_many

    def fail_after_writing(c: sa.Connection, batch: list[Any]) -> None:
        real(c, batch)  # every row written inside the transaction, then it fails
        raise sa.exc.OperationalError("COMMIT", {}, Exception("connection lost"))

    monkeypatch.setattr(store, "_append_many", fail_after_writing)
    results = _queued(store, [lambda i=i: store.audit("test", {"i": i}) for i in range(5)])
    assert all(isinstance(r, sa.exc.OperationalError) for r in results)
    monkeypatch.setattr(store, "_append_many", real)
    assert [r.event for r in store.audit_records()] == ["before"]  # none of the five
    assert store.audit("after", {}) == 2  # the log goes on from where it was
    verify_chain(store.audit_records(), store.audit_head())


def test_key_entries_consume_the_nonce_once_and_read_nothing_for_a_dead_one(store: Store):
    """The release reads its keys in the transaction that consumes its nonce: a nonce used
    before (a replay) consumes nothing and reads no key row."""
    store.put_key("model", "stream", bytes(32))
    nonce, _ = store.new_nonce(timedelta(seconds=60))
    consumed, entries = store.key_entries(["model", "nope"], consume=nonce)
    assert consumed and entries["nope"] is None
    got = entries["model"]
    assert not isinstance(got, Exception) and got is not None and got.unwrap() == bytes(32)
    assert store.key_entries(["model"], consume=nonce) == (False, {})  # replayed
    assert not store.consume_nonce(nonce)


def test_two_admins_setting_one_keys_policy_at_once_both_succeed_and_one_wins(store: Store):
    """set_policy replaces a key's policy (delete, then insert): two at once on PostgreSQL both
    deleted nothing and the second insert failed with a unique violation (a 500 to that admin).
    The key's row is locked first, so they take turns; the policy left is one of theirs, whole
    and with its MAC."""
    import threading

    store.put_key("m", "stream", b"k" * 32)
    texts = [f'version = 1\n# admin {i}\n[[profile]]\ntee = "sgx"\n' for i in range(8)]
    go = threading.Barrier(len(texts))
    errors: list[BaseException] = []

    def admin(toml: str) -> None:
        go.wait()
        try:
            for _ in range(5):
                store.set_policy("m", toml)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=admin, args=(t,)) for t in texts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    assert store.get_policy("m") in texts  # its MAC checked
    assert [p["name"] for p in store.list_policies()] == ["m"]


def test_a_key_removed_while_its_policy_is_set_leaves_no_policy_for_a_later_key(store: Store):
    """`key rm` racing `policy set` of the same key: the removal deleted the policy before the
    setter inserted its own, then the key, leaving a policy without a key; a new key of that
    name later was released under the old key's policy. Each locks the key's row first."""
    toml = 'version = 1\n[[profile]]\ntee = "sgx"\n'
    for _round in range(6):
        store.put_key("m", "stream", b"k" * 32)
        store.set_policy("m", toml)
        results = at_once(
            [lambda: store.delete_key("m")] + [lambda: store.set_policy("m", toml)] * 3
        )
        assert results[0] == (True, None)
        for r in results[1:]:  # before the removal, or refused after it as an unknown key
            assert r is None or (isinstance(r, BrokerError) and r.status == 404), r
        assert store.list_policies() == []
        store.put_key("m", "stream", b"k" * 32)
        assert store.get_policy("m") is None  # the new key starts without a policy
        store.delete_key("m")


def test_two_admins_adding_one_new_key_at_once_one_adds_it_the_other_is_told_it_exists(
    store: Store,
):
    """Both saw no key of that name; the second insert was a unique violation (a 500)."""
    from shieldml.errors import KeyExistsError

    results = at_once([lambda: store.put_key("n", "stream", b"k" * 32)] * 6)
    assert results.count(None) == 1
    assert all(isinstance(r, KeyExistsError) for r in results if r is not None), results
    assert store.get_key("n") == ("stream", b"k" * 32)


def test_a_database_naming_a_kek_no_file_holds_gets_no_write(store: Store):
    """A database writer points kek_id at a KEK this broker has no file of: keys and policies
    are not written at all (under ours they would be unreadable wherever the row is believed)."""
    from shieldml.broker.server.storage import KEK_ROW, meta_t

    store.put_key("m", "stream", b"k" * 32)
    with store.engine.begin() as c:
        c.execute(meta_t.update().where(meta_t.c.k == KEK_ROW).values(v="0" * 32))
    with pytest.raises(KeyFileError, match=r"names key-encryption key 0{32}, which neither"):
        store.put_key("n", "stream", b"n" * 32)
    with pytest.raises(KeyFileError):
        store.set_policy("m", 'version = 1\n[[profile]]\ntee = "sgx"\n')
    assert store.get_key("n") is None and store.get_policy("m") is None
