"""A record of every check a verification ran, for explanations and the CLI's ``explain``."""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TypeVar

from shieldml.errors import AttestationError

E = TypeVar("E", bound=AttestationError)
#: the window of a fact: it holds whatever the time (never compared with a verification time)
_FACT = datetime.min.replace(tzinfo=UTC)


@dataclass(frozen=True)
class Check:
    """One verification step: its name, whether it passed, and what it compared."""

    name: str
    passed: bool
    detail: str
    expected: str | None = None
    found: str | None = None
    hint: str | None = None

    def to_dict(self) -> dict[str, object]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


@dataclass
class CheckLog:
    """Collects passed checks; :meth:`fail` records the failure and returns the error to raise."""

    checks: list[Check] = field(default_factory=list)
    cache: VerificationCache | None = None
    #: facts established earlier in this same verification (one CRL or certificate link that
    #: several chains share is checked once per call even without a cache)
    memo: dict[bytes, object] = field(default_factory=dict)

    def recall(self, key: bytes) -> tuple[object, bool] | None:
        """A time-independent fact already established for ``key``: (value, from the shared
        cache), or None. Validity windows are never facts: callers check them on every call."""
        if key in self.memo:
            return self.memo[key], False
        if self.cache is not None:
            value = self.cache.fact(key)
            if value is not None:
                self.memo[key] = value
                return value, True
        return None

    def keep(self, key: bytes, value: object) -> None:
        """Record a fact that holds for the exact bytes hashed into ``key``, whatever the time."""
        self.memo[key] = value
        if self.cache is not None:
            self.cache.remember(key, value)

    def ok(self, name: str, detail: str) -> None:
        self.checks.append(Check(name, True, detail))

    def fail(self, error: E) -> E:
        self.checks.append(
            Check(error.check, False, error.message, error.expected, error.found, error.hint)
        )
        error.checks = list(self.checks)
        return error


class VerificationCache:
    """Results of expensive, input-determined checks, shared across verifications.

    Two kinds of entry, both keyed by a hash of every byte the check reads (certificate, CRL and
    signed-JSON bytes, issuer bytes, trust anchors), so a hit means the same check on the same
    bytes; failures are never cached:

    - *facts* (:meth:`fact` / :meth:`remember`): what does not depend on the time: a signature
      verifies over these exact bytes, these exact JSON bytes parse to this TCB info, this exact
      PEM parses to these certificates. Every validity window (certificate notBefore/notAfter,
      CRL thisUpdate/nextUpdate, TCB info and QE identity issueDate/nextUpdate) is still checked
      against the verification time on every call.
    - *windowed results* (:meth:`get` / :meth:`put`): reused only while the verification time
      lies inside the window stored with them.

    Bounded, LRU, thread-safe. A broker verifying many quotes from one platform pays for the
    collateral's signatures and parsing once.
    """

    def __init__(self, max_entries: int = 4096) -> None:
        self._entries: OrderedDict[bytes, tuple[datetime, datetime, str, object]] = OrderedDict()
        self._lock = threading.Lock()
        self.max_entries = max_entries
        self.hits = 0

    @staticmethod
    def key(*parts: bytes | str) -> bytes:
        h = hashlib.sha256()
        for p in parts:
            raw = p.encode() if isinstance(p, str) else p
            h.update(len(raw).to_bytes(8, "big") + raw)
        return h.digest()

    def get(self, key: bytes, now: datetime) -> tuple[str, object] | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or entry[0] is _FACT or not entry[0] <= now <= entry[1]:
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return entry[2], entry[3]

    def fact(self, key: bytes) -> object | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or entry[0] is not _FACT:
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return entry[3]

    def remember(self, key: bytes, value: object) -> None:
        self.put(key, _FACT, _FACT, "", value)

    def put(self, key: bytes, start: datetime, end: datetime, detail: str, value: object) -> None:
        with self._lock:
            self._entries[key] = (start, end, detail, value)
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
