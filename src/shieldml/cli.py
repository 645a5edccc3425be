"""The ``shieldml`` command: parse, call the library, print, set the exit code.

Exit codes: 0 success · 1 an error in the input, a key or the environment · 2 usage error ·
3 integrity failure (a protected file failed authentication or a key does not match) ·
130 interrupted.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator, Sequence
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

from shieldml import __version__
from shieldml.cli_attest import attest, trust
from shieldml.cli_broker import audit, broker
from shieldml.cli_policy import policy
from shieldml.cli_run import gramine, job, receipt, run
from shieldml.errors import IntegrityError, ShieldError
from shieldml.files import Format, _tree, generate_key, inspect_file, load_key, write_key_file
from shieldml.files._common import ProgressCallback

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTEGRITY = 3
EXIT_INTERRUPTED = 130

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

FORMAT_CHOICE = click.Choice([f.value for f in Format])


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


def _emit(as_json: bool, data: Any, text: str) -> None:
    if as_json:
        click.echo(json.dumps(data, indent=2, sort_keys=True))
    else:
        out.print(text)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="shieldml")
def cli() -> None:
    """Confidential machine learning: encrypted models and data, released only to attested TEEs."""


@cli.group()
def key() -> None:
    """Create keys for protected files."""


@key.command("recipient")
@click.argument("out_path", metavar="OUT", type=click.Path(dir_okay=False))
def key_recipient(out_path: str) -> None:
    """Write an X25519 recipient key pair: OUT (private, 0600) and OUT.pub (for job manifests)."""
    from shieldml.runner.recipient import new_recipient

    pub = new_recipient(out_path)
    out.print(f"wrote {escape(out_path)} (private, mode 0600) and {escape(str(pub))}")


@key.command("new")
@click.argument("out_path", metavar="OUT", type=click.Path(dir_okay=False))
@click.option("--format", "fmt", type=FORMAT_CHOICE, default="stream", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def key_new(out_path: str, fmt: str, as_json: bool) -> None:
    """Write a new random key to OUT (mode 0600; never overwrites).

    stream keys are 32 raw bytes; gramine-pf keys are Gramine's 16-byte wrap-key files.
    """
    f = Format(fmt)
    write_key_file(out_path, generate_key(f))
    _emit(
        as_json,
        {"path": out_path, "format": f.value, "size": f.key_size},
        f"wrote a new {f} key ({f.key_size} bytes, mode 0600) to {out_path}",
    )


@cli.command()
@click.argument("src", metavar="IN", type=click.Path(exists=True))
@click.argument("dst", metavar="OUT", type=click.Path())
@click.option("--key", "key_path", required=True, type=click.Path(dir_okay=False), help="Key file.")
@click.option("--format", "fmt", type=FORMAT_CHOICE, default="stream", show_default=True)
@click.option(
    "--bind",
    help="Path the program will open inside the TEE (for a directory: the directory's path). "
    "Default: OUT as given, as Gramine's pf-crypt stores it.",
)
@click.option("--gramine-version", type=click.Choice(["1", "2"]), default="1", show_default=True)
@click.option("--force", is_flag=True, help="Replace existing output files.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def encrypt(
    src: str,
    dst: str,
    key_path: str,
    fmt: str,
    bind: str | None,
    gramine_version: str,
    force: bool,
    as_json: bool,
) -> None:
    """Encrypt IN (a file or a directory, recursively) into OUT."""
    f = Format(fmt)
    k = load_key(key_path, f)
    items = _tree.plan_encrypt(src, dst, bind)
    with progress_bar(sum(i.size for i in items), "encrypting") as tick:
        _tree.encrypt_path(
            src,
            dst,
            k,
            fmt=f,
            gramine_version=int(gramine_version),
            overwrite=force,
            progress=tick,
            planned=items,
        )
    _report(as_json, "encrypted", items, f.value)


@cli.command()
@click.argument("src", metavar="IN", type=click.Path(exists=True))
@click.argument("dst", metavar="OUT", type=click.Path())
@click.option("--key", "key_path", type=click.Path(dir_okay=False), help="Key file.")
@click.option(
    "--recipient-key",
    type=click.Path(exists=True, dir_okay=False),
    help="Private recipient key, for outputs a runner sealed to its public key.",
)
@click.option("--bind", help="Path the file was bound to at encryption. Default: IN as given.")
@click.option("--workers", type=click.IntRange(1, 64), default=1, show_default=True)
@click.option("--force", is_flag=True, help="Replace existing output files.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def decrypt(
    src: str,
    dst: str,
    key_path: str | None,
    recipient_key: str | None,
    bind: str | None,
    workers: int,
    force: bool,
    as_json: bool,
) -> None:
    """Decrypt IN (a file or a directory, recursively) into OUT.

    Nothing is written at OUT unless all of it verifies.
    """
    if (key_path is None) == (recipient_key is None):
        raise click.UsageError("give exactly one of --key and --recipient-key")
    if recipient_key is not None:
        from shieldml.runner.recipient import open_key, sealed_key_path

        sealed = sealed_key_path(src)
        try:
            blob = sealed.read_bytes()
        except OSError as e:
            raise ShieldError(f"{sealed}: cannot read the sealed key: {e.strerror}") from e
        k = open_key(recipient_key, bind if bind is not None else src.rstrip("/"), blob)
    else:
        k = load_key(key_path or "")
    items = _tree.plan_decrypt(src, dst, bind)
    with progress_bar(sum(i.size for i in items), "decrypting") as tick:
        _tree.decrypt_path(
            src, dst, k, overwrite=force, workers=workers, progress=tick, planned=items
        )
    _report(as_json, "decrypted", items, None)


@cli.command()
@click.argument("path", metavar="IN", type=click.Path(exists=True))
@click.option(
    "--key",
    "key_path",
    required=True,
    type=click.Path(exists=True, dir_okay=False),
    help="Current key.",
)
@click.option(
    "--new-key",
    "new_key_path",
    required=True,
    type=click.Path(exists=True, dir_okay=False),
    help="New key (same format).",
)
@click.option("--bind", help="Path the files are bound to. Default: IN as given.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def rekey(path: str, key_path: str, new_key_path: str, bind: str | None, as_json: bool) -> None:
    """Re-encrypt IN (a file or a directory) in place under a new key; each file atomically."""
    old = load_key(key_path)
    new = load_key(new_key_path)
    if len(old) != len(new):
        raise ShieldError("the new key must be of the same format (size) as the current one")
    items = _tree.plan_decrypt(path, path, bind)
    with progress_bar(sum(i.size for i in items), "re-encrypting") as tick:
        _tree.rekey_path(path, old, new, bind=bind, progress=tick)
    _report(as_json, "re-encrypted", items, None)


def _report(as_json: bool, verb: str, items: list[_tree.Planned], fmt: str | None) -> None:
    rows = [{"in": i.src, "out": i.dst, "bound_path": i.bind} for i in items]
    if as_json:
        _emit(True, {"action": verb, "format": fmt, "files": rows}, "")
        return
    for i in items:
        out.print(
            f"{verb} {escape(i.src)} -> {escape(i.dst)}  "
            f"[dim](bound to {escape(repr(i.bind))})[/dim]"
        )
    if len(items) != 1:
        out.print(f"{verb} {len(items)} files")


@cli.command()
@click.argument("path", metavar="FILE", type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--key", "key_path", type=click.Path(dir_okay=False), help="Key (gramine-pf: exact size, path)."
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def inspect(path: str, key_path: str | None, as_json: bool) -> None:
    """Show the format, version and plaintext size of a protected file."""
    k = load_key(key_path, Format.GRAMINE_PF) if key_path else None
    info = inspect_file(path, k)
    data = info.to_dict()
    if as_json:
        _emit(True, data, "")
        return
    for name, value in data.items():
        if name == "plaintext_size_range":
            value = f"{value[0]}..{value[1]} (exact size needs --key)"
        out.print(f"{name:>22}: {escape(str(value))}")


cli.add_command(attest)
cli.add_command(trust)
cli.add_command(policy)
cli.add_command(broker)
cli.add_command(audit)
cli.add_command(run)
cli.add_command(job)
cli.add_command(receipt)
cli.add_command(gramine)


@cli.command()
@click.option("--workdir", type=click.Path(file_okay=False), help="Keep the files here.")
@click.option("--files-only", is_flag=True, help="Only the short tour of protected files.")
def demo(workdir: str | None, files_only: bool) -> None:
    """Two owners, two brokers, confidential training and inference on a simulated TEE."""
    from shieldml.demo import run_demo

    run_demo(out, workdir, files_only=files_only)


def _print_error(kind: str, e: ShieldError) -> None:
    err.print(f"[bold red]{kind}:[/bold red] {escape(e.diagnostics())}")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; the only place that turns errors into exit codes."""
    try:
        rc = cli.main(args=list(argv) if argv is not None else None, standalone_mode=False)
    except IntegrityError as e:
        _print_error("integrity error", e)
        return EXIT_INTEGRITY
    except ShieldError as e:
        _print_error("error", e)
        return EXIT_ERROR
    except click.exceptions.Abort:
        err.print("interrupted")
        return EXIT_INTERRUPTED
    except click.ClickException as e:
        e.show()
        return e.exit_code
    except KeyboardInterrupt:
        err.print("interrupted")
        return EXIT_INTERRUPTED
    return rc if isinstance(rc, int) else 0


def entry() -> None:  # pragma: no cover - console-script shim
    sys.exit(main())


if __name__ == "__main__":  # pragma: no cover
    entry()
