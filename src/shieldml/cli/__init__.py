"""The ``shieldml`` command: parse, call the library, print, set the exit code.

One module per command group (:mod:`.files`, :mod:`.attest`, :mod:`.policy`, :mod:`.broker`,
:mod:`.run`, :mod:`.gramine`, :mod:`.demo`), what they share in :mod:`._common`, everything
printed in :mod:`._output`. :func:`main` is the only place that turns errors into exit codes:

- 0: success;
- 1: an error in the input, a key or the environment; also evidence that is not genuine, a policy
  that denies, an audit chain that is broken;
- 2: usage error (a missing or malformed option or argument);
- 3: integrity failure (a protected file failed authentication or a key does not match);
- 130: interrupted.

``shieldml run`` exits with the exit code of the job it ran.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import click

from shieldml import __version__
from shieldml.cli import attest, broker, demo, files, gramine, policy, run
from shieldml.cli._common import (
    EXIT_CODES,
    EXIT_ERROR,
    EXIT_INTEGRITY,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
)
from shieldml.cli._output import print_error, print_interrupted
from shieldml.errors import IntegrityError, ShieldError

__all__ = [
    "EXIT_CODES",
    "EXIT_ERROR",
    "EXIT_INTEGRITY",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USAGE",
    "cli",
    "entry",
    "main",
]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="shieldml")
def cli() -> None:
    """Confidential machine learning: encrypted models and data, released only to attested TEEs."""


for _command in (
    *files.COMMANDS,
    *attest.COMMANDS,
    *policy.COMMANDS,
    *broker.COMMANDS,
    *run.COMMANDS,
    *gramine.COMMANDS,
    *demo.COMMANDS,
):
    cli.add_command(_command)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI on ``argv`` (default: the process's arguments); return the exit code."""
    try:
        rc = cli.main(args=list(argv) if argv is not None else None, standalone_mode=False)
    except IntegrityError as e:
        print_error("integrity error", e)
        return EXIT_INTEGRITY
    except ShieldError as e:
        print_error("error", e)
        return EXIT_ERROR
    except click.exceptions.Abort:
        print_interrupted()
        return EXIT_INTERRUPTED
    except click.ClickException as e:
        e.show()
        return e.exit_code
    except KeyboardInterrupt:
        print_interrupted()
        return EXIT_INTERRUPTED
    return rc if isinstance(rc, int) else EXIT_OK


def entry() -> None:  # pragma: no cover - console-script shim
    """The ``shieldml`` console script."""
    sys.exit(main())
