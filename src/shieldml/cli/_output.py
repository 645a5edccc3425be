"""Everything the CLI prints: the consoles, JSON documents, progress bars, error lines."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import click

from shieldml.errors import (
    AttestationError,
    AuditChainError,
    BindingError,
    BrokerError,
    IntegrityError,
    NotGenuineError,
    OutputWriteError,
    PolicyDenied,
    ReceiptError,
    ReleaseDenied,
    ShieldError,
)
from shieldml.files import ProgressCallback

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress


class LazyConsole:
    """A rich ``Console``, made on first use: importing rich costs about 40 ms, which a command
    that prints nothing (``shieldml decrypt`` of a file, ``shieldml run`` with ``--json``) never
    pays. Every attribute is the console's."""

    def __init__(self, **options: Any) -> None:
        self._options = options
        self._console: Console | None = None

    @property
    def console(self) -> Console:
        if self._console is None:
            from rich.console import Console

            self._console = Console(**self._options)
        return self._console

    def __getattr__(self, name: str) -> Any:
        return getattr(self.console, name)


def _visible(ch: str) -> str:
    n = ord(ch)
    return f"\\x{n:02x}" if n < 0x100 else f"\\u{n:04x}" if n < 0x10000 else f"\\U{n:08x}"


def escape(text: str, *, one_line: bool = False) -> str:
    """``text`` with rich markup escaped (``rich.markup.escape``, loaded on first use) and every
    character that does not print itself (ESC and the other controls, bidirectional overrides,
    and with ``one_line`` newlines and tabs too) shown as its ``\\x..`` escape: text from a
    broker, a file or evidence can neither restyle the terminal nor forge a line of output."""
    from rich.markup import escape as rich_escape

    keep = "" if one_line else "\n\t"
    if not text.isprintable():
        text = "".join(c if c.isprintable() or c in keep else _visible(c) for c in text)
    return rich_escape(text)


#: standard output: results (rich markup)
out = LazyConsole(highlight=False, soft_wrap=True)
#: standard error: errors, warnings, progress bars
err = LazyConsole(stderr=True, highlight=False, soft_wrap=True)


def emit_json(data: Any, *, sort_keys: bool = False) -> None:
    """``data`` as an indented JSON document on standard output (``--json``)."""
    click.echo(json.dumps(data, indent=2, sort_keys=sort_keys))


def emit(data: Any, as_json: bool, text: str, *, sort_keys: bool = False) -> None:
    """``data`` as JSON with ``--json``, else ``text`` (rich markup) on standard output."""
    if as_json:
        emit_json(data, sort_keys=sort_keys)
    else:
        out.print(text)


def check_mark(passed: bool) -> str:
    """The first column of a table of checks."""
    return "[green]✓[/green]" if passed else "[red]✗[/red]"


@dataclass
class Invocation:
    """What :func:`shieldml.cli.main` learns about the command while click parses it."""

    #: ``--json`` was given: errors are printed as one JSON object too
    as_json: bool = False
    #: ``shieldml run``: the exit code of every failure of the runner itself
    failure_code: int | None = None


_invocation = Invocation()


def begin() -> Invocation:
    """A fresh :class:`Invocation` for one call of ``main`` (tests call it many times)."""
    global _invocation
    _invocation = Invocation()
    return _invocation


def invocation() -> Invocation:
    return _invocation


def error_document(
    kind: str, message: str, exit_code: int, e: ShieldError | None = None
) -> dict[str, Any]:
    """The JSON object of an error (``--json``): ``{"ok": false, "error", "kind", "type",
    "hint", "exit_code", "details"}``; ``details`` holds what the error carries by its parts."""
    return {
        "ok": False,
        "error": message,
        "kind": kind,
        "type": type(e).__name__ if e is not None else None,
        "hint": e.hint if e is not None else None,
        "exit_code": exit_code,
        "details": error_details(e) if e is not None else {},
    }


def print_error(kind: str, e: ShieldError, exit_code: int) -> None:
    """The error on standard error: with ``--json`` one JSON object on one line, else ``kind:
    message`` and, for a refusal, its failed checks laid out as ``attest explain`` does."""
    if _invocation.as_json:
        emit_json_line(error_document(kind.removesuffix(" error"), e.message, exit_code, e))
        return
    lines = refusal_lines(e)
    if lines is None:
        err.print(f"[bold red]{kind}:[/bold red] {escape(e.diagnostics())}")
        return
    err.print(f"[bold red]{kind}:[/bold red] {escape(headline(e), one_line=True)}")
    for line in lines:
        err.print(line)


def emit_json_line(doc: dict[str, Any]) -> None:
    """A JSON object on one line of standard error: an error's (``--json``), or the report of
    ``shieldml run --json``; the last line the command writes there."""
    click.echo(json.dumps(doc, default=str), err=True)


def print_warning(text: str) -> None:
    """``warning: text`` on standard error (with ``--json`` too: it is not the result)."""
    err.print(f"[yellow]warning:[/yellow] {escape(text)}")


def print_interrupted(exit_code: int) -> None:
    if _invocation.as_json:
        emit_json_line(error_document("interrupted", "interrupted", exit_code))
    else:
        err.print("interrupted")


# -- refusals: the failed checks first, each with what was expected, what was found, the fix --


@dataclass
class _Group:
    """One verdict to lay out: a denied key's profile (``key``, ``profile``, ``tee``), a key
    denied for a ``reason`` alone, or one verification of evidence (none of them)."""

    key: str | None = None
    profile: int | None = None
    tee: str | None = None
    reason: str | None = None
    failed: list[dict[str, str | None]] = field(default_factory=list)
    passed: list[str] = field(default_factory=list)

    @property
    def title(self) -> str | None:
        parts = [f"key {self.key!r}"] if self.key is not None else []
        if self.profile is not None:
            parts.append(f"profile {self.profile} ({self.tee})")
        return ", ".join(parts) or None


def _status(e: BrokerError) -> str:
    seq = e.detail.get("audit_seq") if isinstance(e.detail, dict) else None
    parts = [f"broker answered {e.status}"] if e.status is not None else []
    if isinstance(seq, int):
        parts.append(f"audit record {seq}")
    return f" ({', '.join(parts)})" if parts else ""


def headline(e: ShieldError) -> str:
    """The first line of a refusal (its checks follow)."""
    if isinstance(e, NotGenuineError):
        return "the broker found the evidence not genuine" + _status(e)
    if isinstance(e, ReleaseDenied):
        return e.message + _status(e)
    if isinstance(e, PolicyDenied) and e.verdict is not None:
        n = len(e.verdict.failures())
        return f"policy denied: {n} check{'s' if n != 1 else ''} failed"
    if isinstance(e, AttestationError):
        return "the evidence is not genuine"
    return e.message


def _str(v: Any) -> str | None:
    return None if v is None or v == "" else str(v)


def _policy_groups(verdicts: list[tuple[str | None, dict[str, Any]]]) -> list[_Group]:
    groups: list[_Group] = []
    for key, v in verdicts:
        if "profiles" not in v:
            groups.append(_Group(key, reason=_str(v.get("reason")) or "denied"))
            continue
        for p in v["profiles"]:
            profile = p.get("profile")
            g = _Group(key, profile if isinstance(profile, int) else None, _str(p.get("tee")))
            for c in p.get("checks", []):
                if c.get("passed", False):
                    g.passed.append(str(c.get("name")))
                else:
                    g.failed.append(
                        {
                            "check": _str(c.get("name")),
                            "detail": None,
                            "expected": _str(c.get("expected")),
                            "found": _str(c.get("actual")),
                            "hint": _str(c.get("hint")),
                        }
                    )
            groups.append(g)
    return groups


def _verification_group(checks: list[dict[str, Any]], e: AttestationError) -> _Group:
    g = _Group()
    g.passed = [f"{c.get('name')}: {c.get('detail')}" for c in checks if c.get("passed", False)]
    failed = [c for c in checks if not c.get("passed", False)]
    last = failed[-1] if failed else {}
    name = _str(last.get("name")) or e.check
    detail = _str(last.get("detail"))
    g.failed.append(
        {
            "check": name,
            "detail": detail.removeprefix(f"{name}: ") if detail else _without_check(e),
            "expected": _str(last.get("expected")) or e.expected,
            "found": _str(last.get("found")) or e.found,
            "hint": _str(last.get("hint")) or e.hint,
        }
    )
    return g


def _without_check(e: AttestationError) -> str:
    """The message of a failed check without its name in front."""
    message = e.message
    if isinstance(e, NotGenuineError):
        message = message.removeprefix("the broker found the evidence not genuine: ")
    return message.removeprefix(f"{e.check}: ")


def _groups(e: ShieldError) -> list[_Group] | None:
    if isinstance(e, ReleaseDenied):
        return _policy_groups([(_str(v.get("key")), v) for v in e.verdicts])
    if isinstance(e, PolicyDenied) and e.verdict is not None:
        return _policy_groups([(None, e.verdict.to_dict())])
    if isinstance(e, NotGenuineError):
        if e.named or e.cause is not None:
            return [_verification_group(e.reported_checks or [c.to_dict() for c in e.checks], e)]
        return None  # an older broker: its reasons, as it worded them (diagnostics)
    if isinstance(e, AttestationError):
        return [_verification_group([c.to_dict() for c in e.checks], e)]
    return None


def refusal_lines(e: ShieldError) -> list[str] | None:
    """The lines (rich markup) that follow a refusal's headline: for each verdict, every failed
    check with what was expected, what was found and the hint, then the checks that passed;
    ``None`` for an error that is not a refusal. Nothing is cut: a line is as long as what it
    shows."""
    groups = _groups(e)
    if groups is None:
        return None

    def esc(text: str) -> str:  # a broker's words, each on the line it is given
        return escape(text, one_line=True)

    lines: list[str] = []
    for g in groups:
        if g.title is not None:
            lines.append(esc(g.title) + (f": {esc(g.reason)}" if g.reason else ""))
        for f in g.failed:
            detail = f": {f['detail']}" if f["detail"] else ""
            lines.append(f"  {check_mark(False)} {esc((f['check'] or '?') + detail)}")
            for label in ("expected", "found", "hint"):
                if f[label]:
                    lines.append(f"      {label + ':':<9} {esc(f[label] or '')}")
        if g.title is not None and g.passed:  # a policy's: by name, on one line
            lines.append(f"  {check_mark(True)} passed: {esc(', '.join(g.passed))}")
        elif g.passed:  # a verification's: each with what it compared, in the order run
            lines += [f"  {check_mark(True)} {esc(p)}" for p in g.passed]
    if isinstance(e, ReleaseDenied) and e.hint:
        lines.append(f"  hint: {esc(e.hint)}")
    return lines


def error_details(e: ShieldError) -> dict[str, Any]:
    """What an error carries besides its message, for its JSON document."""
    d: dict[str, Any] = {}
    if isinstance(e, BrokerError):
        d["status"] = e.status
        if isinstance(e.detail, dict) and isinstance(e.detail.get("audit_seq"), int):
            d["audit_seq"] = e.detail["audit_seq"]
    if isinstance(e, ReleaseDenied):
        d["failed_checks"] = _failed_checks(e)
        d["verdicts"] = e.verdicts
    elif isinstance(e, PolicyDenied) and e.verdict is not None:
        d["failed_checks"] = _failed_checks(e)
        d["verdict"] = e.verdict.to_dict()
    elif isinstance(e, AttestationError):
        groups = _groups(e)
        failed = groups[0].failed[0] if groups else {}
        d["failed_check"] = failed.get("check", e.check)
        d["message"] = failed.get("detail", e.message)
        d["expected"] = failed.get("expected", e.expected)
        d["found"] = failed.get("found", e.found)
        d["hint"] = failed.get("hint", e.hint)
        if isinstance(e, NotGenuineError):
            d["reasons"] = e.reasons
            d["checks"] = e.reported_checks or [c.to_dict() for c in e.checks]
        else:
            d["checks"] = [c.to_dict() for c in e.checks]
    elif isinstance(e, BindingError):
        d["expected"], d["found"] = e.expected, e.found
    elif isinstance(e, BrokerError) and not isinstance(e.detail, str):
        d["detail"] = e.detail
    if isinstance(e, AuditChainError):
        d["seq"] = e.seq
    if isinstance(e, IntegrityError):
        d["path"], d["where"] = e.path, e.where
    if isinstance(e, OutputWriteError):
        d["path"], d["errno"] = e.path, e.errno
    if isinstance(e, ReceiptError):
        d["problems"] = e.problems
    return d


def _failed_checks(e: PolicyDenied) -> list[dict[str, Any]]:
    """Every failed check of a policy refusal, one object each (``key``: a broker's refusal)."""
    rows: list[dict[str, Any]] = []
    for g in _groups(e) or []:
        where = {"key": g.key, "profile": g.profile, "tee": g.tee}
        if g.reason is not None:
            rows.append({"key": g.key, "reason": g.reason})
        rows += [where | {k: v for k, v in f.items() if k != "detail"} for f in g.failed]
    return rows


@contextmanager
def progress_bar(total: int, label: str) -> Iterator[ProgressCallback]:
    """A progress callback that shows a bar on stderr once the work has taken over a second."""
    started = time.monotonic()
    bar: Progress | None = None
    task: Any = None
    done = 0

    def advance(n: int) -> None:
        nonlocal bar, task, done
        done += n
        if bar is None and time.monotonic() - started > 1.0 and err.is_terminal:
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )

            bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
                console=err.console,
                transient=True,
            )
            bar.start()
            task = bar.add_task(label, total=max(total, done))
        if bar is not None:
            bar.update(task, completed=done)

    try:
        yield advance
    finally:
        if bar is not None:
            bar.stop()
