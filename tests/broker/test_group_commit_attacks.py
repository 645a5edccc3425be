"""Attacks on a5a1ba0: the group-committed audit appends, the certificate/CRL caches by exact bytes
and OwnFloor (the broker's own collateral number remembered for 10 s).

Each test is named after the move. Batches are forced deterministically: the test holds
``Store._leader`` while the calls queue (as ``tests/broker/test_storage.py::_queued``), then lets
them go, so one leader commits them all. Tests that showed a real bug (fixed since) were ``xfail(strict=True)``
with the mechanism in their reason.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import sqlalchemy as sa
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from shieldml.attest import TcbInfo, _certs
from shieldml.broker import tlog
from shieldml.broker.audit import AuditProof, verify_chain
from shieldml.broker.server import release as rel
from shieldml.broker.server.storage import Store, audit_t, meta_t, nonces_t
from shieldml.errors import AuditChainError, CollateralError
from shieldml.testing.simulated import SimulatedPlatform

TTL = timedelta(seconds=60)


# -- helpers ------------------------------------------------------------------------------------
@pytest.fixture
def store(db_url: str, tmp_path: Path) -> Iterator[Store]:
    s = Store(db_url, tmp_path / "state")
    yield s
    s.engine.dispose()


def _wait_for(cond: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 15
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def _batched(
    stores: list[Store],
    calls: list[Callable[[], object]],
    queued: int | None = None,
    armed: Callable[[], None] | None = None,
) -> list[object]:
    """Run ``calls`` in threads while the test holds every store's ``_leader``; once ``queued``
    items (default: all) wait in the stores' queues, ``armed()`` runs and the leaders go. Every
    result or exception (BaseException too) comes back; a thread still alive after 15 s is a
    hang and fails the test."""
    results: list[object] = [None] * len(calls)

    def run(i: int) -> None:
        try:
            results[i] = calls[i]()
        except BaseException as e:
            results[i] = e

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(calls))]
    want = len(calls) if queued is None else queued
    for s in stores:
        s._leader.acquire()
    try:
        for th in threads:
            th.start()
        _wait_for(lambda: sum(len(s._queue) for s in stores) >= want, f"{want} queued appends")
        if armed is not None:
            armed()
    finally:
        for s in stores:
            s._leader.release()
    for th in threads:
        th.join(15)
    hung = [i for i, th in enumerate(threads) if th.is_alive()]
    assert not hung, f"callers {hung} are hung"
    return results


def _records(store: Store) -> list[Any]:
    return store.audit_records(limit=100000)


def _nonce_rows(store: Store) -> int:
    with store.engine.connect() as c:
        return int(c.execute(sa.select(sa.func.count()).select_from(nonces_t)).scalar_one())


# -- group commit: no record lost, duplicated or handed to the wrong caller -----------------------
def test_many_threads_appending_at_once_lose_and_duplicate_no_record(store: Store):
    """Free-running threads (no forced batches) mixing records, proofs and challenges: every
    caller's own data comes back in its own record, sequence numbers are 1..N without gaps or
    repeats, the chain verifies and every proof verifies against its own signed checkpoint."""
    threads, per = 6, 12
    results: dict[tuple[int, int], object] = {}
    start = threading.Barrier(threads)

    def worker(t: int) -> None:
        start.wait()
        for j in range(per):
            k = j % 3
            if k == 0:
                results[t, j] = store.audit("a", {"t": t, "j": j})
            elif k == 1:
                results[t, j] = store.audit_entry("e", {"t": t, "j": j})
            else:
                results[t, j] = store.new_nonce(TTL, audit=("challenge", {"t": t, "j": j}))

    ths = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
    for th in ths:
        th.start()
    for th in ths:
        th.join(30)
    assert len(results) == threads * per
    records = _records(store)
    assert [r.seq for r in records] == list(range(1, threads * per + 1))
    verify_chain(records, store.audit_head())
    by_seq = {r.seq: r for r in records}
    verifier = [store.log_signer.verifier]
    nonce_hashes = {r.data.get("nonce_sha256") for r in records if r.event == "challenge"}
    for (t, j), res in results.items():
        if isinstance(res, int):
            assert by_seq[res].data == {"t": t, "j": j}
        elif isinstance(res, AuditProof):
            assert res.data == {"t": t, "j": j} and by_seq[res.seq].data == res.data
            assert res.verify(verifier).size == res.seq
        else:
            nonce, expires = res  # type: ignore[misc]
            assert hashlib.sha256(nonce).hexdigest() in nonce_hashes
            assert expires > datetime.now(UTC)
            assert store.consume_nonce(nonce) and not store.consume_nonce(nonce)
    assert len(nonce_hashes) == threads * per // 3  # one record per challenge, none twice


def test_a_caller_in_a_batch_never_gets_another_callers_record_proof_or_nonce(store: Store):
    calls: list[Callable[[], object]] = []
    for i in range(10):
        if i % 2:
            calls.append(lambda i=i: store.audit_entry("e", {"i": i}))
        else:
            calls.append(lambda i=i: store.new_nonce(TTL, audit=("challenge", {"i": i})))
    results = _batched([store], calls)
    verifier = [store.log_signer.verifier]
    records = {r.seq: r for r in _records(store)}
    assert sorted(records) == list(range(1, 11))
    for i, res in enumerate(results):
        if i % 2:
            assert isinstance(res, AuditProof)
            assert res.data == {"i": i} == records[res.seq].data
            cp = res.verify(verifier)
            assert cp.size == res.seq  # the checkpoint of the tree the record ends, not the batch's
        else:
            nonce, expires = res  # type: ignore[misc]
            own = [r for r in records.values() if r.data.get("i") == i]
            assert len(own) == 1
            assert own[0].data["nonce_sha256"] == hashlib.sha256(nonce).hexdigest()
            assert own[0].data["expires_at"] == expires.isoformat()


def test_a_callers_unserializable_data_fails_only_that_caller(store: Store):
    calls: list[Callable[[], object]] = [
        lambda i=i: store.audit_entry("e", {"i": i}) for i in range(4)
    ]
    calls.insert(2, lambda: store.audit("e", {"x": object()}))
    results = _batched([store], calls, queued=4)
    assert isinstance(results[2], TypeError)
    good = [r for i, r in enumerate(results) if i != 2]
    assert all(isinstance(r, AuditProof) for r in good)
    assert len(_records(store)) == 4


def test_a_caller_mutating_its_data_after_the_call_does_not_change_its_record(store: Store):
    data: dict[str, Any] = {"k": "v"}
    proof = store.audit_entry("e", data)
    data["k"] = "changed"
    assert proof.data == {"k": "v"} == _records(store)[0].data


def test_one_callers_overlong_event_fails_only_that_caller(tmp_path: Path, pg_url: str):
    store = Store(pg_url, tmp_path / "state")
    try:
        calls: list[Callable[[], object]] = [
            lambda i=i: store.audit("e", {"i": i}) for i in range(4)
        ]
        with pytest.raises(ValueError, match="audit event"):  # refused before it is queued
            store.audit("x" * 33, {})
        results = _batched([store], calls)
        assert all(isinstance(r, int) for r in results), results
    finally:
        store.engine.dispose()


# -- failures: nothing half-written, nobody hung ----------------------------------------------------
def test_a_failed_batch_leaves_no_nonce_without_its_audit_record(
    store: Store, monkeypatch: pytest.MonkeyPatch
):
    real = store._append_many

    def fail_after_writing(c: sa.Connection, batch: list[Any]) -> None:
        real(c, batch)  # nonce rows and records written, then the transaction fails
        raise sa.exc.OperationalError("COMMIT", {}, Exception("connection lost"))

    monkeypatch.setattr(store, "_append_many", fail_after_writing)
    results = _batched(
        [store],
        [lambda: store.new_nonce(TTL, audit=("challenge", {})) for _ in range(4)]
        + [lambda: store.audit("e", {})],
    )
    assert all(isinstance(r, sa.exc.OperationalError) for r in results)
    assert _nonce_rows(store) == 0 and _records(store) == []
    monkeypatch.setattr(store, "_append_many", real)
    nonce, _ = store.new_nonce(TTL, audit=("challenge", {}))
    assert store.consume_nonce(nonce) and [r.seq for r in _records(store)] == [1]


def test_a_leader_interrupted_inside_its_transaction_leaves_no_follower_hung(
    store: Store, monkeypatch: pytest.MonkeyPatch
):
    real = store._append_many

    def interrupted(c: sa.Connection, batch: list[Any]) -> None:
        real(c, batch)
        raise KeyboardInterrupt

    monkeypatch.setattr(store, "_append_many", interrupted)
    results = _batched([store], [lambda i=i: store.audit("e", {"i": i}) for i in range(5)])
    assert all(isinstance(r, BaseException) for r in results)  # every caller told, none hung
    monkeypatch.setattr(store, "_append_many", real)
    assert _records(store) == []
    assert store.audit("after", {}) == 1


def test_a_leaders_keyboard_interrupt_is_not_raised_in_the_followers_threads(
    store: Store, monkeypatch: pytest.MonkeyPatch
):
    def interrupted(c: sa.Connection, batch: list[Any]) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(store, "_append_many", interrupted)
    results = _batched([store], [lambda i=i: store.audit("e", {"i": i}) for i in range(5)])
    interrupts = [r for r in results if isinstance(r, KeyboardInterrupt)]
    assert len(interrupts) <= 1, f"{len(interrupts)} threads got the leader's KeyboardInterrupt"
    assert len({id(r) for r in results}) == len(results)  # no exception instance shared


class _InterruptAfterSwap:
    """Stands in for ``_queue_lock``: once armed, the next release (the leader's, right after
    it took the queue) raises KeyboardInterrupt, before its ``try``: the batch is orphaned."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.armed = False

    def __enter__(self) -> None:
        self._lock.acquire()

    def __exit__(self, *exc: object) -> None:
        self._lock.release()
        if self.armed:
            self.armed = False
            raise KeyboardInterrupt


def test_a_leader_interrupted_after_taking_the_queue_fails_its_followers_closed(store: Store):
    """Orphaned items (taken off the queue, never marked done) are not committed: their callers
    each get an error (an empty batch or the result assertion), none hangs, none gets a record,
    proof or nonce that is not in the database."""
    lock = _InterruptAfterSwap()
    store._queue_lock = lock  # type: ignore[assignment]
    calls: list[Callable[[], object]] = [
        lambda i=i: store.audit_entry("e", {"i": i}) for i in range(3)
    ] + [lambda: store.new_nonce(TTL, audit=("challenge", {})) for _ in range(2)]
    results = _batched([store], calls, armed=lambda: setattr(lock, "armed", True))
    records = _records(store)
    for r in results:
        if isinstance(r, AuditProof):
            assert any(x.seq == r.seq and x.data == r.data for x in records)
        elif isinstance(r, tuple):
            assert store.consume_nonce(r[0])
        else:
            assert isinstance(r, BaseException)
    assert store.audit("after", {}) == len(records) + 1
    verify_chain(_records(store), store.audit_head())


# -- locks: no deadlock with tx() and its SQLite lock -----------------------------------------------
def test_writes_outside_the_log_go_on_while_a_batch_waits_for_its_leader(store: Store):
    """tx() (SQLite: self._lock) never needs _leader: put_key, set_policy and consume_nonce
    finish while the leader lock is held and appends are queued; then the batch commits."""
    nonce, _ = store.new_nonce(TTL)
    done: list[object] = []

    def meanwhile() -> None:
        store.put_key("k", "stream", b"K" * 32)
        store.set_policy("k", "x = 1\n")
        done.append(store.consume_nonce(nonce))

    results = _batched(
        [store],
        [lambda i=i: store.audit("e", {"i": i}) for i in range(3)],
        armed=meanwhile,
    )
    assert done == [True]
    assert sorted(results) == [1, 2, 3]  # type: ignore[type-var]


def test_appends_and_other_transactions_interleaved_from_many_threads_do_not_deadlock(
    store: Store,
):
    for t in range(6):  # one key per thread: concurrent set_policy of one key is another matter
        store.put_key(f"k{t}", "stream", b"K" * 32)
    errors: list[BaseException] = []

    def mixed(t: int) -> None:
        try:
            for j in range(8):
                nonce, _ = store.new_nonce(TTL, audit=("challenge", {}))
                store.audit("e", {"t": t, "j": j})
                assert store.consume_nonce(nonce)
                store.set_policy(f"k{t}", f"v = {j}\n")
        except BaseException as e:
            errors.append(e)

    ths = [threading.Thread(target=mixed, args=(t,), daemon=True) for t in range(6)]
    for th in ths:
        th.start()
    for th in ths:
        th.join(30)
    assert not any(th.is_alive() for th in ths), "deadlock"
    assert errors == []
    verify_chain(_records(store), store.audit_head())


# -- replicas: several Stores, one database, one tree -----------------------------------------------
def test_two_replicas_batching_at_once_keep_one_tree(db_url: str, tmp_path: Path):
    a = Store(db_url, tmp_path / "state")
    b = Store(db_url, tmp_path / "state")  # same key files, as replicas of one broker
    try:
        calls: list[Callable[[], object]] = []
        for i in range(12):
            s = a if i % 2 else b
            calls.append(lambda s=s, i=i: s.audit_entry("e", {"i": i}))
        results = _batched([a, b], calls)
        assert all(isinstance(r, AuditProof) for r in results)
        proofs: list[AuditProof] = results  # type: ignore[assignment]
        records = _records(a)
        assert [r.seq for r in records] == list(range(1, 13))
        verify_chain(records, a.audit_head())
        verifier = [a.log_signer.verifier]
        cps = {p.seq: p.verify(verifier) for p in proofs}
        for p in proofs:
            assert {**records[p.seq - 1].data} == p.data
        for m in cps:  # every pair of checkpoints handed out is consistent: no fork
            for n in cps:
                if m < n:
                    proof = a.audit_consistency(m, n)
                    tlog.verify_consistency(m, n, cps[m].root, cps[n].root, proof)
    finally:
        a.engine.dispose()
        b.engine.dispose()


def test_a_db_writer_rewinding_the_last_batch_is_refused(store: Store):
    store.audit("before", {})
    with store.engine.connect() as c:
        saved = c.execute(sa.select(meta_t.c.v).where(meta_t.c.k == "audit_head")).scalar_one()
    proofs = _batched(
        [store], [lambda i=i: store.audit_entry("release", {"i": i}) for i in range(4)]
    )
    assert all(isinstance(p, AuditProof) for p in proofs)
    # the database writer (no key files): the older head row back, the batch's records gone
    with store.engine.begin() as c:
        c.execute(meta_t.update().where(meta_t.c.k == "audit_head").values(v=saved))
        c.execute(audit_t.delete().where(audit_t.c.seq > 1))
    with pytest.raises(AuditChainError, match="rewound"):
        store.audit_entry("after", {})


# -- the certificate and CRL caches -----------------------------------------------------------------
def _cert(cn: str) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = datetime.now(UTC)
    return (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1)).not_valid_after(now + timedelta(days=1))
        .sign(key, hashes.SHA256())
    )  # fmt: skip


def _pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def _crl(serials: list[int]) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "crl")])
    now = datetime.now(UTC)
    b = x509.CertificateRevocationListBuilder().issuer_name(name)
    b = b.last_update(now).next_update(now + timedelta(days=1))
    for s in serials:
        b = b.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(s).revocation_date(now).build()
        )
    return b.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def test_a_caller_editing_its_certificate_list_does_not_edit_the_cached_bundle():
    a, b = _cert("a"), _cert("b")
    data = _pem(a, b)
    first = _certs.pem_certificates(data)
    first.clear()
    first.append(_cert("evil"))
    again = _certs.pem_certificates(data)
    assert again == [a, b] and again is not first


def test_a_buffer_edited_after_parsing_is_not_answered_from_the_cache():
    a, b = _cert("a"), _cert("b")
    buf = bytearray(_pem(a))
    assert _certs.pem_certificates(buf) == [a]  # type: ignore[arg-type]
    buf[:] = _pem(b)
    assert _certs.pem_certificates(buf) == [b]  # type: ignore[arg-type]


def test_a_bundle_that_fails_to_parse_is_never_remembered():
    good = _pem(_cert("a"))
    bad = good.replace(b"\n", b"\n!", 3)
    before = _certs._pem_certificates_cached.cache_info().currsize
    for _ in range(2):
        with pytest.raises(ValueError):
            _certs.pem_certificates(bad)
    assert _certs._pem_certificates_cached.cache_info().currsize == before
    bad_crl = _crl([1])[:-5]
    for _ in range(2):
        with pytest.raises(ValueError):
            _certs.der_crl(bad_crl)


def test_a_bundle_with_one_more_certificate_is_not_the_cached_one():
    a, b = _cert("a"), _cert("b")
    assert _certs.pem_certificates(_pem(a)) == [a]
    assert _certs.pem_certificates(_pem(a, b)) == [a, b]
    assert _certs.pem_certificates(_pem(a) + b"\n") == [a]


def test_a_large_bundle_is_parsed_every_time_not_cached():
    big = _pem(*[_cert(f"c{i}") for i in range(2)])
    big += b"#" * (_certs.CACHE_MAX_BYTES + 1 - len(big)) + b"\n"
    before = _certs._pem_certificates_cached.cache_info()
    assert len(_certs.pem_certificates(big)) == 2
    after = _certs._pem_certificates_cached.cache_info()
    assert (after.hits, after.misses) == (before.hits, before.misses)


def test_a_shared_cached_crl_cannot_be_altered_by_one_caller():
    der = _crl([7, 9])
    crl = _certs.der_crl(der)
    assert _certs.der_crl(der) is crl  # shared: it must be immutable
    with pytest.raises((AttributeError, TypeError)):
        crl.next_update_utc = datetime.now(UTC) + timedelta(days=999)  # type: ignore[misc]
    with pytest.raises((AttributeError, TypeError)):
        crl.get_revoked_certificate_by_serial_number = lambda _s: None  # type: ignore[method-assign]
    assert crl.get_revoked_certificate_by_serial_number(7) is not None
    other = _certs.der_crl(_crl([]))
    assert other.get_revoked_certificate_by_serial_number(7) is None


# -- OwnFloor ---------------------------------------------------------------------------------------
KEY = ("SGX", "00906ed50000", "vendor")


def test_the_own_floor_is_read_again_once_its_10_seconds_are_over():
    now = [100.0]
    floor = rel.OwnFloor(clock=lambda: now[0])
    assert floor.ttl == rel.OWN_FLOOR_TTL == 10.0
    assert floor.get(KEY, lambda: 5) == 5
    now[0] = 109.999
    assert floor.get(KEY, lambda: 6) == 5
    now[0] = 110.0
    assert floor.get(KEY, lambda: 6) == 6


def test_a_read_that_fails_is_not_remembered_as_no_floor():
    floor = rel.OwnFloor(clock=lambda: 0.0)

    def broken() -> int | None:
        raise CollateralError("collateral", "cache unreadable")

    with pytest.raises(CollateralError):
        floor.get(KEY, broken)
    assert floor.get(KEY, lambda: 6) == 6


def test_a_slow_stale_read_does_not_put_back_an_older_floor():
    now = [0.0]
    floor = rel.OwnFloor(clock=lambda: now[0])
    slow_started, release_slow = threading.Event(), threading.Event()
    got: list[int | None] = []

    def slow_old() -> int | None:  # reads #5 from the cache, then is slow (disk, CRL signing)
        slow_started.set()
        release_slow.wait(15)
        return 5

    th = threading.Thread(target=lambda: got.append(floor.get(KEY, slow_old)))
    th.start()
    slow_started.wait(15)
    now[0] = 1.0  # the broker's collateral was refreshed to #6; another release reads it
    assert floor.get(KEY, lambda: 6) == 6
    now[0] = 2.0
    release_slow.set()
    th.join(15)
    now[0] = 11.5  # 10.5 s after the broker knew #6
    assert floor.get(KEY, lambda: 6) == 6


def test_a_quote_whose_own_lookup_misses_does_not_lift_the_floor_for_others(
    sim: SimulatedPlatform,
):
    col = sim.collateral("sgx", now=datetime.now(UTC), evaluation_data_number=6)
    info = TcbInfo.from_json(col.tcb_info)
    key = (info.id, info.fmspc.hex(), "vendor")

    def own(quote: bytes) -> Any:  # the broker's cache holds #6 for processor-CA quotes only
        return col if quote == b"processor-ca quote" else None

    settings = rel.Settings(own_collateral=own, monotonic=lambda: 0.0)
    odd = SimpleNamespace(evidence=b"platform-ca quote", tee="sgx")
    honest = SimpleNamespace(evidence=b"processor-ca quote", tee="sgx")
    rel._not_older_than_the_brokers(settings, odd, key, 6)  # type: ignore[arg-type]
    with pytest.raises(CollateralError, match="older than the broker's"):
        rel._not_older_than_the_brokers(settings, honest, key, 5)  # type: ignore[arg-type]
