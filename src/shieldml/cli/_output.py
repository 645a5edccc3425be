"""Everything the CLI prints: the consoles, JSON documents, progress bars, error lines."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import click
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from shieldml.errors import ShieldError
from shieldml.files import ProgressCallback

#: standard output: results (rich markup)
out = Console(highlight=False, soft_wrap=True)
#: standard error: errors, warnings, progress bars
err = Console(stderr=True, highlight=False, soft_wrap=True)


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


def print_error(kind: str, e: ShieldError) -> None:
    """``kind: message`` (and the hint, if any) on standard error."""
    err.print(f"[bold red]{kind}:[/bold red] {escape(e.diagnostics())}")


def print_interrupted() -> None:
    err.print("interrupted")


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
        if bar is None and err.is_terminal and time.monotonic() - started > 1.0:
            bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
                console=err,
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
