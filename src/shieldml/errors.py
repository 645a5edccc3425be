"""The one exception tree of shieldml.

Every error that bad input, a bad key or a tampered file can cause is a :class:`ShieldError`;
built-in exceptions are raised only for misuse of the API by the caller (a wrong argument type,
reading a closed file). The CLI catches ``ShieldError`` once and prints
:meth:`~ShieldError.diagnostics`.

::

    ShieldError
    ├── FormatError                 bytes that do not parse as the structure they claim to be
    │   ├── NotProtectedError       a file that is not a shieldml/Gramine protected file at all
    │   └── UnsupportedVersionError a known structure with a version this build cannot read
    ├── IntegrityError              authentication failed: tampered, truncated, reordered, swapped
    │   ├── WrongKeyError           the key does not belong to the file (detected before decrypting)
    │   └── AuditChainError         a broker's audit log was edited, cut or reordered
    ├── KeyFileError                a key file that is missing, unreadable or of the wrong size
    ├── OutputExistsError           refusing to overwrite something the user did not ask to replace
    └── AttestationError            evidence is not genuine TEE evidence (names the failed check)
        ├── UntrustedRootError      the chain ends in a root that is not a trusted vendor root
        ├── ExpiredError            a certificate, CRL or collateral item is not valid at that time
        ├── RevokedError            a certificate in the chain is revoked
        ├── CollateralError         collateral is missing, malformed or does not fit the evidence
        └── TcbError                no TCB level matches, or the matched level is Revoked
    ├── ReceiptError                a run receipt not bound by its evidence, or files that differ from it
    ├── PolicyError                 a release policy that is malformed, empty or has unknown fields
    └── PolicyDenied                genuine evidence that the policy does not accept (has the verdict)
"""

from __future__ import annotations

__all__ = [
    "AttestationError",
    "AuditChainError",
    "CollateralError",
    "ExpiredError",
    "FormatError",
    "IntegrityError",
    "KeyFileError",
    "NotProtectedError",
    "OutputExistsError",
    "PolicyDenied",
    "PolicyError",
    "ReceiptError",
    "RevokedError",
    "ShieldError",
    "TcbError",
    "UnsupportedVersionError",
    "UntrustedRootError",
    "WrongKeyError",
]


class ShieldError(Exception):
    """Root of every error shieldml raises for bad input."""

    hint: str | None = None

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if hint is not None:
            self.hint = hint

    def diagnostics(self) -> str:
        """A human-readable explanation for the CLI: the message, then a hint if there is one."""
        text = self.message
        if self.hint:
            text += f"\n  hint: {self.hint}"
        return text


class FormatError(ShieldError):
    """Bytes that do not parse as the structure they claim to be."""


class NotProtectedError(FormatError):
    """The file is not a protected file in any format shieldml knows."""


class UnsupportedVersionError(FormatError):
    """A known structure with a version this build cannot read."""


class IntegrityError(ShieldError):
    """Authentication of protected data failed.

    The message names the file and where (segment or node) and nothing else: no detail that
    could serve as a decryption oracle.
    """

    def __init__(
        self,
        path: str,
        where: str,
        *,
        reason: str = "failed authentication",
        hint: str | None = None,
    ) -> None:
        super().__init__(f"{path}: {reason} ({where})", hint=hint)
        self.path = path
        self.where = where


class WrongKeyError(IntegrityError):
    """The key does not match the key id in the file's header; nothing was decrypted."""

    def __init__(self, path: str, *, expected: str, actual: str) -> None:
        super().__init__(
            path,
            "header",
            reason=f"wrong key: file is encrypted under key id {expected}, "
            f"the key given has id {actual}",
            hint="use the key the file was encrypted with (`shieldml inspect` shows its key id)",
        )
        self.expected = expected
        self.actual = actual


class KeyFileError(ShieldError):
    """A key file that is missing, unreadable, or has the wrong size for its format."""


class OutputExistsError(ShieldError):
    """Refusing to overwrite an existing file."""


class AttestationError(ShieldError):
    """Evidence failed verification: which check, what was expected, what was found, how to fix.

    ``checks`` holds every check run up to and including the failed one, for explanations.
    """

    def __init__(
        self,
        check: str,
        message: str,
        *,
        expected: str | None = None,
        found: str | None = None,
        hint: str | None = None,
    ) -> None:
        super().__init__(f"{check}: {message}", hint=hint)
        self.check = check
        self.expected = expected
        self.found = found
        self.checks: list[object] = []

    def diagnostics(self) -> str:
        text = self.message
        if self.expected is not None:
            text += f"\n  expected: {self.expected}"
        if self.found is not None:
            text += f"\n  found:    {self.found}"
        if self.hint:
            text += f"\n  hint: {self.hint}"
        return text


class UntrustedRootError(AttestationError):
    """The certificate chain ends in a root that is neither pinned nor explicitly trusted."""


class ExpiredError(AttestationError):
    """A certificate, CRL or collateral item is not valid at the verification time."""


class RevokedError(AttestationError):
    """A certificate of the chain is on its issuer's revocation list."""


class CollateralError(AttestationError):
    """Collateral is missing, malformed, or does not belong to the evidence."""


class TcbError(AttestationError):
    """No TCB level matches the platform, or the matched level is Revoked."""


class PolicyError(ShieldError):
    """A release policy that cannot be used: malformed, empty, unknown fields, bad values."""


class AuditChainError(IntegrityError):
    """The broker's audit log does not verify: a record edited, deleted, reordered or cut off."""

    def __init__(self, reason: str, *, seq: int | None = None) -> None:
        super().__init__("audit log", "chain" if seq is None else f"record {seq}", reason=reason)
        self.seq = seq


class ReceiptError(ShieldError):
    """A run receipt whose evidence does not bind it, or whose files differ from it.

    ``problems`` names each file that differs; ``verified`` is the receipt as verified before
    the files were compared (``None`` when the binding itself failed).
    """

    def __init__(
        self, message: str, *, problems: list[str] | None = None, verified: object = None
    ) -> None:
        super().__init__(message)
        self.problems = list(problems or [])
        self.verified = verified


class PolicyDenied(ShieldError):  # noqa: N818 - the name the API promises
    """Evidence is genuine but no profile of the policy accepts it; ``verdict`` lists every check."""

    def __init__(self, message: str, verdict: object, *, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.verdict = verdict
