"""A record of every check a verification ran, for explanations and the CLI's ``explain``."""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import datetime
from typing import TypeVar

from shieldml.errors import AttestationError

E = TypeVar("E", bound=AttestationError)


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

    def ok(self, name: str, detail: str) -> None:
        self.checks.append(Check(name, True, detail))

    def fail(self, error: E) -> E:
        self.checks.append(
            Check(error.check, False, error.message, error.expected, error.found, error.hint)
        )
        error.checks = list(self.checks)
        return error


class VerificationCache:
    """Results of expensive, input-determined checks (certificate chains, CRLs, collateral
    signatures), reused while the verification time lies inside their validity window.

    Keys are hashes of every input the check reads (certificate and CRL bytes, trust anchors),
    so a hit means the same check on the same bytes; failures are never cached. Bounded, LRU,
    thread-safe. A broker verifying many quotes from one platform pays for the collateral once.
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
            if entry is None or not entry[0] <= now <= entry[1]:
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return entry[2], entry[3]

    def put(self, key: bytes, start: datetime, end: datetime, detail: str, value: object) -> None:
        with self._lock:
            self._entries[key] = (start, end, detail, value)
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
