"""Attacks on the ``kek_id`` meta row (f53aae2) and on admin changes appended in their own
transaction (5cab157): concurrent rotations, a database writer editing the row, the group
commit beside ``_append_in``, and a rollback after an append."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from shieldml.broker import tlog
from shieldml.broker.audit import AuditRecord, verify_chain
from shieldml.broker.server.storage import KEK_ROW, Kek, Store, keys_t, meta_t
from shieldml.errors import KeyFileError
from tests.broker.conftest import MRENCLAVE
from tests.conftest import sgx_policy
from tests.threads import at_once

SECRET = b"k" * 32


def _policy(n: int) -> str:
    return sgx_policy(MRENCLAVE, f'["sha256:{n:064x}"]')


def _set_kek_row(s: Store, value: str | None) -> None:
    """The database writer: the kek_id row set to ``value`` (None: removed)."""
    with s.engine.begin() as c:
        if value is None:
            c.execute(meta_t.delete().where(meta_t.c.k == KEK_ROW))
        else:
            c.execute(meta_t.update().where(meta_t.c.k == KEK_ROW).values(v=value))


def _records(s: Store) -> list[AuditRecord]:
    return s.audit_records(0, 100_000)


def _result(call: Callable[[], object]) -> object:
    try:
        return call()
    except BaseException as e:
        return e


def _crash_before_swap(m: pytest.MonkeyPatch) -> None:
    """rotate_kek stopped after its commit, before kek.new is swapped in as kek."""
    real_replace = Path.replace

    def replace(self: Path, target: Any) -> Path:
        if self.name == "kek.new":
            raise KeyboardInterrupt
        return real_replace(self, target)

    m.setattr(Path, "replace", replace)


# -- rotations ------------------------------------------------------------------------------------
def test_a_second_rotate_kek_started_during_one_in_flight_deletes_its_new_kek(stores):
    """PostgreSQL: the second rotation looked at kek.new, deleted and remade it before taking
    the kek_id lock (SQLite's BEGIN IMMEDIATE happened to make it wait), so the first swapped
    the second's file in and every key was under a KEK no file held. One rotation at a time."""
    first, second = stores(), stores()
    first.put_key("k", "stream", SECRET)
    new_path = first.state_dir / "kek.new"
    real = first._admin_token_hash
    seen: dict[str, bytes] = {}

    def wait_for_the_second(c: sa.Connection) -> str | None:
        # inside the first rotation's transaction, the kek_id row locked
        seen["mine"] = new_path.read_bytes()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                if new_path.read_bytes() != seen["mine"]:
                    break
            except FileNotFoundError:
                pass
            time.sleep(0.01)
        return real(c)

    first._admin_token_hash = wait_for_the_second  # type: ignore[method-assign]
    out: list[object] = []
    t = threading.Thread(target=lambda: out.append(_result(first.rotate_kek)), daemon=True)
    t.start()
    deadline = time.monotonic() + 10
    while "mine" not in seen and time.monotonic() < deadline:
        time.sleep(0.01)
    assert "mine" in seen, "the first rotation never reached its transaction"
    second_out = at_once([second.rotate_kek])  # waits for the first's lock, after its unlink
    t.join(30)
    assert not t.is_alive()
    del second_out
    assert stores().get_key("k") == ("stream", SECRET)


@pytest.mark.parametrize("tamper", ["removed", "names_the_old_kek"])
def test_editing_the_kek_row_while_a_rotation_awaits_its_swap_makes_the_next_one_delete_the_kek(
    stores, tamper: str
):
    s = stores()
    s.put_key("k", "stream", SECRET)
    old_id = s.kek.id
    with pytest.MonkeyPatch.context() as m:
        _crash_before_swap(m)
        with pytest.raises(KeyboardInterrupt):
            s.rotate_kek()
    assert (s.state_dir / "kek.new").exists()
    _set_kek_row(s, None if tamper == "removed" else old_id)

    def crash_in_transaction(self: Kek, *a: Any) -> bytes:
        raise KeyboardInterrupt  # the next rotation stops before its commit

    with pytest.MonkeyPatch.context() as m:
        m.setattr(Kek, "wrap", crash_in_transaction)
        with pytest.raises(KeyboardInterrupt):
            stores().rotate_kek()
    assert stores().get_key("k") == ("stream", SECRET)


def test_a_db_writer_naming_a_retired_kek_makes_a_running_broker_wrap_new_keys_under_it(stores):
    server, cli = stores(), stores()
    server.put_key("old", "stream", SECRET)
    stolen = Kek((server.state_dir / "kek").read_bytes())  # the KEK rotated out for this reason
    cli.rotate_kek()  # `shieldml broker rotate-kek` beside the running server
    assert server.get_key("old") == ("stream", SECRET)  # the server loads the new KEK
    _set_kek_row(server, stolen.id)
    try:
        server.put_key("new", "stream", b"s" * 32)
    except KeyFileError:
        return  # refused: what should happen
    with server.engine.connect() as c:
        r = c.execute(sa.select(keys_t).where(keys_t.c.name == "new")).one()
    assert r.kek_id != stolen.id, "a new key was wrapped under the retired KEK"


def test_removing_the_kek_row_makes_a_running_broker_wrap_under_its_stale_kek(stores):
    server, cli = stores(), stores()
    cli.rotate_kek()
    _set_kek_row(server, None)
    try:
        server.put_key("new", "stream", SECRET)
    except KeyFileError:
        return
    assert stores().get_key("new") == ("stream", SECRET)


def test_a_write_whose_kek_reload_straddles_the_rotators_swap_is_not_refused(stores):
    server, cli = stores(), stores()
    server.put_key("k", "stream", SECRET)
    with pytest.MonkeyPatch.context() as m:
        _crash_before_swap(m)
        with pytest.raises(KeyboardInterrupt):
            cli.rotate_kek()  # committed; the swap comes "now"
    state = server.state_dir
    real_load = Kek.load_or_create
    swapped: list[bool] = []

    def load(path: Path) -> Kek:
        k = real_load(path)
        if path.name == "kek" and not swapped:
            swapped.append(True)
            (state / "kek.new").replace(state / "kek")  # the rotator's swap lands here
        return k

    with pytest.MonkeyPatch.context() as m:
        m.setattr(Kek, "load_or_create", load)
        server.set_policy("k", _policy(1))
    assert stores().get_policy("k") == _policy(1)


def test_writes_in_another_process_during_a_rotation_leave_every_row_readable_after_restart(
    stores,
):
    """put_key, set_policy (with its record) and the admin-token writes beside rotate_kek in
    another process: all wait for the rotation or precede it, and a restart verifies every MAC."""
    server, cli = stores(), stores()
    server.init_admin_token("t0")
    for i in range(4):
        server.put_key(f"k{i}", "stream", SECRET)

    def writes(i: int) -> Callable[[], object]:
        def go() -> None:
            for j in range(3):
                server.put_key(f"n{i}-{j}", "stream", SECRET)
                server.set_policy(f"k{i}", _policy(j), audit={"name": f"k{i}", "j": j})
                server.rotate_admin_token(f"t{i}{j}")

        return go

    results = at_once([cli.rotate_kek, *(writes(i) for i in range(4))])
    bad = [r for r in results if isinstance(r, BaseException)]
    assert bad == [] or all(isinstance(r, KeyFileError) for r in bad), bad
    fresh = stores()
    for row in fresh.list_keys():
        assert fresh.get_key(row["name"]) == ("stream", SECRET)
    fresh.list_policies()
    assert fresh.has_admin_token()
    verify_chain(_records(fresh), fresh.audit_head())


# -- _append_in beside the group commit -------------------------------------------------------
def test_a_set_policy_rolled_back_after_its_append_moves_neither_seen_size_nor_the_head(stores):
    s = stores()
    s.put_key("k", "stream", SECRET)
    s.audit("e", {})
    before, head = s._seen_size, s.audit_head()
    real = s._append_in

    def append_then_fail(c: sa.Connection, event: str, data: dict[str, Any]) -> Any:
        real(c, event, data)
        raise KeyboardInterrupt  # after the append, before the commit

    s._append_in = append_then_fail  # type: ignore[method-assign]
    with pytest.raises(KeyboardInterrupt):
        s.set_policy("k", _policy(1), audit={"name": "k"})
    del s._append_in
    assert (s._seen_size, s.audit_head()) == (before, head)
    assert s.get_policy("k") is None
    assert s.set_policy("k", _policy(2), audit={"name": "k"}) == head.seq + 1
    verify_chain(_records(s), s.audit_head())


def test_group_commits_and_in_transaction_appends_in_one_process_keep_one_tree(stores):
    """Leaders of the group commit, set_policy/delete_policy/delete_key appending in their own
    transactions, releases consuming nonces and list_keys, in one process and a replica: one
    chain, every checkpoint handed out consistent with the last, _seen_size the head."""
    a, b = stores(), stores()
    for i in range(6):
        a.put_key(f"k{i}", "stream", SECRET)
    nonces = [a.new_nonce(timedelta(minutes=5))[0] for _ in range(6)]
    proofs: list[Any] = []

    def admin(s: Store, i: int) -> Callable[[], object]:
        def go() -> None:
            for j in range(3):
                s.set_policy(f"k{i}", _policy(j), audit={"name": f"k{i}", "j": j})
            s.delete_policy(f"k{i}", audit=True)
            s.delete_key(f"k{i}", audit=True)

        return go

    def appends(s: Store, i: int) -> Callable[[], object]:
        def go() -> None:
            for j in range(4):
                proofs.append(s.audit_entry("e", {"i": i, "j": j}))
                s.new_nonce(timedelta(minutes=5), audit=("challenge", {}))

        return go

    def release(n: bytes) -> Callable[[], object]:
        return lambda: (a.key_entries(["k0", "k1"], consume=n), a.list_keys())

    calls = [admin(a if i % 2 else b, i) for i in range(6)]
    calls += [appends(a, i) for i in range(4)] + [appends(b, 9)]
    calls += [release(n) for n in nonces]
    results = at_once(calls)
    assert [r for r in results if isinstance(r, BaseException)] == []
    records = _records(a)
    verify_chain(records, a.audit_head())
    assert [r.seq for r in records] == list(range(1, len(records) + 1))
    size = a.audit_head().seq
    assert a._seen_size <= size  # the last appends may be b's, which a has not read yet
    verifier = [a.log_signer.verifier]
    last = tlog.open_checkpoint(a.audit_checkpoint(), verifier)
    assert a._seen_size == size == last.size  # reading the head raised it
    for p in proofs:
        cp = p.verify(verifier)
        if cp.size < last.size:
            tlog.verify_consistency(
                cp.size, last.size, cp.root, last.root, a.audit_consistency(cp.size, last.size)
            )
    a.audit("after", {})  # no false rewind alarm in either process
    b.audit("after", {})
