"""The one exception tree of shieldml.

Every error that bad input, a bad key or a tampered file can cause is a :class:`ShieldError`;
built-in exceptions are raised only for misuse of the API by the caller (a wrong argument type,
reading a closed file). The CLI catches ``ShieldError`` once and prints
:meth:`~ShieldError.diagnostics`.

::

    ShieldError                     root: every error bad input, a bad key or a tampered file can cause
    ├── FormatError                 bytes that do not parse as the structure they claim to be
    │   ├── NotProtectedError       a file that is not a shieldml/Gramine protected file at all
    │   └── UnsupportedVersionError a known structure with a version this build cannot read
    ├── IntegrityError              authentication failed: tampered, truncated, reordered, swapped
    │   ├── WrongKeyError           the key does not belong to the file (detected before decrypting)
    │   ├── RollbackError           an input is not the ciphertext version the job pins
    │   └── AuditChainError         a broker's audit log was edited, cut or reordered
    ├── InputReadError              an input file or directory that is missing or cannot be read
    ├── KeyFileError                a key file that is missing, unreadable or of the wrong size
    ├── OutputExistsError           refusing to overwrite something the user did not ask to replace
    ├── OutputWriteError            an output could not be written (no space, I/O error); none is left
    ├── AttestationError            evidence is not genuine TEE evidence (names the failed check)
    │   ├── UntrustedRootError      the chain ends in a root that is not a trusted vendor root
    │   ├── ExpiredError            a certificate, CRL or collateral item is not valid at that time
    │   ├── RevokedError            a certificate in the chain is revoked
    │   ├── CollateralError         collateral is missing, malformed or does not fit the evidence
    │   ├── TcbError                no TCB level matches, or the matched level is Revoked
    │   └── MeasurementError        runtime measurements differ from the signed reference values
    ├── TrustRootError              a trust root file that is unreadable, not a certificate or not allowed
    ├── PolicyError                 a release policy that is malformed, empty or has unknown fields
    ├── PolicyDenied                genuine evidence that the policy does not accept (has the verdict)
    ├── BrokerError                 a key broker refused a request (``status``: the HTTP status)
    │   ├── BrokerUnavailable       the broker cannot be reached, or answers that it is not ready
    │   ├── FingerprintMismatchError the broker's TLS certificate is not the pinned one
    │   ├── NonceError              the challenge nonce is unknown, expired or already used
    │   ├── NotGenuineError         the broker found the evidence not genuine (also an AttestationError)
    │   ├── BindingError            the evidence does not bind the nonce, runner key and workload
    │   ├── UnknownKeyError         no key of that name on the broker
    │   ├── KeyExistsError          a key of that name exists already
    │   └── ReleaseDenied           the broker's policy denied the release (``verdicts``)
    ├── ManifestError               a job manifest that is malformed or inconsistent
    ├── TrustedFileError            a trusted file differs from its hash in the manifest
    ├── EvidenceError               the TEE gave no evidence (interface missing, timed out, empty)
    ├── ViewError                   the decrypted view could not be set up
    │   └── MountChangedError       a mount of the view was detached or replaced during the run
    └── ReceiptError                a run receipt not bound by its evidence, or files that differ

``ReleaseDenied`` is also a ``PolicyDenied``: a caller that handles every policy refusal the
same way, local or the broker's, catches ``PolicyDenied``; likewise ``NotGenuineError`` is also an
``AttestationError``.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from shieldml.attest import Check
    from shieldml.policy import Verdict
    from shieldml.runner.receipt import VerifiedReceipt

__all__ = [
    "AttestationError",
    "AuditChainError",
    "BindingError",
    "BrokerError",
    "BrokerUnavailable",
    "CollateralError",
    "EvidenceError",
    "ExpiredError",
    "FingerprintMismatchError",
    "FormatError",
    "InputReadError",
    "IntegrityError",
    "KeyExistsError",
    "KeyFileError",
    "ManifestError",
    "MeasurementError",
    "MountChangedError",
    "NonceError",
    "NotGenuineError",
    "NotProtectedError",
    "OutputExistsError",
    "OutputWriteError",
    "PolicyDenied",
    "PolicyError",
    "ReceiptError",
    "ReleaseDenied",
    "RevokedError",
    "RollbackError",
    "ShieldError",
    "TcbError",
    "TrustRootError",
    "TrustedFileError",
    "UnknownKeyError",
    "UnsupportedVersionError",
    "UntrustedRootError",
    "ViewError",
    "WrongKeyError",
]


class ShieldDeprecationWarning(DeprecationWarning):
    """An old spelling still accepted (a TEE name, say); the CLI prints it as one
    ``warning:`` line on standard error."""


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


class InputReadError(ShieldError):
    """An input file or directory that does not exist or cannot be read (the OS's reason given).

    Not a :class:`FormatError` or :class:`IntegrityError`: nothing was read that could be judged.
    """


class KeyFileError(ShieldError):
    """A key file that is missing, unreadable, or has the wrong size for its format."""


class OutputExistsError(ShieldError):
    """Refusing to overwrite an existing file."""


class OutputWriteError(ShieldError):
    """An output could not be written: no space left, an I/O error, no permission.

    The message is ``PATH: no space left on device`` for ENOSPC and ``PATH: <strerror>``
    otherwise, ``PATH`` being the output as the caller named it; ``errno`` is the system's error
    number. Whoever raises it has removed the partial output first.
    """

    def __init__(self, path: str, errno: int | None, strerror: str) -> None:
        super().__init__(f"{path}: {strerror}")
        self.path = path
        self.errno = errno


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
        self.checks: list[Check] = []

    def diagnostics(self) -> str:
        return _with_expected(self.message, self.expected, self.found, self.hint)


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


class MeasurementError(AttestationError):
    """Genuine evidence whose measurements differ from the vendor's signed reference values
    (NVIDIA RIMs); ``mismatches`` names each index with what was expected and found."""

    mismatches: tuple[object, ...] = ()


class TrustRootError(ShieldError):
    """A trust root given by the caller that cannot be used: unreadable, not a certificate, or a
    custom root without the insecure switch.

    Not an :class:`AttestationError`: the configuration is refused before any evidence is judged.
    """


class PolicyError(ShieldError):
    """A release policy that cannot be used: malformed, empty, unknown fields, bad values."""


class RollbackError(IntegrityError):
    """An input is not the ciphertext the job pins: an older or substituted version."""

    def __init__(self, path: str, pin: str) -> None:
        super().__init__(
            path,
            f"pinned sha256 {pin[:16]}…",
            reason="not the ciphertext the job pins: an older or substituted version",
            hint="the owner pinned this input's version in the measured manifest",
        )
        self.pin = pin


class AuditChainError(IntegrityError):
    """The broker's audit log does not verify: a record edited, deleted, reordered or cut off."""

    def __init__(self, reason: str, *, seq: int | None = None) -> None:
        super().__init__("audit log", "chain" if seq is None else f"record {seq}", reason=reason)
        self.seq = seq


class PolicyDenied(ShieldError):  # noqa: N818 - the name the API promises
    """Evidence is genuine but no profile of the policy accepts it; ``verdict`` lists every check."""

    def __init__(self, message: str, verdict: Verdict | None, *, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.verdict = verdict


class BrokerError(ShieldError):
    """A key broker refused a request or failed; ``status`` (HTTP) and ``detail`` say why.

    Raised by the client for an error answer, and by the broker's own release core with the
    status its HTTP service answers.
    """

    def __init__(self, status: int | None, detail: Any, *, hint: str | None = None) -> None:
        text = _detail_text(detail)
        # not super(): ReleaseDenied is also a PolicyDenied, whose __init__ takes a verdict
        ShieldError.__init__(
            self, f"broker answered {status}: {text}" if status is not None else text, hint=hint
        )
        self.status = status
        self.detail = detail


def _detail_text(detail: Any) -> str:
    """A broker's ``detail`` as a sentence: its ``reason`` and audit record where it has them
    (the other fields are the error's attributes), else the JSON on one line."""
    if isinstance(detail, str):
        return detail
    if isinstance(detail, dict) and isinstance(detail.get("reason"), str):
        seq = detail.get("audit_seq")
        reason: str = detail["reason"]
        return reason + (f" (audit record {seq})" if isinstance(seq, int) else "")
    return json.dumps(detail)


class BrokerUnavailable(BrokerError):  # noqa: N818 - reads as a state, like PolicyDenied
    """The broker cannot be reached, or answers that it cannot serve now (503)."""


class FingerprintMismatchError(BrokerError):
    """The broker's TLS certificate is not the pinned one (possibly an impostor); nothing was sent.

    ``pinned`` and ``found`` are the two SHA-256 fingerprints, lower-case hex.
    """

    def __init__(self, url: str, *, pinned: str, found: str, hint: str | None = None) -> None:
        super().__init__(
            None, f"{url}: TLS certificate fingerprint {found} is not the pinned one", hint=hint
        )
        self.url = url
        self.pinned = pinned
        self.found = found


class NonceError(BrokerError):
    """The challenge nonce is unknown, expired, or was used already (a replay)."""


class NotGenuineError(BrokerError, AttestationError):
    """The broker's verification of the evidence failed: not genuine, untrusted, out of date.

    ``cause`` is the failed check where the broker raised it itself (its own release core); a
    client that only has the broker's answer gets ``check == "evidence"`` and the reasons in
    ``detail``.
    """

    def __init__(
        self,
        status: int | None,
        detail: Any,
        *,
        cause: AttestationError | None = None,
        hint: str | None = None,
    ) -> None:
        BrokerError.__init__(self, status, detail, hint=hint)
        self.cause = cause
        self.check = cause.check if cause is not None else "evidence"
        self.expected = cause.expected if cause is not None else None
        self.found = cause.found if cause is not None else None
        self.checks = list(cause.checks) if cause is not None else []
        #: the broker's answer, read: each check it ran (as dicts, the failed one last) and its
        #: reasons (sentences); empty where the answer carries none
        self.reported_checks: list[dict[str, Any]] = []
        self.reasons: list[str] = []
        #: whether the answer named the failed check (``message``)
        self.named = False
        if isinstance(detail, dict):
            self._read(detail)

    def _read(self, detail: dict[str, Any]) -> None:
        """The failed check from a broker's answer (``check``, ``message``, ``expected``,
        ``found``, ``hint``, ``checks``; an older broker sends only ``reasons``)."""

        def text(name: str) -> str | None:
            v = detail.get(name)
            return v if isinstance(v, str) else None

        raw = detail.get("reasons")
        self.reasons = [r for r in raw if isinstance(r, str)] if isinstance(raw, list) else []
        checks = detail.get("checks")
        if isinstance(checks, list):
            self.reported_checks = [c for c in checks if isinstance(c, dict)]
        if self.cause is None:
            self.check = text("check") or self.check
            self.expected = text("expected")
            self.found = text("found")
            if self.hint is None:
                self.hint = text("hint")
        self.named = text("message") is not None
        message = text("message") or (self.cause.message if self.cause is not None else None)
        self.message = "the broker found the evidence not genuine" + (
            f": {message}" if message else ""
        )

    def diagnostics(self) -> str:
        text = super().diagnostics()
        if not self.named and self.cause is None:
            # an answer that names no check: its reasons, as the broker worded them
            for reason in self.reasons:
                text += "\n  " + reason.replace("\n", "\n  ")
        return text


class BindingError(BrokerError):
    """The evidence's report data does not bind the nonce, the runner's key and the workload.

    ``expected`` and ``found`` are the report data the broker computed and the one the evidence
    carries (hex), where its answer says.
    """

    def __init__(self, status: int | None, detail: Any, *, hint: str | None = None) -> None:
        super().__init__(status, detail, hint=hint)
        d = detail if isinstance(detail, dict) else {}
        self.expected = d["expected"] if isinstance(d.get("expected"), str) else None
        self.found = d["found"] if isinstance(d.get("found"), str) else None

    def diagnostics(self) -> str:
        return _with_expected(self.message, self.expected, self.found, self.hint)


class UnknownKeyError(BrokerError):
    """The broker has no key of that name."""


class KeyExistsError(BrokerError):
    """A key of that name exists already on the broker (``--replace`` to rotate)."""


class ReleaseDenied(BrokerError, PolicyDenied):  # noqa: N818 - the name the API promises
    """The broker's policy denied the release; ``verdicts`` holds each key's verdict (as dicts)."""

    def __init__(
        self,
        status: int | None,
        detail: Any,
        *,
        verdicts: list[dict[str, Any]] | None = None,
        hint: str | None = None,
    ) -> None:
        BrokerError.__init__(self, status, detail, hint=hint)
        self.verdict = None
        self.verdicts = list(verdicts or [])
        denied = ", ".join(repr(v["key"]) for v in self.verdicts if "key" in v)
        self.message = "the broker's policy denied the release" + (
            f" of {denied}" if denied else ""
        )

    def failures(self) -> list[str]:
        """One line per failed check of each denied key, as :meth:`Verdict.failures` words it."""
        lines = []
        for v in self.verdicts:
            key = v.get("key", "?")
            if "reason" in v and "profiles" not in v:
                lines.append(f"key {key!r}: {v['reason']}")
            for p in v.get("profiles", []):
                for c in p.get("checks", []):
                    if not c.get("passed", True):
                        hint = f" ({c['hint']})" if c.get("hint") else ""
                        lines.append(
                            f"key {key!r}: profile {p.get('profile')}: {c.get('name')}: "
                            f"expected {c.get('expected')}, found {c.get('actual')}{hint}"
                        )
        return lines

    def diagnostics(self) -> str:
        text = self.message
        for line in self.failures():
            text += f"\n  {line}"
        if self.hint:
            text += f"\n  hint: {self.hint}"
        return text


class ManifestError(ShieldError):
    """A job manifest that is malformed or inconsistent."""


class TrustedFileError(ShieldError):
    """A trusted file differs from the hash in the manifest (the job must not run)."""


class EvidenceError(ShieldError):
    """No evidence could be obtained from the TEE."""


class ViewError(ShieldError):
    """The decrypted view could not be set up."""


class MountChangedError(ViewError):
    """A mount of the view was detached or replaced while the program ran (nothing is sealed)."""


class ReceiptError(ShieldError):
    """A run receipt whose evidence does not bind it, whose listed GPUs do not meet the policy,
    or whose files differ from it.

    ``problems`` names each file that differs (or, with ``gpus``, each way the listed GPUs fall
    short of ``[profile.gpu]``: the files were then not compared); ``verified`` is the receipt
    as verified before (``None`` when the binding itself failed).
    """

    def __init__(
        self,
        message: str,
        *,
        problems: list[str] | None = None,
        verified: VerifiedReceipt | None = None,
        gpus: bool = False,
    ) -> None:
        super().__init__(message)
        self.problems = list(problems or [])
        self.verified = verified
        self.gpus = gpus


def unknown_fields_hint(unknown: set[str] | list[str], valid: set[str] | list[str]) -> str:
    """The hint for misspelled TOML fields: "did you mean" for each close match, then every
    valid field (policies and job manifests word it the same way)."""
    import difflib

    guesses = [
        f"{u} -> {m[0]}"
        for u in sorted(unknown)
        if (m := difflib.get_close_matches(u, sorted(valid), n=1, cutoff=0.6))
    ]
    text = f"did you mean {', '.join(guesses)}? " if guesses else ""
    return text + f"valid fields: {', '.join(sorted(valid))}"


def _with_expected(message: str, expected: str | None, found: str | None, hint: str | None) -> str:
    """A message, then what was expected and found and the hint, one per line."""
    text = message
    if expected is not None:
        text += f"\n  expected: {expected}"
    if found is not None:
        text += f"\n  found:    {found}"
    if hint:
        text += f"\n  hint: {hint}"
    return text
