"""Attacks on the key-row locks of ``set_policy``, ``delete_key`` and ``put_key`` (02e3c72): a
second admin, a second replica, a KEK rotation and releases running beside them."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from shieldml.broker.server.app import Settings, create_app, protocol_hash
from shieldml.broker.server.storage import Store
from shieldml.testing.simulated import SimulatedPlatform
from tests.broker.conftest import MRENCLAVE
from tests.conftest import sgx_policy
from tests.threads import at_once


def _policy(n: int) -> str:
    return sgx_policy(MRENCLAVE, f'["sha256:{n:064x}"]')


def test_rotating_the_kek_beside_admins_and_releases_deadlocks_nothing(stores):
    """`broker rotate-kek` (another process: it locks every key row, then every policy row)
    while admins set policies, remove and re-add keys, replace keys, and releases consume
    nonces and read keys: every call returns, none with a deadlock or a 500."""
    server, rotator = stores(), stores()
    names = [f"k{i}" for i in range(6)]
    for n in names:
        server.put_key(n, "stream", b"k" * 32)
        server.set_policy(n, _policy(0))
    nonces = [server.new_nonce(timedelta(minutes=5))[0] for _ in range(6)]

    def churn(n: str) -> Callable[[], object]:
        def go() -> None:
            for i in range(4):
                server.set_policy(n, _policy(i))
                server.put_key(n, "stream", bytes([i]) * 32, replace=True)
            server.delete_key(n)
            server.put_key(n, "stream", b"z" * 32)

        return go

    def release(nonce: bytes) -> Callable[[], object]:
        return lambda: server.key_entries(names, consume=nonce)

    calls: list[Callable[[], object]] = [rotator.rotate_kek]
    calls += [churn(n) for n in names]
    calls += [release(x) for x in nonces]
    calls += [server.list_keys, lambda: server.audit("probe", {"n": 1})]
    results = at_once(calls)
    assert not [r for r in results if isinstance(r, BaseException)], results
    # a key being removed and added again when the rotation read the rows is not among them
    # (its new row waits for the rotation, then is wrapped under the new KEK)
    assert isinstance(results[0], int) and 0 < results[0] <= len(names)
    fresh = stores()  # a restart: every key opens under a KEK that is on disk
    assert [fresh.get_key(n) for n in names] == [("stream", b"z" * 32)] * len(names)


def test_two_admins_replacing_one_new_key_at_once_both_succeed(stores):
    """put_key --replace of a name nobody has yet, by several admins at once: the losers of
    the insert race retry as an update, none is told the key already exists."""
    a, b = stores(), stores()
    results = at_once(
        [lambda i=i: (a if i % 2 else b).put_key("n", "stream", bytes([i]) * 32, replace=True)
         for i in range(8)]
    )  # fmt: skip
    assert results == [None] * 8, results
    fmt, key = a.get_key("n") or ("", b"")
    assert fmt == "stream" and key in {bytes([i]) * 32 for i in range(8)}


def test_a_running_broker_writing_after_another_process_rotated_the_kek_leaves_rows_a_restart_reads(
    stores,
):
    """docs/broker.md: 'a key-encryption key rotated by one process is picked up by the others
    on their next use'. Writing is a use: what the running broker adds after the rotation must
    be readable by a broker started afterwards."""
    server = stores()
    server.put_key("old", "stream", b"o" * 32)
    assert stores().rotate_kek() == 1  # `shieldml broker rotate-kek` beside the server
    server.put_key("late", "stream", b"l" * 32)  # an admin adds a key through the server
    server.set_policy("old", _policy(1))
    restarted = stores()
    assert restarted.get_key("late") == ("stream", b"l" * 32)
    assert restarted.get_policy("old") == _policy(1)


def _replica(url: str, state: Path, sim: SimulatedPlatform, token: str | None) -> tuple:
    store = Store(url, state)
    if token is None:
        token = store.init_admin_token()
    assert token is not None
    client = TestClient(create_app(store, Settings(trust=sim.trust())))
    return store, client, {"Authorization": f"Bearer {token}"}, token


def test_two_replicas_setting_one_policy_log_last_the_policy_left_in_force(
    db_url: str, tmp_path: Path, sim: SimulatedPlatform, monkeypatch: pytest.MonkeyPatch
):
    """Admin A's set commits first, then admin B's (the row lock makes them take turns), but
    A's replica is slower to append the audit record than B's. The log must still end with the
    policy that is in force: releases are judged against it (check_policy_history)."""
    state = tmp_path / "state"
    store_a, client_a, auth, token = _replica(db_url, state, sim, None)
    store_b, client_b, _, _ = _replica(db_url, state, sim, token)
    assert client_a.post("/v1/admin/keys", json={"name": "m"}, headers=auth).status_code == 201
    a_committed, b_done = threading.Event(), threading.Event()
    real_set, real_audit = store_a.set_policy, store_a.audit

    def slow_set(name: str, toml: str, **kw: Any) -> int | None:
        seq = real_set(name, toml, **kw)  # the fixed store appends the record in here
        a_committed.set()
        return seq

    def slow_audit(event: str, data: dict[str, Any]) -> int:
        if event == "policy_set":
            b_done.wait(3)  # a fixed store may keep B waiting meanwhile: then A goes on
        return real_audit(event, data)

    monkeypatch.setattr(store_a, "set_policy", slow_set)
    monkeypatch.setattr(store_a, "audit", slow_audit)
    codes: dict[str, int] = {}

    def admin_a() -> None:
        r = client_a.put("/v1/admin/keys/m/policy", json={"toml": _policy(1)}, headers=auth)
        codes["a"] = r.status_code

    def admin_b() -> None:
        assert a_committed.wait(10)
        r = client_b.put("/v1/admin/keys/m/policy", json={"toml": _policy(2)}, headers=auth)
        codes["b"] = r.status_code
        b_done.set()

    threads = [threading.Thread(target=admin_a), threading.Thread(target=admin_b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    try:
        assert codes == {"a": 200, "b": 200}
        in_force = store_b.get_policy("m")
        assert in_force is not None
        logged = [
            r.data["sha256"]
            for r in store_b.audit_records(0, 1000)
            if r.event == "policy_set" and r.data.get("name") == "m"
        ]
        assert len(logged) == 2
        assert logged[-1] == protocol_hash(in_force.encode())
    finally:
        client_a.close()
        client_b.close()
        store_a.engine.dispose()
        store_b.engine.dispose()


def test_a_rotation_that_stopped_after_its_commit_is_finished_not_thrown_away(stores):
    """rotate-kek commits the re-wrapped rows, then swaps kek.new in. Stopped in between (a
    crash, Ctrl-C), kek.new is the only file of the KEK the rows are wrapped under. The next
    rotation began by deleting it; stopped in its turn before its commit, it left every key
    wrapped under a KEK no file holds. It now swaps the committed kek.new in first."""
    from shieldml.broker.server.storage import Kek

    s = stores()
    s.put_key("k", "stream", b"k" * 32)
    state = s.state_dir
    real_replace = Path.replace

    def crash_before_swap(self: Path, target: Any) -> Path:
        if self.name == "kek.new":
            raise KeyboardInterrupt  # after the commit, before the swap
        return real_replace(self, target)

    def crash_in_transaction(self: Kek, *a: Any) -> bytes:
        raise KeyboardInterrupt  # re-wrapping: before the commit

    with pytest.MonkeyPatch.context() as m:
        m.setattr(Path, "replace", crash_before_swap)
        with pytest.raises(KeyboardInterrupt):
            s.rotate_kek()
    assert (state / "kek.new").exists()
    with pytest.MonkeyPatch.context() as m:
        m.setattr(Kek, "wrap", crash_in_transaction)
        with pytest.raises(KeyboardInterrupt):
            stores().rotate_kek()
    assert stores().get_key("k") == ("stream", b"k" * 32)
    assert stores().rotate_kek() == 1
    assert not (state / "kek.new").exists()
    assert stores().get_key("k") == ("stream", b"k" * 32)
