"""Broker state through SQLAlchemy: SQLite (default, embedded) or PostgreSQL (replicas).

Tables: ``keys`` (wrapped by the key-encryption key), ``policies``, ``nonces`` (single use,
enforced by one conditional UPDATE, so it holds across replicas), ``audit`` (records with their
chain hash and Merkle leaf hash, appended under a row lock on ``meta.audit_head``), ``meta``
(admin token hash, audit head with the tree's state).

The audit tree's state lives in the head row, ``meta.audit_head`` = ``seq:chain hash|{"frontier",
"mac"}``: the frontier (the roots of the perfect subtrees on the tree's right edge, one per set
bit of ``seq``) and an HMAC-SHA256 binding it to the chain's head, under a key derived from the
log's signing key; the row is locked, read and rewritten once per transaction. Appends that
arrive while one is being committed are committed together (group commit: one lock of the head
row and one commit for all of them, each record still with its own sequence number). An append
costs O(log n) hashes and one HMAC whatever the log's size; its inclusion proof is the frontier
before it, and its checkpoint is signed (Ed25519) after the transaction committed, outside the
lock. The signing key is a file in the state
directory (``log-signing-key``), never in the database: a frontier row written by someone who can
write the database but not read the key file fails its MAC and is refused (see docs/broker.md).

Whoever can write the database cannot edit what decides a release: every ``keys`` row, every
``policies`` row and the admin token's hash carry an HMAC-SHA256 under a key derived from the
key-encryption key (which lives in the state directory, not in the database), over the row's
table, key name and every field; it is verified on every read, and a row that fails is an
:class:`~shieldml.errors.IntegrityError` (the release is refused). A MAC binds the row to its key
name, so a policy row copied onto another key fails too. What a MAC cannot stop, putting back an
older row of the same key, shows in the audit log: each release record carries the SHA-256 of the
policy it was decided on, which ``audit verify`` compares with the last ``policy_set`` record.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import json
import os
import re
import secrets
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from shieldml.broker import tlog
from shieldml.broker.audit import (
    GENESIS,
    AuditProof,
    AuditRecord,
    ChainHead,
    canonical_data,
    record_hash,
    record_leaf,
)
from shieldml.errors import (
    AuditChainError,
    BrokerError,
    FormatError,
    IntegrityError,
    KeyExistsError,
    KeyFileError,
    ShieldError,
    UnknownKeyError,
)

md = sa.MetaData()
keys_t = sa.Table(
    "keys",
    md,
    sa.Column("name", sa.String(128), primary_key=True),
    sa.Column("format", sa.String(16), nullable=False),
    sa.Column("kek_id", sa.String(32), nullable=False),
    sa.Column("wrapped", sa.LargeBinary, nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("mac", sa.String(112), nullable=False),
)
policies_t = sa.Table(
    "policies",
    md,
    sa.Column("key_name", sa.String(128), primary_key=True),
    sa.Column("toml", sa.Text, nullable=False),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("mac", sa.String(112), nullable=False),
)
nonces_t = sa.Table(
    "nonces",
    md,
    sa.Column("nonce", sa.String(64), primary_key=True),
    sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False, index=True),
    sa.Column("used", sa.Boolean, nullable=False, default=False),
)
audit_t = sa.Table(
    "audit",
    md,
    sa.Column("seq", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("at", sa.String(32), nullable=False),
    sa.Column("event", sa.String(32), nullable=False),
    sa.Column("data", sa.Text, nullable=False),
    sa.Column("prev_hash", sa.String(64), nullable=False),
    sa.Column("hash", sa.String(64), nullable=False),
    sa.Column("leaf", sa.String(64), nullable=True),  # Merkle leaf hash (hex); NULL only pre-tree
)
meta_t = sa.Table(
    "meta",
    md,
    sa.Column("k", sa.String(64), primary_key=True),
    sa.Column("v", sa.Text, nullable=False),
)
#: meta row naming the KEK rows are written under now (rotate_kek changes it)
KEK_ROW = "kek_id"
_HEAD_FOR_UPDATE = sa.select(meta_t.c.v).where(meta_t.c.k == "audit_head").with_for_update()
_SET_HEAD = meta_t.update().where(meta_t.c.k == "audit_head").values(v=sa.bindparam("v"))
LOG_KEY_FILE = "log-signing-key"
NAME_MAX = 128
#: The one rule for key names, for the HTTP API's models and for the store: ASCII letters, digits,
#: '.', '_', '-', 1 to NAME_MAX characters (no Unicode look-alikes, nothing a log or path mangles).
KEY_NAME_PATTERN = rf"^[A-Za-z0-9._-]{{1,{NAME_MAX}}}$"
_EVENT = re.compile(r"[a-z0-9_]{1,32}", re.ASCII)
_KEY_NAME = re.compile(rf"[A-Za-z0-9._-]{{1,{NAME_MAX}}}", re.ASCII)


def valid_key_name(name: str) -> bool:
    """Whether ``name`` follows :data:`KEY_NAME_PATTERN` (a full match: no trailing newline)."""
    return _KEY_NAME.fullmatch(name) is not None


def _now() -> datetime:
    return datetime.now(UTC)


def _aware(t: datetime) -> datetime:
    """SQLite hands back naive UTC."""
    return t.replace(tzinfo=UTC) if t.tzinfo is None else t


def _utc(t: datetime) -> str:
    """A timestamp as the MAC sees it: UTC, microseconds (SQLite hands back naive UTC)."""
    return (t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)).isoformat()


@dataclass(frozen=True)
class KeyEntry:
    """A key's format and policy, read in one query; its material stays wrapped until
    :meth:`unwrap` (the release core unwraps only after every requested key's policy accepted)."""

    name: str
    format: str
    policy: str | None
    kek: Kek = field(repr=False)
    wrapped: bytes = field(repr=False)

    @property
    def policy_sha256(self) -> str | None:
        """SHA-256 hex of the policy TOML (release records name the policy they applied, as
        ``policy_set`` records name the one set)."""
        return None if self.policy is None else policy_sha256(self.policy)

    def unwrap(self) -> bytes:
        return self.kek.unwrap(self.name, self.format, self.wrapped)


@dataclass
class _Append:
    """One record waiting for :meth:`Store._append_batched`; a challenge's (``nonce``: the nonce
    and its lifetime) gets its ``expires_at`` and nonce hash from the batch's transaction."""

    event: str
    data: dict[str, Any]
    nonce: tuple[bytes, timedelta] | None = None
    text: str | None = None
    expires: datetime | None = None
    result: tuple[AuditRecord, list[bytes], tlog.Frontier] | None = None
    error: BaseException | None = None
    done: bool = False


def _check_event(event: str) -> None:
    """An audit event's name is 1 to 32 of [a-z0-9_] (ValueError otherwise)."""
    if not _EVENT.fullmatch(event):
        raise ValueError(f"an audit event is 1 to 32 of [a-z0-9_], not {event[:40]!r}")


def _read_kek(path: Path) -> Kek | None:
    """The KEK in ``path``, or None if there is no such file (never made here)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    if len(data) != 32:
        raise KeyFileError(f"{path}: a key-encryption key file holds 32 bytes")
    return Kek(data)


class Kek:
    """The key-encryption key file (32 bytes, mode 0600); keys are AES-256-GCM wrapped under it."""

    def __init__(self, key: bytes) -> None:
        self.key = key
        self.id = hashlib.sha256(b"shieldml kek id" + key).hexdigest()[:32]
        self._mac_key = HKDF(
            algorithm=hashes.SHA256(), length=32, salt=None, info=b"shieldml broker row mac v1"
        ).derive(key)

    def mac(self, table: str, *fields: str | bytes) -> str:
        """``<kek id>:<HMAC-SHA256 hex>`` of a row: its table and fields, unambiguously encoded."""
        msg = json.dumps([table, *(f.hex() if isinstance(f, bytes) else f for f in fields)])
        tag = hmac.new(self._mac_key, msg.encode(), hashlib.sha256).hexdigest()
        return f"{self.id}:{tag}"

    @classmethod
    def load_or_create(cls, path: Path) -> Kek:
        if not path.exists():
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(secrets.token_bytes(32))
        data = path.read_bytes()
        if len(data) != 32:
            raise KeyFileError(f"{path}: a key-encryption key file holds 32 bytes")
        return cls(data)

    def wrap(self, name: str, fmt: str, secret: bytes) -> bytes:
        nonce = secrets.token_bytes(12)
        return nonce + AESGCM(self.key).encrypt(nonce, secret, f"{name}\0{fmt}".encode())

    def unwrap(self, name: str, fmt: str, wrapped: bytes) -> bytes:
        try:
            return AESGCM(self.key).decrypt(wrapped[:12], wrapped[12:], f"{name}\0{fmt}".encode())
        except InvalidTag:
            raise IntegrityError(
                f"key {name}", "key store", reason="wrapped key failed authentication"
            ) from None


class Store:
    """All broker state. ``url``: ``sqlite:///path`` or ``postgresql+psycopg://...``."""

    def __init__(self, url: str, state_dir: Path) -> None:
        self.url = url
        self.state_dir = state_dir
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        kwargs: dict[str, Any] = {}
        if url.startswith("sqlite"):
            kwargs["connect_args"] = {"timeout": 30, "check_same_thread": False}
        else:
            kwargs.update(pool_size=16, max_overflow=16, pool_pre_ping=True)
        self.engine = sa.create_engine(url, **kwargs)
        self.sqlite = self.engine.dialect.name == "sqlite"
        if self.sqlite:
            sa.event.listen(self.engine, "connect", _sqlite_pragmas)
            sa.event.listen(
                self.engine, "begin", lambda conn: conn.exec_driver_sql("BEGIN IMMEDIATE")
            )
        self._lock = threading.Lock()  # SQLite writers in one process
        self.log_signer = tlog.NoteSigner.load_or_create(state_dir / LOG_KEY_FILE)
        self._tree_mac = self.log_signer.derive_key(b"shieldml/v1 audit tree state")
        self._seen_size = 0  # the largest committed tree size this process read under the lock
        self._queue: list[_Append] = []  # appends waiting for the next group commit
        self._queue_lock = threading.Lock()
        self._leader = threading.Lock()  # held by the thread committing a batch
        md.create_all(self.engine)
        _check_schema(self.engine)
        self._ensure_head()
        self.keks = self._load_keks()
        self._ensure_kek_row()

    def _ensure_kek_row(self) -> None:
        """The meta row naming the current KEK (what rotate_kek locks): this process's KEK on a
        database that has none yet; another replica may add it at the same moment."""
        with contextlib.suppress(sa.exc.IntegrityError), self.tx() as c:
            if c.execute(sa.select(meta_t.c.k).where(meta_t.c.k == KEK_ROW)).first() is None:
                c.execute(meta_t.insert().values(k=KEK_ROW, v=self.kek.id))

    # -- keys ---------------------------------------------------------------------------------
    def _load_keks(self) -> dict[str, Kek]:
        self.kek, keks = self._disk_keks()
        return keks

    def _disk_keks(self) -> tuple[Kek, dict[str, Kek]]:
        """The KEKs on disk now: ``kek`` (made if missing: a new state directory) and, if there,
        ``kek.new`` (read, never made: a rotation may be renaming it meanwhile)."""
        current = Kek.load_or_create(self.state_dir / "kek")
        found = {current.id: current}
        pending = _read_kek(self.state_dir / "kek.new")
        if pending is not None:
            found[pending.id] = pending
        return current, found

    def _kek(self, kek_id: str, name: str) -> Kek:
        """The KEK a key is wrapped under; after a rotation by another process, reload the files."""
        kek = self.keks.get(kek_id)
        if kek is None:
            self.keks = {**self.keks, **self._load_keks()}
            kek = self.keks.get(kek_id)
        if kek is None:  # its file is gone (kek / kek.new): the key cannot be unwrapped
            raise KeyFileError(
                f"key {name!r} is wrapped under an unknown key-encryption key {kek_id}"
            )
        return kek

    def _verify_mac(self, mac: str | None, what: str, table: str, *fields: str | bytes) -> None:
        """Check a row's MAC (under the KEK it names); an edited row is an IntegrityError."""
        kek_id, _, _tag = (mac or "").partition(":")
        kek = self.keks.get(kek_id)
        if kek is None and kek_id:
            self.keks = {**self.keks, **self._load_keks()}  # rotated by another process
            kek = self.keks.get(kek_id)
        if kek is None or not hmac.compare_digest(kek.mac(table, *fields), mac or ""):
            raise IntegrityError(
                what,
                "broker database",
                reason="row MAC does not verify: the row was written or edited outside the broker"
                if kek is not None or not kek_id
                else f"row MAC is under an unknown key-encryption key {kek_id[:32]!r}",
                hint="restore the database from a backup you trust; `shieldml audit verify` "
                "shows what the broker itself wrote",
            )

    def _key_mac(self, kek: Kek, r: Any) -> str:
        return kek.mac("keys", r.name, r.format, r.kek_id, r.wrapped, _utc(r.created_at))

    def _policy_mac(self, kek: Kek, name: str, toml: str, updated_at: datetime) -> str:
        return kek.mac("policies", name, toml, _utc(updated_at))

    def _check_key_row(self, r: Any) -> None:
        self._kek(r.kek_id, r.name)  # a KEK file that is gone says so
        self._verify_mac(
            r.mac, f"key {r.name!r}", "keys",
            r.name, r.format, r.kek_id, r.wrapped, _utc(r.created_at),
        )  # fmt: skip

    def _check_policy_row(self, name: str, toml: str, updated_at: datetime, mac: str) -> None:
        self._verify_mac(mac, f"policy of key {name!r}", "policies", name, toml, _utc(updated_at))

    @contextmanager
    def tx(self) -> Iterator[sa.Connection]:
        if self.sqlite:
            with self._lock, self.engine.begin() as conn:
                yield conn
        else:
            with self.engine.begin() as conn:
                yield conn

    def put_key(self, name: str, fmt: str, secret: bytes, *, replace: bool = False) -> None:
        _check_name(name)
        for attempt in (1, 2):
            try:
                with self.tx() as c:
                    kek = self._writing_kek(c)  # first: the order every writer locks in
                    key = sa.select(keys_t.c.name).where(keys_t.c.name == name).with_for_update()
                    exists = c.execute(key).first()
                    if exists and not replace:
                        raise KeyExistsError(409, f"key {name!r} already exists")
                    row: dict[str, Any] = {
                        "name": name,
                        "format": fmt,
                        "kek_id": kek.id,
                        "wrapped": kek.wrap(name, fmt, secret),
                        "created_at": _now(),
                    }
                    row["mac"] = kek.mac(
                        "keys", name, fmt, kek.id, row["wrapped"], _utc(row["created_at"])
                    )
                    if exists:
                        c.execute(keys_t.update().where(keys_t.c.name == name).values(**row))
                    else:
                        c.execute(keys_t.insert().values(**row))
                return
            except sa.exc.IntegrityError:
                # another admin inserted that name between our look and our insert: it exists
                # now, so this is a 409, or (--replace) an update of it on the second try
                if not replace or attempt == 2:
                    raise KeyExistsError(409, f"key {name!r} already exists") from None

    def _writing_kek(self, c: sa.Connection) -> Kek:
        """The KEK to wrap and MAC under in this transaction: the one the database names
        (meta row ``kek_id``, read with a shared lock that :meth:`rotate_kek` holds exclusively
        while it re-wraps). A write waits for a rotation in flight and then uses its KEK; one
        that another process made is loaded from its file (``kek.new`` until that process
        swaps it in, then ``kek``). Without the row (a database from before it): ours."""
        q = sa.select(meta_t.c.v).where(meta_t.c.k == KEK_ROW).with_for_update(read=True)
        named = c.execute(q).scalar_one_or_none()
        # Only a KEK whose file is there now: never one this process remembers (a rotated-out
        # KEK may have leaked, and a database writer could name it); twice, for a rotation's
        # rename landing between the reads of kek and kek.new.
        for _attempt in (1, 2):
            current, disk = self._disk_keks()
            # no row: it was removed (Store makes it); the kek file's, not a cached one
            want = current.id if named is None else str(named)
            if want in disk:
                self.keks = {**self.keks, **disk}
                self.kek = disk[want]
                return self.kek
        raise KeyFileError(
            f"the database names key-encryption key {str(named)[:32]}, which neither "
            f"{self.state_dir / 'kek'} nor kek.new holds: nothing is written under another"
        )

    def key_entry(self, name: str) -> KeyEntry | None:
        """The key's format, policy TOML (or None) and wrapped material in one query, or None for
        an unknown key. The KEK is resolved now, so a rotation in between does not strand it."""
        got = self.key_entries([name])[1][name]
        if isinstance(got, ShieldError):
            raise got
        return got

    def key_entries(
        self, names: list[str], *, consume: bytes | None = None
    ) -> tuple[bool, dict[str, KeyEntry | ShieldError | None]]:
        """Each named key's :class:`KeyEntry` (None: no such key; an IntegrityError: its row or
        its policy's failed the MAC, a KeyFileError: its KEK file is gone), read in one query; with ``consume``, that nonce is consumed
        first in the same transaction (as :meth:`consume_nonce`) and nothing is read unless it
        was live: ``(consumed, entries)``. Errors are handed back, not raised, so the release
        decides in its own order (the evidence first)."""
        q = (
            sa.select(
                keys_t,
                policies_t.c.toml,
                policies_t.c.updated_at.label("policy_updated_at"),
                policies_t.c.mac.label("policy_mac"),
            )
            .select_from(keys_t.outerjoin(policies_t, policies_t.c.key_name == keys_t.c.name))
            .where(keys_t.c.name.in_(names))
        )
        with self.tx() if consume is not None else self.engine.connect() as c:
            if consume is not None and c.execute(self._consume(consume)).rowcount != 1:
                return False, {}
            rows = {r.name: r for r in c.execute(q)}
        out: dict[str, KeyEntry | ShieldError | None] = {}
        for name in names:
            r = rows.get(name)
            if r is None:
                out[name] = None
                continue
            try:
                self._check_key_row(r)
                if r.toml is not None:
                    self._check_policy_row(name, r.toml, r.policy_updated_at, r.policy_mac)
                out[name] = KeyEntry(name, r.format, r.toml, self._kek(r.kek_id, name), r.wrapped)
            except (IntegrityError, KeyFileError) as e:
                out[name] = e
        return True, out

    def get_key(self, name: str) -> tuple[str, bytes] | None:
        with self.engine.connect() as c:
            r = c.execute(sa.select(keys_t).where(keys_t.c.name == name)).first()
        if r is None:
            return None
        self._check_key_row(r)
        kek = self._kek(r.kek_id, name)
        return r.format, kek.unwrap(name, r.format, r.wrapped)

    def list_keys(self) -> list[dict[str, Any]]:
        with self.engine.connect() as c:
            rows = c.execute(
                sa.select(
                    keys_t,
                    policies_t.c.toml,
                    policies_t.c.updated_at.label("policy_updated_at"),
                    policies_t.c.mac.label("policy_mac"),
                    policies_t.c.key_name.isnot(None).label("has_policy"),
                )
                .select_from(keys_t.outerjoin(policies_t, policies_t.c.key_name == keys_t.c.name))
                .order_by(keys_t.c.name)
            ).all()
        for r in rows:
            self._check_key_row(r)
            if r.toml is not None:
                self._check_policy_row(r.name, r.toml, r.policy_updated_at, r.policy_mac)
        return [
            {
                "name": r.name,
                "format": r.format,
                "created_at": r.created_at.isoformat(),
                "has_policy": bool(r.has_policy),
            }
            for r in rows
        ]

    def rotate_kek(self) -> int:
        """Re-wrap every key under a fresh KEK; crash-safe (old KEK kept until the swap).

        The database's ``kek_id`` row changes in the same transaction, locked exclusively
        throughout: every process's writes wait for it and then wrap under the new KEK
        (:meth:`_writing_kek`). A rotation that committed but stopped before swapping the file
        in is finished first (its ``kek.new`` is what rows are wrapped or MACed under). One
        rotation at a time per state directory (a file lock)."""
        # one rotation at a time among every process of this state directory: a second one
        # would delete the kek.new the first is re-wrapping under
        with (self.state_dir / "kek.lock").open("a") as lock_file:
            fcntl.flock(lock_file, fcntl.LOCK_EX)
            return self._rotate_kek()

    def _rotate_kek(self) -> int:
        new_path = self.state_dir / "kek.new"
        pending = _read_kek(new_path)
        if pending is not None and self._kek_in_use(pending.id):
            # a rotation that committed and stopped before its swap: its kek.new is what rows
            # are wrapped or MACed under (whatever the kek_id row says): swapped in, not deleted
            new_path.replace(self.state_dir / "kek")
            self.keks = self._load_keks()
        new_path.unlink(missing_ok=True)
        new = Kek.load_or_create(new_path)
        self.keks[new.id] = new
        with self.tx() as c:
            lock = sa.select(meta_t.c.v).where(meta_t.c.k == KEK_ROW).with_for_update()
            if c.execute(lock).first() is None:
                c.execute(meta_t.insert().values(k=KEK_ROW, v=new.id))
            rows = c.execute(sa.select(keys_t)).all()
            for r in rows:
                self._check_key_row(r)
                secret = self._kek(r.kek_id, r.name).unwrap(r.name, r.format, r.wrapped)
                wrapped = new.wrap(r.name, r.format, secret)
                mac = new.mac("keys", r.name, r.format, new.id, wrapped, _utc(r.created_at))
                c.execute(
                    keys_t.update()
                    .where(keys_t.c.name == r.name)
                    .values(kek_id=new.id, wrapped=wrapped, mac=mac)
                )
            for p in c.execute(sa.select(policies_t)).all():  # MACs follow the new KEK
                self._check_policy_row(p.key_name, p.toml, p.updated_at, p.mac)
                c.execute(
                    policies_t.update()
                    .where(policies_t.c.key_name == p.key_name)
                    .values(mac=self._policy_mac(new, p.key_name, p.toml, p.updated_at))
                )
            token = self._admin_token_hash(c)
            if token is not None:
                c.execute(
                    meta_t.update()
                    .where(meta_t.c.k == "admin_token_sha256")
                    .values(v=f"{token}:{new.mac('admin_token', token)}")
                )
            c.execute(meta_t.update().where(meta_t.c.k == KEK_ROW).values(v=new.id))
        new_path.replace(self.state_dir / "kek")
        self.kek = new
        self.keks = {new.id: new}
        return len(rows)

    # -- policies -----------------------------------------------------------------------------
    def set_policy(
        self, name: str, toml: str, *, audit: dict[str, Any] | None = None
    ) -> int | None:
        """Replace key ``name``'s policy; with ``audit``, its ``policy_set`` record (that data) is
        appended in the same transaction, and its sequence number returned: the log's order is
        then the order the policies took effect in, across replicas too."""
        with self.tx() as c:
            # The key's row locked (PostgreSQL; SQLite has one writer): two admins replacing
            # one policy take turns instead of both deleting nothing and one insert failing.
            kek = self._writing_kek(c)  # before the key's row: the order every writer locks in
            self._lock_key(c, name)
            at = _now()
            c.execute(policies_t.delete().where(policies_t.c.key_name == name))
            c.execute(
                policies_t.insert().values(
                    key_name=name,
                    toml=toml,
                    updated_at=at,
                    mac=self._policy_mac(kek, name, toml, at),
                )
            )
            item = self._append_in(c, "policy_set", audit) if audit is not None else None
        return self._appended(item)

    def get_policy(self, name: str) -> str | None:
        with self.engine.connect() as c:
            r = c.execute(sa.select(policies_t).where(policies_t.c.key_name == name)).first()
        if r is None:
            return None
        self._check_policy_row(name, r.toml, r.updated_at, r.mac)
        return str(r.toml)

    def policy_info(self, name: str) -> dict[str, Any] | None:
        """The policy of key ``name`` (TOML, SHA-256, when set), its MAC verified; None if the
        key has none. An unknown key is an UnknownKeyError."""
        with self.engine.connect() as c:
            if c.execute(sa.select(keys_t.c.name).where(keys_t.c.name == name)).first() is None:
                raise UnknownKeyError(404, f"no key named {name!r}")
            r = c.execute(sa.select(policies_t).where(policies_t.c.key_name == name)).first()
        if r is None:
            return None
        self._check_policy_row(name, r.toml, r.updated_at, r.mac)
        return _policy_doc(name, r.toml, r.updated_at)

    def list_policies(self) -> list[dict[str, Any]]:
        with self.engine.connect() as c:
            rows = c.execute(sa.select(policies_t).order_by(policies_t.c.key_name)).all()
        for r in rows:
            self._check_policy_row(r.key_name, r.toml, r.updated_at, r.mac)
        return [_policy_doc(r.key_name, r.toml, r.updated_at) for r in rows]

    def delete_policy(self, name: str, *, audit: bool = False) -> tuple[str, int | None]:
        """Remove key ``name``'s policy (its releases are then denied): its SHA-256 and, with
        ``audit``, the sequence number of its ``policy_removed`` record, appended in the same
        transaction."""
        with self.tx() as c:
            self._lock_key(c, name)
            r = c.execute(sa.select(policies_t).where(policies_t.c.key_name == name)).first()
            if r is None:
                raise UnknownKeyError(404, f"key {name!r} has no policy")
            c.execute(policies_t.delete().where(policies_t.c.key_name == name))
            digest = policy_sha256(r.toml)
            data = {"name": name, "sha256": digest}
            item = self._append_in(c, "policy_removed", data) if audit else None
        return digest, self._appended(item)

    def delete_key(self, name: str, *, audit: bool = False) -> tuple[bool, int | None]:
        """Remove key ``name`` and its policy: whether it had one and, with ``audit``, the
        sequence number of its ``key_removed`` record, appended in the same transaction."""
        with self.tx() as c:
            # locked as set_policy locks it: a policy set meanwhile is never left without its key
            # (a later key of that name would have been released under it)
            self._lock_key(c, name)
            had = bool(c.execute(policies_t.delete().where(policies_t.c.key_name == name)).rowcount)
            c.execute(keys_t.delete().where(keys_t.c.name == name))
            data = {"name": name, "had_policy": had}
            item = self._append_in(c, "key_removed", data) if audit else None
        return had, self._appended(item)

    def _kek_in_use(self, kek_id: str) -> bool:
        """Whether the database names ``kek_id`` anywhere: a key wrapped under it, a policy or
        the admin token MACed under it, or the kek_id row."""
        mac = f"{kek_id}:%"
        with self.engine.connect() as c:
            queries = (
                sa.select(keys_t.c.name).where(keys_t.c.kek_id == kek_id),
                sa.select(policies_t.c.key_name).where(policies_t.c.mac.like(mac)),
                sa.select(meta_t.c.k).where(meta_t.c.k == KEK_ROW, meta_t.c.v == kek_id),
                sa.select(meta_t.c.k).where(
                    meta_t.c.k == "admin_token_sha256", meta_t.c.v.like(f"%:{mac}")
                ),
            )
            return any(c.execute(q.limit(1)).first() is not None for q in queries)

    def _lock_key(self, c: sa.Connection, name: str) -> None:
        """Lock key ``name``'s row for this transaction (``UnknownKeyError`` if there is none)."""
        key = sa.select(keys_t.c.name).where(keys_t.c.name == name).with_for_update()
        if c.execute(key).first() is None:
            raise UnknownKeyError(404, f"no key named {name!r}")

    # -- nonces -------------------------------------------------------------------------------
    def new_nonce(
        self, ttl: timedelta, audit: tuple[str, dict[str, Any]] | None = None
    ) -> tuple[bytes, datetime]:
        """A fresh nonce, stored (and, with ``audit``, its audit record) in one transaction."""
        nonce = secrets.token_bytes(32)
        if audit is not None:
            item = _Append(audit[0], audit[1], nonce=(nonce, ttl))
            self._append_batched(item)
            if item.expires is None:
                raise AuditChainError("the challenge was not stored")
            return nonce, item.expires
        with self.tx() as c:
            insert = nonces_t.insert().values(
                nonce=nonce.hex(), expires_at=self._clock() + ttl, used=False
            )
            expires: datetime = c.execute(insert.returning(nonces_t.c.expires_at)).scalar_one()
        return nonce, _aware(expires)

    def _clock(self) -> Any:
        """The time nonces are issued and checked by: the database's own clock when replicas
        share it (PostgreSQL), so a replica with a skewed clock neither accepts an expired nonce
        nor refuses a fresh one; the local clock for SQLite (one host)."""
        return _now() if self.sqlite else sa.func.now()

    def consume_nonce(self, nonce: bytes) -> bool:
        """True exactly once for a live nonce, across every replica sharing the database."""
        with self.tx() as c:
            return c.execute(self._consume(nonce)).rowcount == 1

    def _consume(self, nonce: bytes) -> sa.Update:
        return (
            nonces_t.update()
            .where(
                nonces_t.c.nonce == nonce.hex(),
                nonces_t.c.used.is_(False),
                nonces_t.c.expires_at > self._clock(),
            )
            .values(used=True)
        )

    # -- audit --------------------------------------------------------------------------------
    def audit(self, event: str, data: dict[str, Any]) -> int:
        """Append a record to the log; returns its sequence number."""
        return self._append_batched(_Append(event, data))[0].seq

    def _append_in(self, c: sa.Connection, event: str, data: dict[str, Any]) -> _Append:
        """Append one record inside the caller's open transaction (after the rows it records
        were changed there): it commits with them or not at all. The head row's lock orders it
        with every other append, group-committed ones and other replicas' included."""
        _check_event(event)
        item = _Append(event, data, text=canonical_data(data))
        self._append_many(c, [item])
        return item

    def _appended(self, item: _Append | None) -> int | None:
        """Once :meth:`_append_in`'s transaction committed: the record's sequence number (and
        this process never accepts a head below it again)."""
        if item is None or item.result is None:
            return None
        with self._queue_lock:
            self._seen_size = max(self._seen_size, item.result[2].size)
        return item.result[0].seq

    def audit_entry(self, event: str, data: dict[str, Any]) -> AuditProof:
        """Append a record; returns it with its inclusion proof and the checkpoint of the tree it
        ends (size = its sequence number), signed once the append committed."""
        rec, proof, grown = self._append_batched(_Append(event, data))
        return AuditProof(
            rec.seq, rec.at, rec.event, rec.data, grown.size, tuple(proof), self._sign(grown)
        )

    def _append_batched(self, item: _Append) -> tuple[AuditRecord, list[bytes], tlog.Frontier]:
        """Group commit: appends that arrive while another is in its transaction wait, then go
        into one transaction together (one lock of the head row, one commit for all of them).

        The first thread to take ``_leader`` appends everything queued, its own record among
        them; a thread whose record a leader already appended returns at once. Each record still
        gets its own sequence number, inclusion proof and tree (its checkpoint is of the tree it
        ends, as for a record appended alone); a batch that fails fails every record in it, and
        none of them is written."""
        _check_event(item.event)  # before queueing: one caller's bad event must not fail a batch
        item.text = (
            None if item.nonce is not None else canonical_data(item.data)
        )  # bad data: its caller's error
        with self._queue_lock:
            self._queue.append(item)
        with self._leader:
            if not item.done:
                batch: list[_Append] = []
                try:
                    with self._queue_lock:
                        batch, self._queue = self._queue, []
                    with self.tx() as c:
                        self._append_many(c, batch)
                except BaseException as e:
                    for it in batch:  # nothing was written; KeyboardInterrupt stays the leader's
                        it.error = (
                            e
                            if isinstance(e, Exception)
                            else AuditChainError(
                                "the audit append was interrupted: nothing was written"
                            )
                        )
                        it.done = True
                    raise
                for it in batch:
                    it.done = True
                last = batch[-1].result
                if last is not None:  # what this process committed: a rewind below it is refused
                    with self._queue_lock:
                        self._seen_size = max(self._seen_size, last[2].size)
        if item.error is not None:
            raise item.error
        if item.result is None:
            raise AuditChainError("the audit record was not appended")
        return item.result

    def _append_many(self, c: sa.Connection, batch: list[_Append]) -> None:
        """Append ``batch`` in order inside an open transaction, holding the head row's lock
        (replica-safe): each record with its chain hash and leaf hash (a challenge's nonce row
        too), then the new head; sets each item's record, inclusion proof (the frontier before
        it) and tree."""
        last, prev, tree = self._tree(str(c.execute(_HEAD_FOR_UPDATE).scalar_one()))
        nonce_rows: list[dict[str, Any]] = []
        if any(it.nonce is not None for it in batch):
            # PostgreSQL: the database's clock (the transaction's start), shared by replicas
            now = (
                _now() if self.sqlite else _aware(c.execute(sa.select(sa.func.now())).scalar_one())
            )
        rows: list[dict[str, Any]] = []
        for it in batch:
            if it.nonce is not None:
                nonce, ttl = it.nonce
                it.expires = now + ttl
                nonce_rows.append({"nonce": nonce.hex(), "expires_at": it.expires, "used": False})
                it.text = canonical_data(
                    {
                        **it.data,
                        "nonce_sha256": hashlib.sha256(nonce).hexdigest(),
                        "expires_at": it.expires.isoformat(),
                    }
                )
            assert it.text is not None
            seq = last + 1
            at = _now().strftime("%Y-%m-%dT%H:%M:%S.%fZ")
            h = record_hash(prev, seq, at, it.event, it.text)
            leaf = record_leaf(seq, at, it.event, it.text)
            grown = tree.append(leaf)
            rows.append(
                {"seq": seq, "at": at, "event": it.event, "data": it.text, "prev_hash": prev,
                 "hash": h, "leaf": leaf.hex()}
            )  # fmt: skip
            rec = AuditRecord(seq, at, it.event, json.loads(it.text), prev, h)
            it.result = (rec, tree.next_inclusion_proof(), grown)
            last, prev, tree = seq, h, grown
        if nonce_rows:
            c.execute(nonces_t.insert(), nonce_rows)
            if secrets.randbelow(64) < len(nonce_rows):  # prune long-expired nonces now and then
                c.execute(nonces_t.delete().where(nonces_t.c.expires_at < now - timedelta(hours=1)))
        c.execute(audit_t.insert(), rows)
        c.execute(_SET_HEAD, {"v": self._head_row(last, prev, tree)})

    def _sign(self, tree: tlog.Frontier) -> str:
        cp = tlog.Checkpoint(self.log_signer.name, tree.size, tree.root())
        return self.log_signer.sign(cp.body())

    def _head_row(self, seq: int, chain: str, tree: tlog.Frontier) -> str:
        """``seq:chain hash|tree state``: the tree's frontier and a MAC binding it to the chain's
        head, under a key derived from the log's signing key."""
        frontier = [h.hex() for h in tree.hashes]
        mac = hmac.new(self._tree_mac, _tree_mac_input(seq, chain, frontier), "sha256")
        doc = {"frontier": frontier, "mac": mac.hexdigest()}
        return f"{seq}:{chain}|{json.dumps(doc, separators=(',', ':'))}"

    def _tree(self, row: str, floor: int | None = None) -> tuple[int, str, tlog.Frontier]:
        """The head row's chain head and frontier, once shown to be what this log's key holder
        wrote (its MAC) and not smaller than a tree this process saw before (``floor``, for a
        read made without the head's lock: what was seen before that read began)."""
        head, _, state = row.partition("|")
        try:
            last, chain = head.split(":")
            seq = int(last)
            if not state:
                raise AuditChainError("the audit tree's state is missing from the database")
            doc = json.loads(state)
            frontier, mac = [str(x) for x in doc["frontier"]], doc["mac"]
            expected = hmac.new(self._tree_mac, _tree_mac_input(seq, chain, frontier), "sha256")
            authentic = isinstance(mac, str) and hmac.compare_digest(mac, expected.hexdigest())
            tree = tlog.Frontier(seq, tuple(bytes.fromhex(x) for x in frontier))
        except (ValueError, KeyError, TypeError) as e:
            raise AuditChainError(f"the audit head row does not parse: {e}") from None
        except FormatError:  # a frontier that cannot be of this size
            authentic = False
        if not authentic:
            raise AuditChainError(
                "the audit head and tree state were not written by this log's key holder: the "
                "database was rewritten"
            )
        seen = self._seen_size if floor is None else floor
        if seq < seen:  # committed state this process saw or wrote: never shrinks
            raise AuditChainError(
                f"the audit log holds {seq} records, {seen} were seen before: it was rewound"
            )
        with self._queue_lock:  # threads raising it at once: the larger stays
            self._seen_size = max(self._seen_size, seq)
        return seq, chain, tree

    def _ensure_head(self) -> None:
        cols = {col["name"] for col in sa.inspect(self.engine).get_columns("audit")}
        if "leaf" not in cols:  # a database from before the tree: add the column, fill it below
            try:
                with self.tx() as c:
                    c.exec_driver_sql("ALTER TABLE audit ADD COLUMN leaf VARCHAR(64)")
            except sa.exc.DBAPIError:
                pass  # another replica added it first
        try:
            with self.tx() as c:
                if (
                    c.execute(sa.select(meta_t.c.k).where(meta_t.c.k == "audit_head")).first()
                    is None
                ):
                    c.execute(
                        meta_t.insert().values(
                            k="audit_head", v=self._head_row(0, GENESIS, tlog.Frontier())
                        )
                    )
        except sa.exc.IntegrityError:
            pass  # another replica created it first
        with self.tx() as c:
            row = str(c.execute(_HEAD_FOR_UPDATE).scalar_one())  # one replica at a time
            if "|" in row:
                return
            if c.execute(sa.select(audit_t.c.seq).where(audit_t.c.leaf.isnot(None))).first():
                # records with leaf hashes were written under a tree: its state was removed, and
                # rebuilding it from the records would sign whatever they now say
                raise AuditChainError(
                    "the audit tree's state is missing from the database, but its records have "
                    "leaf hashes: refusing to sign a tree rebuilt from records that may have "
                    "been rewritten"
                )
            last, chain = row.split(":")
            tree = tlog.Frontier()
            rows = c.execute(
                sa.select(audit_t.c.seq, audit_t.c.at, audit_t.c.event, audit_t.c.data).order_by(
                    audit_t.c.seq
                )
            ).all()
            for r in rows:  # a log from before the tree: its records become the first leaves
                leaf = record_leaf(r.seq, r.at, r.event, r.data)
                c.execute(audit_t.update().where(audit_t.c.seq == r.seq).values(leaf=leaf.hex()))
                tree = tree.append(leaf)
            if tree.size != int(last):
                raise AuditChainError(
                    f"the audit head names {last} records, the table holds {tree.size}"
                )
            c.execute(
                meta_t.update()
                .where(meta_t.c.k == "audit_head")
                .values(v=self._head_row(tree.size, chain, tree))
            )

    def audit_head(self) -> ChainHead:
        with self.engine.connect() as c:
            r = c.execute(sa.select(meta_t.c.v).where(meta_t.c.k == "audit_head")).first()
        if r is None:
            return ChainHead(0, GENESIS)
        seq, h = str(r.v).partition("|")[0].split(":")
        return ChainHead(int(seq), h)

    def audit_checkpoint(self) -> str:
        """The checkpoint of the latest tree (a C2SP signed note), signed now."""
        # read without the head's lock: only what was committed before the read began is a
        # floor (a commit meanwhile raises _seen_size past what this read may see)
        floor = self._seen_size
        with self.engine.connect() as c:
            row = c.execute(sa.select(meta_t.c.v).where(meta_t.c.k == "audit_head")).scalar_one()
        return self._sign(self._tree(str(row), floor)[2])

    def audit_consistency(self, first: int, second: int) -> list[bytes]:
        """RFC 9162 consistency proof between the trees of ``first`` and ``second`` records, from
        the stored leaf hashes (the records themselves are not read)."""
        if not 0 <= first <= second:
            raise BrokerError(400, "a consistency proof needs 0 <= first <= second")
        with self.engine.connect() as c:
            leaves = c.execute(
                sa.select(audit_t.c.leaf).where(audit_t.c.seq <= second).order_by(audit_t.c.seq)
            ).all()
        if len(leaves) < second:
            raise BrokerError(404, f"the log holds {len(leaves)} records, not {second}")
        if any(r.leaf is None for r in leaves):
            raise AuditChainError("a record has no leaf hash")
        return tlog.consistency_proof(first, [bytes.fromhex(r.leaf) for r in leaves])

    def audit_records(self, after: int = 0, limit: int = 1000) -> list[AuditRecord]:
        with self.engine.connect() as c:
            rows = c.execute(
                sa.select(audit_t).where(audit_t.c.seq > after).order_by(audit_t.c.seq).limit(limit)
            ).all()
        return [
            AuditRecord(r.seq, r.at, r.event, json.loads(r.data), r.prev_hash, r.hash) for r in rows
        ]

    # -- admin token --------------------------------------------------------------------------
    # meta row admin_token_sha256 = "<sha256 hex of the token>:<row MAC>"
    def _admin_token_hash(self, c: sa.Connection) -> str | None:
        """The stored token hash, its MAC verified (None when no token was made yet)."""
        r = c.execute(sa.select(meta_t.c.v).where(meta_t.c.k == "admin_token_sha256")).first()
        if r is None:
            return None
        digest, _, mac = str(r.v).partition(":")
        self._verify_mac(mac, "the admin token's hash", "admin_token", digest)
        return digest

    def has_admin_token(self) -> bool:
        with self.engine.connect() as c:
            return self._admin_token_hash(c) is not None

    def init_admin_token(self, token: str | None = None) -> str | None:
        """Create the admin token on first start (``token``, or a fresh one); return it (once) or
        None if one exists."""
        token = token or secrets.token_urlsafe(32)
        digest = hashlib.sha256(token.encode()).hexdigest()
        with self.tx() as c:
            kek = self._writing_kek(c)
            if c.execute(sa.select(meta_t.c.v).where(meta_t.c.k == "admin_token_sha256")).first():
                return None
            c.execute(
                meta_t.insert().values(
                    k="admin_token_sha256", v=f"{digest}:{kek.mac('admin_token', digest)}"
                )
            )
        return token

    def rotate_admin_token(self, token: str) -> None:
        """Replace the admin token's hash (the old token stops working at once)."""
        digest = hashlib.sha256(token.encode()).hexdigest()
        with self.tx() as c:
            v = f"{digest}:{self._writing_kek(c).mac('admin_token', digest)}"
            if (
                c.execute(
                    meta_t.update().where(meta_t.c.k == "admin_token_sha256").values(v=v)
                ).rowcount
                == 0
            ):
                c.execute(meta_t.insert().values(k="admin_token_sha256", v=v))

    def nonce_count(self) -> int:
        """Rows in the nonce table (live and used, until pruned)."""
        with self.engine.connect() as c:
            return int(c.execute(sa.select(sa.func.count()).select_from(nonces_t)).scalar_one())

    def check_admin_token(self, token: str) -> bool:
        """Whether ``token`` is the admin token; a stored hash whose MAC fails is an
        IntegrityError (whoever wrote the database does not thereby become the admin)."""
        with self.engine.connect() as c:
            digest = self._admin_token_hash(c)
        return digest is not None and hmac.compare_digest(
            digest, hashlib.sha256(token.encode()).hexdigest()
        )


def _policy_doc(name: str, toml: str, updated_at: datetime) -> dict[str, Any]:
    return {
        "name": name,
        "sha256": policy_sha256(toml),
        "updated_at": _utc(updated_at),
        "toml": toml,
    }


def policy_sha256(toml: str) -> str:
    return hashlib.sha256(toml.encode()).hexdigest()


def _check_schema(engine: sa.Engine) -> None:
    """A database made before rows carried MACs is refused (no silent upgrade would be safe:
    it would vouch for whatever the rows hold)."""
    inspector = sa.inspect(engine)
    for table in ("keys", "policies"):
        if "mac" not in {c["name"] for c in inspector.get_columns(table)}:
            raise IntegrityError(
                f"table {table}",
                "broker database",
                reason="made by an earlier shieldml without row MACs",
                hint="start the broker on a new database and add the keys and policies again",
            )


def _check_name(name: str) -> None:
    if not valid_key_name(name):
        raise BrokerError(
            400,
            f"invalid key name {name!r}: ASCII letters, digits, '-', '_', '.', at most {NAME_MAX}",
        )


def _tree_mac_input(seq: int, chain: str, frontier: list[str]) -> bytes:
    return f"shieldml/v1 audit head\n{seq}\n{chain}\n{','.join(frontier)}\n".encode()


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    dbapi_conn.isolation_level = None  # let the "begin" listener issue BEGIN IMMEDIATE
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()
