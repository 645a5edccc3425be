"""The ``shieldml`` command: parse, call the library, print, set the exit code.

One module per command group (:mod:`.files`, :mod:`.attest`, :mod:`.policy`, :mod:`.broker`,
:mod:`.run`, :mod:`.serve`, :mod:`.gramine`, :mod:`.demo`), what they share in :mod:`._common`, everything
printed in :mod:`._output`. :func:`main` is the only place that turns errors into exit codes:

- 0: success;
- 1: an error in the input, a key or the environment; also evidence that is not genuine, a policy
  that denies, an audit chain that is broken;
- 2: usage error (a missing or malformed option or argument);
- 3: integrity failure (a protected file failed authentication or a key does not match);
- 125: `shieldml run` only: the runner failed (keys refused, the program not started or its
  outputs not sealed, a usage error, an interruption before the program started); every other
  code of `shieldml run` is the program's own; `--runner-exit-code N` picks another;
- 130: interrupted.

With ``--json`` a command prints its result as one JSON document on standard output and an
error as one JSON object on one line of standard error (``{"ok": false, "error", "kind",
"type", "hint", "exit_code", "details"}``); ``shieldml run --json`` writes its report there too
(standard output is the program's).
"""

from __future__ import annotations

import importlib
import sys
import warnings
from collections.abc import Sequence
from typing import Any

import click

from shieldml.cli._common import (
    EXIT_CODES,
    EXIT_ERROR,
    EXIT_INTEGRITY,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_RUNNER,
    EXIT_USAGE,
)
from shieldml.cli._output import (
    Invocation,
    begin,
    emit_json_line,
    error_document,
    print_error,
    print_interrupted,
    print_warning,
)
from shieldml.errors import IntegrityError, ShieldDeprecationWarning, ShieldError

__all__ = [
    "EXIT_CODES",
    "EXIT_ERROR",
    "EXIT_INTEGRITY",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_RUNNER",
    "EXIT_USAGE",
    "cli",
    "entry",
    "main",
]


def _print_version(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    """``--version``, with the version looked up only then (importlib.metadata is slow to load)."""
    if not value or ctx.resilient_parsing:
        return
    from shieldml import __version__

    click.echo(f"shieldml, version {__version__}")
    ctx.exit()


#: every command and the module that defines it (in that module's ``COMMANDS``): a command's
#: module is imported only when the command runs or help lists it, so that ``shieldml run`` does
#: not load what ``attest``, ``broker`` or ``demo`` need (tests/test_cli_lazy.py checks the table)
COMMAND_MODULES = {
    "key": "files",
    "encrypt": "files",
    "decrypt": "files",
    "rekey": "files",
    "rebind": "files",
    "inspect": "files",
    "attest": "attest",
    "trust": "attest",
    "policy": "policy",
    "broker": "broker",
    "audit": "broker",
    "run": "run",
    "job": "run",
    "receipt": "run",
    "serve": "serve",
    "proxy": "serve",
    "gramine": "gramine",
    "demo": "demo",
}


class _LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:  # noqa: ARG002
        return sorted(COMMAND_MODULES)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:  # noqa: ARG002
        where = COMMAND_MODULES.get(cmd_name)
        if where is None:
            return None
        module = importlib.import_module(f"shieldml.cli.{where}")
        found: click.Command | None = next((c for c in module.COMMANDS if c.name == cmd_name), None)
        return found


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--version",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=_print_version,
    help="Show the version and exit.",
)
def cli() -> None:
    """Confidential machine learning: encrypted models and data, released only to attested TEEs."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI on ``argv`` (default: the process's arguments); return the exit code."""
    args = list(argv) if argv is not None else sys.argv[1:]
    state = begin()

    def code(default: int) -> int:  # shieldml run: every failure of the runner has its code
        return state.failure_code if state.failure_code is not None else default

    try:
        with warnings.catch_warnings():  # an old spelling: one `warning:` line on stderr
            warnings.simplefilter("always", ShieldDeprecationWarning)
            warnings.showwarning = _show_warning
            rc = cli.main(args=args, standalone_mode=False)
    except IntegrityError as e:
        rc = code(EXIT_INTEGRITY)
        print_error("integrity error", e, rc)
        return rc
    except ShieldError as e:
        rc = code(EXIT_ERROR)
        print_error("error", e, rc)
        return rc
    except OSError as e:  # a system error no library call turned into a ShieldError: one line
        where = f"{e.filename}: " if e.filename else ""
        rc = code(EXIT_ERROR)
        print_error("error", ShieldError(where + (e.strerror or str(e))), rc)
        return rc
    except (click.exceptions.Abort, KeyboardInterrupt):
        rc = code(EXIT_INTERRUPTED)
        print_interrupted(rc)
        return rc
    except click.ClickException as e:
        return _click_error(e, args, state)
    return rc if isinstance(rc, int) else EXIT_OK


def _show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: Any = None,
    line: str | None = None,
) -> None:
    if issubclass(category, ShieldDeprecationWarning):
        print_warning(str(message))
    else:
        _SHOW_WARNING(message, category, filename, lineno, file, line)


_SHOW_WARNING = warnings.showwarning


def _click_error(e: click.ClickException, args: list[str], state: Invocation) -> int:
    """A usage error: click's own text, or with ``--json`` the error object."""
    ctx = getattr(e, "ctx", None)
    command = ctx.command if isinstance(ctx, click.Context) else None
    rc = state.failure_code if state.failure_code is not None else e.exit_code
    # --json not parsed yet (the parser stopped first): given before any `--`, to a command
    # that has it
    words = args[: args.index("--")] if "--" in args else args
    if not state.as_json and command is not None and "--json" in words:
        state.as_json = any(p.name == "as_json" for p in command.params)
    if state.as_json:
        kind = "usage" if isinstance(e, click.UsageError) else "error"
        emit_json_line(error_document(kind, e.format_message(), rc))
    else:
        e.show()
    return rc


def entry() -> None:  # pragma: no cover - console-script shim
    """The ``shieldml`` console script."""
    code = main()
    quick_exit()
    sys.exit(code)


def quick_exit() -> None:
    """Before the interpreter exits: its last garbage collection would walk every object of
    every module loaded (40-50 ms after ``shieldml run``, which loads the attestation, HTTP and
    CLI code), and nothing left needs collecting; module teardown and ``atexit`` still run."""
    import gc

    gc.freeze()
