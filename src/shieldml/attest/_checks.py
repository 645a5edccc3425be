"""A record of every check a verification ran, for explanations and the CLI's ``explain``."""

from __future__ import annotations

from dataclasses import dataclass, field
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

    def ok(self, name: str, detail: str) -> None:
        self.checks.append(Check(name, True, detail))

    def fail(self, error: E) -> E:
        self.checks.append(
            Check(error.check, False, error.message, error.expected, error.found, error.hint)
        )
        error.checks = list(self.checks)
        return error
